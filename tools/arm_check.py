"""Check that autopar's runtime trains on 2 gloo ranks exactly as one process, on any CPU.

Why this exists: DESIGN.md promises CPU clusters, ARM included, run over gloo with the same
numbers as one device. ``tools/arm_emulation.sh`` runs this file on an aarch64 Python under
qemu-user to prove that on an x86 machine; it also runs natively for a quick check::

    /work/venv/bin/python tools/arm_check.py            # x86, ~15 s
    tools/arm_emulation.sh                              # aarch64 under qemu, ~40 s once built

What it checks, in order (each failure names the plan, rank, step or tensor and the numbers):

1. ``autopar`` imports (from a source checkout too: the folders are mapped into the
   namespace as setup.cfg's ``package_dir`` does), so the package itself loads on the arch.
2. OR-Tools CP-SAT, the solver backend, solves a small knapsack to the brute-force optimum.
3. ``world_size`` processes (default 2) join a gloo group at MASTER_ADDR=127.0.0.1. Each builds
   the same tiny zoo model (``autopar.models`` "mlp" or "gpt", preset "tiny", seeded), captures
   it with ``autopar.capture`` and, for every plan in turn, runs it with autopar's runtime:
   ``apply_plan(graph, plan)`` then ``steps`` x ``ParallelModule.train_step`` (SGD with
   momentum, built by the runtime over this rank's shards). The plans:

   - ``dp``: ``autopar.runtime.testing.make_plan(graph, "dp", 2)``, batch split, weights
     replicated, gradients all-reduced by the runtime;
   - ``tp``: ``make_plan(graph, "tp", 2)``, Megatron column/row-parallel Linear pairs;
   - ``solver``: ``autopar.solvers.api.solve(graph, Cluster.parse("local:2"))``, the solver's
     own plan (solved on rank 0, broadcast); skipped, with a line saying so, when it equals one
     of the plans above.

   Rank 0 saves the loss at every step and ``full_state_dict()`` after the last step; the parent
   then trains the same model on the whole batch in one process (plain PyTorch) and compares
   (``torch.testing.assert_close``, fp32 defaults) the loss at every step and every parameter.

``--fault drop-dp-grad-sync`` breaks the runtime on purpose (each rank keeps its own gradient:
the data-parallel all-reduce is skipped) to show that the comparison fails when the
parallel step is wrong.

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

REPO = Path(__file__).resolve().parent.parent

PLANS = ("dp", "tp", "solver")
FAULTS = ("none", "drop-dp-grad-sync")
MODELS = ("mlp", "gpt")


# ---------------------------------------------------------------------------- settings/results


@dataclass(frozen=True, slots=True)
class CheckConfig:
    """Everything one run depends on; the same value is handed to every rank."""

    world_size: int = 2
    model: str = "gpt"
    global_batch: int = 8
    steps: int = 3
    lr: float = 0.1
    momentum: float = 0.9
    seed: int = 0
    plans: tuple[str, ...] = PLANS
    #: "drop-dp-grad-sync" is a deliberate runtime bug: the check must then FAIL.
    fault: str = "none"
    start_method: str = "fork"
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.global_batch % self.world_size:
            raise ValueError(
                f"global_batch {self.global_batch} does not split evenly over "
                f"world_size {self.world_size} ranks"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        bad = [p for p in self.plans if p not in PLANS]
        if bad or not self.plans:
            raise ValueError(f"plans must be a non-empty subset of {PLANS}, got {self.plans!r}")
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {self.fault!r}")
        if self.start_method not in ("fork", "spawn", "forkserver"):
            raise ValueError(f"unknown start_method {self.start_method!r}")


@dataclass(frozen=True)
class StepTrace:
    """Losses per step and parameters after the last step, from one plan or the reference."""

    losses: tuple[float, ...]
    params: dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class PlanResult:
    """One plan's outcome: ``ok`` False with ``error`` naming plan, step or tensor at fault."""

    name: str
    description: str
    ok: bool
    error: str
    max_loss_diff: float
    max_param_diff: float
    wall_s: float  # rank 0: apply_plan + the training steps + gathering the parameters
    skipped: str = ""  # why the plan did not run (the solver's plan equals another one)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What :func:`run_check` measured; ``ok`` is False with ``error`` naming the culprit."""

    ok: bool
    error: str
    machine: str
    torch_version: str
    cpu_capability: str
    plans: tuple[PlanResult, ...]
    ranks_s: float
    reference_s: float
    wall_s: float


# ---------------------------------------------------------------------------- model/plans


def _build(config: CheckConfig):
    """(model, inputs, targets, loss_fn): the same weights and global batch on every rank and in
    the reference (global RNG seeded before the zoo builds the model and its data)."""
    import_autopar(subpackages=("autopar.models",))
    from autopar.models import ZOO

    torch.manual_seed(config.seed)
    entry = ZOO[config.model]
    model, inputs = entry.build("tiny", batch_size=config.global_batch)
    return model, inputs, entry.make_targets(model, inputs), entry.loss_fn


def _optimizer_factory(config: CheckConfig):
    """SGD with momentum: optimizer state that carries over steps, exact under fp32 sharding."""
    return lambda params: torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def _plan_key(plan) -> tuple:
    """What makes two plans run the same collectives: mesh, node placements, param layout."""
    return (
        tuple(sorted(plan.mesh.items())),
        tuple((n.node, n.inputs, n.outputs) for n in plan.nodes),
        tuple((p.name, p.placements, p.zero_stage, p.offload, p.stage) for p in plan.params),
        plan.pipeline.schedule, plan.pipeline.num_microbatches, len(plan.pipeline.stages),
    )


def describe_plan(plan) -> str:
    """One line: mesh, tensor-parallel and ZeRO parameter counts, pipeline."""
    from autopar.placements import Replicate

    m = plan.mesh
    n = len(plan.params)
    tp_sharded = sum(1 for p in plan.params if p.placements[1] != Replicate())
    zero = {}
    for p in plan.params:
        zero[p.zero_stage] = zero.get(p.zero_stage, 0) + 1
    zs = ", ".join(f"zero-{k} {v}/{n}" for k, v in sorted(zero.items()))
    pipe = "" if plan.pipeline.schedule == "none" else (
        f", {plan.pipeline.schedule} x{plan.pipeline.num_microbatches}")
    return f"mesh pp={m['pp']} dp={m['dp']} tp={m['tp']}, params tp-sharded {tp_sharded}/{n}, {zs}{pipe}"


def _make_plans(graph, config: CheckConfig) -> list[tuple[str, object, str]]:
    """[(name, plan or None, why skipped)], identical on every rank (the solver runs on rank 0)."""
    from autopar.runtime.testing import make_plan

    out = []
    for name in config.plans:
        if name != "solver":
            out.append((name, make_plan(graph, name, config.world_size), ""))
            continue
        box = [None]
        if dist.get_rank() == 0:
            from autopar.cost_model.cluster import Cluster
            from autopar.solvers.api import solve

            box[0] = solve(graph, Cluster.parse(f"local:{config.world_size}"), optimizer="sgd")
        dist.broadcast_object_list(box, src=0)  # CP-SAT may pick among equal optima per process
        plan = box[0]
        same = [n for n, p, _ in out if p is not None and _plan_key(p) == _plan_key(plan)]
        if not same:  # compare with the hand-built plans even when they are not run
            for other in ("dp", "tp"):
                if other not in config.plans and _plan_key(make_plan(graph, other, config.world_size)) == _plan_key(plan):
                    same.append(other)
        out.append((name, None if same else plan, f"same as the {same[0]} plan" if same else ""))
    return out


# ---------------------------------------------------------------------------- fault injection


def _inject_drop_dp_grad_sync() -> None:
    """Make the runtime forget the data-parallel gradient sum (the bug DDP exists to avoid).

    Patches :class:`autopar.runtime.apply.ParallelModule` in this rank only: a gradient that
    is ``Partial`` (a pending sum over ranks) is taken as if it were already the sum, so each
    rank steps on its own gradient. Only tests use it, to show the comparison catches it.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Replicate as DReplicate

    from autopar.runtime.apply import ParallelModule

    def sync_one(self, fqn, p):  # noqa: ARG001 (same signature as the method it replaces)
        g = p.grad
        if g is None:
            return
        local = [DReplicate() if x.is_partial() else x for x in g.placements]
        g = DTensor.from_local(g._local_tensor, g.device_mesh, local, run_check=False,
                               shape=g.shape, stride=g.stride())
        p.grad = g if tuple(local) == tuple(p.placements) else g.redistribute(p.device_mesh, p.placements)

    ParallelModule._sum_axes = lambda self, p: ()  # no bucketed all-reduce either
    ParallelModule._sync_one = sync_one


# ---------------------------------------------------------------------------- the ranks


def _run_plans(config: CheckConfig, out_dir: str) -> None:
    """On every rank: capture, then apply and train each plan; rank 0 saves what it saw."""
    import_autopar(subpackages=("autopar.runtime",))
    from autopar.graph import capture
    from autopar.runtime.apply import apply_plan

    if config.fault == "drop-dp-grad-sync":
        _inject_drop_dp_grad_sync()
    model, inputs, targets, loss_fn = _build(config)
    names = [n for n, _ in model.named_parameters()]
    graph = capture(model, inputs)
    factory = _optimizer_factory(config)
    saved = {}
    for name, plan, skipped in _make_plans(graph, config):
        if plan is None:
            saved[name] = {"skipped": skipped}
            continue
        t = time.perf_counter()
        pm = apply_plan(graph, plan)
        losses = tuple(float(pm.train_step(inputs, targets, loss_fn, factory)) for _ in range(config.steps))
        full = pm.full_state_dict()  # a collective: every rank takes part
        params = {k: full[graph.param_aliases.get(k, k)] for k in names}
        fallbacks = sorted({n for ex in pm.executors.values() for n in ex.fallbacks})
        description = describe_plan(plan) + (
            f", {len(fallbacks)} node(s) run on whole tensors (no DTensor rule): {', '.join(fallbacks[:4])}"
            if fallbacks else ", every node run as planned")
        if name == "solver":
            description += f", solver status {plan.solver.status} in {plan.solver.wall_s:.1f} s"
        saved[name] = {"losses": losses, "params": params, "description": description,
                       "wall_s": time.perf_counter() - t}
        dist.barrier()
    if dist.get_rank() == 0:
        torch.save(saved, Path(out_dir) / "rank0.pt")


def _worker(rank: int, config: CheckConfig, port: int, out_dir: str) -> None:
    """One rank: join the gloo group, run the plans, leave the group."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(config.world_size)
    # Loopback only: the ranks share one machine, and under emulation interface discovery
    # is one more thing that could differ from a real host.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["AUTOPAR_PG_TIMEOUT_S"] = str(int(config.timeout_s))  # the runtime's subgroups
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=config.world_size,
        timeout=timedelta(seconds=config.timeout_s),
    )
    try:
        _run_plans(config, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- the reference


def reference(config: CheckConfig) -> StepTrace:
    """``config.steps`` steps of plain PyTorch on the whole batch in this process."""
    model, inputs, targets, loss_fn = _build(config)
    opt = _optimizer_factory(config)(model.parameters())
    losses = []
    for _ in range(config.steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(*inputs), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return StepTrace(tuple(losses), {k: v.detach().clone() for k, v in model.named_parameters()})


def compare(got: StepTrace, want: StepTrace) -> tuple[float, float]:
    """Raise AssertionError naming the step or tensor that differs; else (max |loss diff|,
    max |param diff|)."""
    if len(got.losses) != len(want.losses):
        raise AssertionError(f"{len(got.losses)} losses, expected {len(want.losses)}")
    loss_diff = param_diff = 0.0
    for step, (g, w) in enumerate(zip(got.losses, want.losses)):
        torch.testing.assert_close(
            torch.tensor(g), torch.tensor(w), msg=lambda m, step=step: f"rank 0 loss at step {step}: {m}"
        )
        loss_diff = max(loss_diff, abs(g - w))
    for name, w in want.params.items():
        if name not in got.params:
            raise AssertionError(f"parameter {name!r} missing from the runtime's full_state_dict")
        g = got.params[name]
        torch.testing.assert_close(
            g, w, msg=lambda m, name=name: f"parameter {name!r} after {len(want.losses)} steps: {m}"
        )
        param_diff = max(param_diff, (g - w).abs().max().item())
    return loss_diff, param_diff


def run_check(config: CheckConfig) -> CheckResult:
    """Run ``config.world_size`` gloo ranks through every plan, then the reference; compare."""
    start = time.perf_counter()
    machine = platform.machine()
    capability = torch.backends.cpu.get_cpu_capability()
    results: list[PlanResult] = []
    ranks_s = reference_s = 0.0

    def done(ok: bool, error: str) -> CheckResult:
        return CheckResult(ok, error, machine, torch.__version__, capability, tuple(results),
                           ranks_s, reference_s, time.perf_counter() - start)

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
            ranks_s = time.perf_counter() - start
            saved = torch.load(Path(out_dir) / "rank0.pt")
        t = time.perf_counter()
        want = reference(config)
        reference_s = time.perf_counter() - t
    except Exception as exc:  # reported, not swallowed: run_check's caller prints and exits 1
        return done(False, f"{type(exc).__name__}: {exc}".strip())
    first_error = ""
    for name in config.plans:
        s = saved[name]
        if "skipped" in s:
            results.append(PlanResult(name, "", True, "", 0.0, 0.0, 0.0, skipped=s["skipped"]))
            continue
        try:
            loss_diff, param_diff = compare(StepTrace(tuple(s["losses"]), s["params"]), want)
            results.append(PlanResult(name, s["description"], True, "", loss_diff, param_diff, s["wall_s"]))
        except AssertionError as exc:
            error = f"plan {name}: AssertionError: {exc}".strip()
            first_error = first_error or error
            results.append(PlanResult(name, s["description"], False, error, float("nan"), float("nan"),
                                      s["wall_s"]))
    return done(not first_error, first_error)


# ---------------------------------------------------------------------------- imports and CP-SAT


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


def preload_modules() -> None:
    """Import what the ranks and the reference will use, before the ranks are forked.

    Under emulation an import costs minutes (torch.optim pulls in torch._dynamo on the first
    optimizer); imported once here, the forked ranks inherit the modules. Importing runs no
    tensor op, so no thread pool is started before the fork.
    """
    for name in ("autopar.graph", "autopar.runtime.apply", "autopar.runtime.testing",
                 "autopar.solvers.api", "autopar.cost_model.cluster", "autopar.models",
                 "torch._dynamo"):
        importlib.import_module(name)


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
    parser.add_argument("--model", default="gpt", choices=MODELS, help="zoo model, preset 'tiny'")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--plans", default=",".join(PLANS),
                        help=f"comma-separated subset of {','.join(PLANS)}")
    parser.add_argument("--start-method", default="fork", choices=("fork", "spawn", "forkserver"))
    parser.add_argument("--fault", default="none", choices=FAULTS,
                        help="'drop-dp-grad-sync' is a deliberate runtime bug: the check must then FAIL")
    parser.add_argument("--skip-ortools", action="store_true", help="do not run the CP-SAT check")
    args = parser.parse_args(argv)

    print(f"machine: {platform.machine()}  python: {platform.python_version()}  "
          f"torch: {torch.__version__}  cpu capability: {torch.backends.cpu.get_cpu_capability()}",
          flush=True)
    try:
        t = time.perf_counter()
        autopar = import_autopar()
        preload_modules()
        print(f"autopar {autopar.__version__} imports from {Path(autopar.__file__).parent}, "
              f"with its runtime, capture and solver ({time.perf_counter() - t:.1f} s)", flush=True)
        if not args.skip_ortools:
            t = time.perf_counter()
            version = check_ortools()
            print(f"ortools {version}: CP-SAT knapsack optimum matches brute force "
                  f"({time.perf_counter() - t:.1f} s)", flush=True)
        config = CheckConfig(world_size=args.world_size, model=args.model, steps=args.steps,
                             plans=tuple(p.strip() for p in args.plans.split(",") if p.strip()),
                             fault=args.fault, start_method=args.start_method)
        from autopar.models import ZOO

        cfg = ZOO[config.model].build("tiny", batch_size=2, device="meta")[0].config
    except Exception as exc:
        traceback.print_exc()
        print(f"FAIL: {type(exc).__name__}: {exc}", flush=True)
        return 1
    print(f"model: autopar.models {config.model} 'tiny' {cfg}, global batch {config.global_batch}",
          flush=True)
    print(f"autopar runtime: {config.world_size} gloo ranks (start method {config.start_method}), "
          f"plans {','.join(config.plans)}, {config.steps} steps each of SGD(lr={config.lr}, "
          f"momentum={config.momentum}), fault {config.fault} ...", flush=True)
    result = run_check(config)
    for r in result.plans:
        if r.skipped:
            print(f"plan {r.name}: not run, {r.skipped}", flush=True)
        elif r.ok:
            print(f"plan {r.name}: {r.description}: max |diff| loss {r.max_loss_diff:.3g}, "
                  f"params {r.max_param_diff:.3g} ({r.wall_s:.1f} s)", flush=True)
        else:
            print(f"plan {r.name}: {r.description}: DIFFERS ({r.wall_s:.1f} s)", flush=True)
    print(f"ranks {result.ranks_s:.1f} s, one-process reference {result.reference_s:.1f} s, "
          f"total {result.wall_s:.1f} s", flush=True)
    if not result.ok:
        print(f"FAIL: {result.error}", flush=True)
        return 1
    print(f"PASS ({result.machine}, torch {result.torch_version})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
