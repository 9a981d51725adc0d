"""Check that a 2-rank gloo data-parallel training step matches one process, on any CPU.

Why this exists: DESIGN.md promises CPU clusters, ARM included, run over gloo with the same
numbers as one device. ``tools/arm_emulation.sh`` runs this file on an aarch64 Python under
qemu-user to prove that on an x86 machine; it also runs natively for a quick check::

    /work/venv/bin/python tools/arm_check.py            # x86, seconds
    tools/arm_emulation.sh                              # aarch64 under qemu, minutes

What it checks, in order (each failure names the tensor and the numbers at fault):

1. ``autopar`` imports (from a source checkout too: the folders are mapped into the
   namespace as setup.cfg's ``package_dir`` does), so the package itself loads on the arch.
2. OR-Tools CP-SAT, the solver backend, solves a small knapsack to the brute-force optimum.
3. ``world_size`` processes (default 2) join a gloo group at MASTER_ADDR=127.0.0.1; each takes
   its contiguous slice of one global batch, runs forward and backward on a tiny MLP (the
   zoo's ``autopar.models`` mlp "tiny" when it imports, else the two-layer MLP below),
   all-reduces (sums) the gradients and the loss and divides by the world size, then takes an
   SGD step; this repeats for ``steps`` steps. Every rank's losses and final parameters must
   equal (``torch.testing.assert_close``, fp32 defaults) those of one process stepping on the
   full batch. With equal slices the mean of per-rank mean losses is the full-batch mean loss,
   so the only difference allowed is summation order.

Processes are started with ``fork`` by default: under qemu-user without binfmt_misc the
kernel cannot exec an aarch64 interpreter for a ``spawn`` child, while a forked child is a
copy of the emulator and the guest program together.

Exit status 0 and a last line ``PASS`` on success; 1 and ``FAIL: <reason>`` otherwise.
"""
from __future__ import annotations

import argparse
import configparser
import importlib.abc
import importlib.util
import itertools
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class MLPConfig:
    """Sizes of the fallback model; small enough that emulation takes seconds per step."""

    n_in: int = 16
    n_hidden: int = 32
    n_out: int = 4


class MLP(nn.Module):
    """Two linear layers with a tanh between: x (B, n_in) -> (B, n_out).

    The fallback when ``autopar.models`` does not import, so this file also checks a bare
    torch install.
    """

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.n_in, config.n_hidden)
        self.fc2 = nn.Linear(config.n_hidden, config.n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))  # (B, n_in) -> (B, n_hidden) -> (B, n_out)


# ---------------------------------------------------------------------------- settings/results


@dataclass(frozen=True, slots=True)
class CheckConfig:
    """Everything one run depends on; the same value is handed to every rank."""

    world_size: int = 2
    global_batch: int = 8
    steps: int = 2
    lr: float = 0.1
    seed: int = 0
    model: MLPConfig = MLPConfig()
    #: "zoo": autopar.models' mlp "tiny" preset; "local": :class:`MLP` above.
    model_source: str = "zoo"
    #: "avg" is correct data parallelism; "sum" (no division by world size) exists so tests
    #: can show that the comparison catches a wrong gradient reduction.
    grad_reduce: str = "avg"
    start_method: str = "fork"
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.global_batch % self.world_size:
            raise ValueError(
                f"global_batch {self.global_batch} does not split evenly over "
                f"world_size {self.world_size} ranks"
            )
        if self.grad_reduce not in ("avg", "sum"):
            raise ValueError(f"grad_reduce must be 'avg' or 'sum', got {self.grad_reduce!r}")
        if self.model_source not in ("zoo", "local"):
            raise ValueError(f"model_source must be 'zoo' or 'local', got {self.model_source!r}")
        if self.start_method not in ("fork", "spawn", "forkserver"):
            raise ValueError(f"unknown start_method {self.start_method!r}")


@dataclass(frozen=True)
class StepTrace:
    """Losses per step and parameters after the last step, from one rank or the reference."""

    losses: tuple[float, ...]
    params: dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What :func:`run_check` measured; ``ok`` is False with ``error`` naming the culprit."""

    ok: bool
    error: str
    machine: str
    torch_version: str
    cpu_capability: str
    max_abs_diff: float
    wall_s: float


# ---------------------------------------------------------------------------- the step


def _build(config: CheckConfig):
    """(model, x, y, loss_fn): the same weights and global batch on every rank and in the
    reference (seeded global RNG for weights, seeded generators for data)."""
    torch.manual_seed(config.seed)
    if config.model_source == "zoo":
        import_autopar(subpackages=("autopar.models",))
        from autopar.models import ZOO

        entry = ZOO["mlp"]
        model, (x,) = entry.build("tiny", batch_size=config.global_batch)
        return model, x, entry.make_targets(model, (x,)), entry.loss_fn
    model = MLP(config.model)
    gen = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(config.global_batch, config.model.n_in, generator=gen)
    y = torch.randn(config.global_batch, config.model.n_out, generator=gen)
    return model, x, y, nn.functional.mse_loss


def _train(config: CheckConfig, rank: int, world_size: int) -> StepTrace:
    """``config.steps`` SGD steps on this rank's slice; with world_size 1, the reference."""
    model, x, y, loss_fn = _build(config)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    local = config.global_batch // world_size
    x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
    losses = []
    for _ in range(config.steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        loss = loss.detach().clone()
        if world_size > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                if config.grad_reduce == "avg":
                    p.grad.div_(world_size)
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss.div_(world_size)
        losses.append(loss.item())
        opt.step()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return StepTrace(tuple(losses), params)


def _worker(rank: int, config: CheckConfig, port: int, out_dir: str) -> None:
    """One rank: join the gloo group, train, save the trace for the parent to compare."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # Loopback only: the ranks share one machine, and under emulation interface discovery
    # is one more thing that could differ from a real host.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=config.world_size,
        timeout=timedelta(seconds=config.timeout_s),
    )
    try:
        trace = _train(config, rank, config.world_size)
        torch.save({"losses": trace.losses, "params": trace.params}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare(rank: int, got: StepTrace, want: StepTrace) -> float:
    """Raise AssertionError naming the rank and tensor that differ; return max |diff|."""
    worst = 0.0
    for step, (g, w) in enumerate(zip(got.losses, want.losses)):
        torch.testing.assert_close(
            torch.tensor(g), torch.tensor(w), msg=lambda m: f"rank {rank} loss at step {step}: {m}"
        )
        worst = max(worst, abs(g - w))
    for name, w in want.params.items():
        g = got.params[name]
        torch.testing.assert_close(
            g, w, msg=lambda m: f"rank {rank} parameter {name!r} after {len(want.losses)} steps: {m}"
        )
        worst = max(worst, (g - w).abs().max().item())
    return worst


def run_check(config: CheckConfig) -> CheckResult:
    """Run ``config.world_size`` gloo ranks and one reference process; compare them."""
    start = time.perf_counter()
    machine = platform.machine()
    capability = torch.backends.cpu.get_cpu_capability()
    worst = 0.0
    try:
        with tempfile.TemporaryDirectory(prefix="autopar_arm_check_") as out_dir:
            # Ranks first: forking before this process runs any op keeps its thread pools
            # out of the children.
            mp.start_processes(
                _worker,
                args=(config, _free_port(), out_dir),
                nprocs=config.world_size,
                join=True,
                start_method=config.start_method,
            )
            want = _train(config, rank=0, world_size=1)
            for rank in range(config.world_size):
                saved = torch.load(Path(out_dir) / f"rank{rank}.pt")
                got = StepTrace(tuple(saved["losses"]), saved["params"])
                worst = max(worst, _compare(rank, got, want))
    except Exception as exc:  # reported, not swallowed: run_check's caller prints and exits 1
        error = f"{type(exc).__name__}: {exc}".strip()
        return CheckResult(False, error, machine, torch.__version__, capability, worst,
                           time.perf_counter() - start)
    return CheckResult(True, "", machine, torch.__version__, capability, worst,
                       time.perf_counter() - start)


# ---------------------------------------------------------------------------- other checks


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``autopar`` and its mapped subpackages in a source checkout.

    setup.cfg installs sibling folders (cost_model/, runtime/, ...) as ``autopar.*``; a plain
    PYTHONPATH cannot express that, and the emulated Python has no editable install.
    """

    def __init__(self, packages: dict[str, Path]) -> None:
        self._packages = packages

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (importlib API)
        folder = self._packages.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def _checkout_packages(repo: Path) -> dict[str, Path]:
    """setup.cfg's ``[options] package_dir`` as {package name: folder}."""
    cfg = configparser.ConfigParser()
    cfg.read(repo / "setup.cfg")
    mapping = {}
    for line in cfg.get("options", "package_dir", fallback="").splitlines():
        if "=" in line:
            name, folder = (s.strip() for s in line.split("=", 1))
            mapping[name] = repo / folder
    return mapping


def import_autopar(repo: Path = REPO, subpackages: tuple[str, ...] | None = None):
    """Import ``autopar`` and ``subpackages`` (default: all that setup.cfg maps), installed
    or from the checkout at ``repo``; return the ``autopar`` module."""
    packages = _checkout_packages(repo)
    try:
        import autopar
    except ImportError:
        if "autopar" not in packages:
            raise
        sys.meta_path.insert(0, _CheckoutFinder(packages))
        import autopar
    for name in packages if subpackages is None else subpackages:
        importlib.import_module(name)
    return autopar


def pick_model_source() -> tuple[str, str]:
    """("zoo", description) when autopar.models imports here, else ("local", why not)."""
    try:
        import_autopar(subpackages=("autopar.models",))
        from autopar.models import ZOO

        cfg = ZOO["mlp"].build("tiny", batch_size=2, device="meta")[0].config
    except Exception as exc:  # reported by the caller, which then checks the fallback MLP
        return "local", f"local 2-layer MLP (autopar.models not usable: {type(exc).__name__}: {exc})"
    return "zoo", f"autopar.models mlp 'tiny' {cfg}"


def check_ortools() -> str:
    """Solve a 6-item knapsack with CP-SAT; raise unless it equals the brute-force optimum."""
    from ortools.sat.python import cp_model

    weights, values, capacity = [3, 4, 5, 8, 9, 2], [4, 5, 7, 10, 11, 1], 17
    best = max(
        sum(v for v, t in zip(values, take) if t)
        for take in itertools.product((0, 1), repeat=len(weights))
        if sum(w for w, t in zip(weights, take) if t) <= capacity
    )
    m = cp_model.CpModel()
    xs = [m.NewBoolVar(f"x{i}") for i in range(len(weights))]
    m.Add(sum(w * x for w, x in zip(weights, xs)) <= capacity)
    m.Maximize(sum(v * x for v, x in zip(values, xs)))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    status = solver.Solve(m)
    if status != cp_model.OPTIMAL or round(solver.ObjectiveValue()) != best:
        raise AssertionError(
            f"CP-SAT knapsack: status {solver.StatusName(status)}, objective "
            f"{solver.ObjectiveValue()}, brute-force optimum {best}"
        )
    import ortools

    return ortools.__version__


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--start-method", default="fork", choices=("fork", "spawn", "forkserver"))
    parser.add_argument("--grad-reduce", default="avg", choices=("avg", "sum"),
                        help="'sum' is a deliberate bug: the check must then FAIL")
    parser.add_argument("--skip-autopar", action="store_true",
                        help="do not import autopar; train the local MLP")
    parser.add_argument("--skip-ortools", action="store_true", help="do not run the CP-SAT check")
    args = parser.parse_args(argv)

    print(f"machine: {platform.machine()}  python: {platform.python_version()}  "
          f"torch: {torch.__version__}  cpu capability: {torch.backends.cpu.get_cpu_capability()}",
          flush=True)
    try:
        if not args.skip_autopar:
            t = time.perf_counter()
            autopar = import_autopar()
            print(f"autopar {autopar.__version__} imports from {Path(autopar.__file__).parent} "
                  f"({time.perf_counter() - t:.1f} s)", flush=True)
        if not args.skip_ortools:
            t = time.perf_counter()
            version = check_ortools()
            print(f"ortools {version}: CP-SAT knapsack optimum matches brute force "
                  f"({time.perf_counter() - t:.1f} s)", flush=True)
        source, description = ("local", "local 2-layer MLP") if args.skip_autopar else pick_model_source()
        print(f"model: {description}", flush=True)
        config = CheckConfig(world_size=args.world_size, steps=args.steps, model_source=source,
                             start_method=args.start_method, grad_reduce=args.grad_reduce)
    except Exception as exc:
        traceback.print_exc()
        print(f"FAIL: {type(exc).__name__}: {exc}", flush=True)
        return 1
    print(f"gloo data parallel: {config.world_size} ranks x {config.global_batch // config.world_size} "
          f"samples, {config.steps} SGD steps, grads reduced by {config.grad_reduce}, "
          f"start method {config.start_method} ...", flush=True)
    result = run_check(config)
    if not result.ok:
        print(f"ranks vs one process differ ({result.wall_s:.1f} s)", flush=True)
        print(f"FAIL: {result.error}", flush=True)
        return 1
    print(f"ranks vs one process: max |diff| {result.max_abs_diff:.3g} ({result.wall_s:.1f} s)",
          flush=True)
    print(f"PASS ({result.machine}, torch {result.torch_version})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
