"""Launching: user scripts through torchrun, and `autopar run MODEL` on synthetic data.

- :func:`launch_script` runs ``python SCRIPT args`` on ``nproc`` local processes through
  ``torch.distributed.run`` (torchrun), passing ``--nnodes/--node-rank/--rdzv-endpoint`` through
  for multi-node jobs. torchrun ends every worker when one fails and prints the failing rank's
  error (``@record`` in :func:`run_model_worker` writes it); process groups carry a timeout
  (``AUTOPAR_PG_TIMEOUT_S``), so a dead peer never leaves the rest hanging.
- :func:`run_model` launches :func:`run_model_worker` on every rank: it builds the model
  (``pkg.mod:fn`` or ``file.py:fn`` returning ``(model, example_inputs)``, or a zoo name), plans
  it (the solver when present, else the plan given or a data-parallel plan), trains ``steps``
  steps on synthetic data, and prints measured vs predicted step time and peak memory.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Sequence


def torchrun_command(script: str, nproc: int, args: Sequence[str] = (), *, nnodes: int = 1,
                     node_rank: int = 0, rdzv_endpoint: str | None = None, module: bool = False) -> list[str]:
    """The ``python -m torch.distributed.run ...`` command line (pure: for tests and dry runs)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint (host:port of node 0)")
        cmd += [f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    cmd += ["--max-restarts=0"]
    cmd += (["-m", script] if module else [script]) + list(args)
    return cmd


def launch_script(script: str, nproc: int, args: Sequence[str] = (), *, nnodes: int = 1, node_rank: int = 0,
                  rdzv_endpoint: str | None = None, timeout_s: float | None = None, module: bool = False,
                  env: dict | None = None) -> int:
    """Run ``script`` on ``nproc`` processes per node via torchrun; returns its exit code.

    A worker failure ends the job (torchrun kills the other workers and prints the failing rank's
    traceback); ``timeout_s`` kills the whole job if it runs longer.
    """
    cmd = torchrun_command(script, nproc, args, nnodes=nnodes, node_rank=node_rank,
                           rdzv_endpoint=rdzv_endpoint, module=module)
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update(env or {})
    proc = subprocess.Popen(cmd, env=e, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)  # the job's own process group: torchrun and its workers
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print(f"autopar run: job exceeded {timeout_s:.0f} s and was stopped", file=sys.stderr)
        return 124


def load_target(target: str):
    """``pkg.mod:fn`` / ``file.py:fn`` / a zoo name ("gpt", "gpt:tiny") -> (model, inputs, targets, loss_fn)."""
    from autopar.models import ZOO

    name, _, rest = target.partition(":")
    if name in ZOO:
        e = ZOO[name]
        model, inputs = e.build(rest or "tiny")
        return model, inputs, e.make_targets(model, inputs), e.loss_fn
    if ":" not in target:
        raise ValueError(f"MODEL {target!r}: expected a zoo name ({sorted(ZOO)}), pkg.mod:fn or file.py:fn")
    mod_name, fn_name = target.rsplit(":", 1)
    if mod_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("_autopar_user_model", mod_name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    model, inputs = getattr(mod, fn_name)()
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    zoo = getattr(mod, "make_targets", None)
    targets = zoo(model, inputs) if zoo else None
    loss_fn = getattr(mod, "loss_fn", None)
    return model, tuple(inputs), targets, loss_fn


def _default_loss(out, targets):
    import torch.nn.functional as F

    return F.mse_loss(out, targets)


def run_model_worker(target: str, cluster: str, steps: int, plan_path: str | None, kind: str | None,
                     out_json: str | None) -> None:
    """Per rank: build, plan, apply, train ``steps`` steps, print measured vs predicted."""
    import torch
    import torch.distributed as dist

    from autopar.graph import capture
    from autopar.plan import Plan
    from autopar.runtime import optimizers
    from autopar.runtime.apply import apply_plan
    from autopar.runtime.live_memory import LiveTensorBytes
    from autopar.runtime.mesh import init_distributed

    init_distributed()
    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, inputs, targets, loss_fn = load_target(target)
    graph = capture(model, inputs)
    if targets is None:
        with torch.no_grad():
            targets = torch.zeros_like(model(*inputs))
    loss_fn = loss_fn or _default_loss
    if plan_path:
        plan = Plan.load(plan_path)
    elif kind:
        from autopar.runtime.testing import make_plan

        plan = make_plan(graph, kind, ws)
    else:
        plan = _solve(model, inputs, graph, cluster, ws)
    pm = apply_plan(graph, plan)
    opt = optimizers.factory(plan.training.optimizer, lr=1e-4)  # what the plan was priced for
    times = []
    loss = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # on a CPU, live tensors are counted over the first two steps (the first creates the
    # optimizer state, the second is steady); the step time is the median of the later ones
    probe = None if torch.cuda.is_available() else LiveTensorBytes()
    for i in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        with probe if probe is not None and i < 2 else contextlib.nullcontext():
            loss = pm.train_step(inputs, targets, loss_fn, opt)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    warm = times[min(2, len(times) - 1):]
    measured = sorted(warm)[len(warm) // 2]
    if probe is None:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = probe.peak_bytes + pm.local_param_bytes()
    peaks = [None] * ws
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        pred = plan.predicted
        mem_pred = max(pred.memory_per_device_bytes) if pred.memory_per_device_bytes else 0
        report = {"model": target, "cluster": cluster, "mesh": dict(plan.mesh), "steps": steps,
                  "loss": float(loss), "measured_step_s": measured, "predicted_step_s": pred.step_time_s,
                  "measured_peak_bytes": max(peaks), "predicted_peak_bytes": mem_pred,
                  "memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available()
                  else "local parameter shards + peak live tensors (autopar.runtime.live_memory)"}
        print(f"autopar run {target} on {cluster} (mesh pp={plan.mesh['pp']} dp={plan.mesh['dp']} "
              f"tp={plan.mesh['tp']}), {steps} steps, final loss {float(loss):.4f}")
        print(f"  step time  measured {measured * 1e3:9.2f} ms   predicted {pred.step_time_s * 1e3:9.2f} ms")
        print(f"  peak mem   measured {max(peaks) / 2**20:9.1f} MiB  predicted {mem_pred / 2**20:9.1f} MiB"
              f"  (measured: {report['memory_kind']})")
        if out_json:
            with open(out_json, "w") as f:
                json.dump(report, f, indent=2)
    # every rank reaches teardown together, so no rank leaves while rank 0 still writes the
    # report; the process then ends through exit_worker (see _main)
    dist.barrier()
    dist.destroy_process_group()


def _solve(model, inputs, graph, cluster: str, ws: int):
    """The solver's plan when autopar.plan exists; otherwise a data-parallel plan, said so."""
    import autopar

    if hasattr(autopar, "plan") and callable(getattr(autopar, "plan")):
        from autopar.cost_model.cluster import Cluster

        return autopar.plan(model, inputs, cluster=Cluster.parse(cluster))
    from autopar.runtime.testing import make_plan

    print("autopar run: no solver available (autopar.plan); using a data-parallel plan", file=sys.stderr)
    return make_plan(graph, "dp", ws)


def run_model(model_target: str, cluster: str = "local:4", steps: int = 20, *, plan: str | None = None,
              kind: str | None = None, out_json: str | None = None, timeout_s: float | None = None) -> int:
    """Train ``model_target`` on ``cluster`` ("local:N") for ``steps`` steps; returns the exit code."""
    if not cluster.startswith("local:"):
        raise ValueError(f"run_model launches local processes; cluster must be 'local:N', got {cluster!r} "
                         f"(for other clusters launch a script with --nnodes/--rdzv-endpoint)")
    nproc = int(cluster.split(":", 1)[1])
    args = [model_target, cluster, str(steps), plan or "", kind or "", out_json or ""]
    return launch_script("autopar.runtime.launch", nproc, args, timeout_s=timeout_s, module=True)


def _main(argv: Sequence[str]) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    target, cluster, steps, plan, kind, out_json = argv
    from autopar.runtime.mesh import exit_worker

    record(run_model_worker)(target, cluster, int(steps), plan or None, kind or None, out_json or None)
    exit_worker()


if __name__ == "__main__":
    _main(sys.argv[1:])
