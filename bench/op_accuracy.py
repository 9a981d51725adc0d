"""Per-op accuracy: the cost model's forward / backward time of single ops vs measured, on one device.

    python bench/op_accuracy.py [--profile FILE] [--device cuda|cpu] [--dtypes fp32,bf16] [--quick]

Why: the step-time benchmark (``cost_model_accuracy.py``) scores whole plans on the CPU; this
scores the per-node prices the solver adds up, op by op, on whatever device is here - an H100
when one is lent (issue 3 asks for matmul / attention / layernorm on it).

1. Profile this machine (``autopar profile --nproc 1``: on a GPU, its matmul fit over sizes and
   dtypes, stream bandwidth and launch cost), or read ``--profile``.
2. For each op - ``nn.Linear`` (GEMMs from skinny to large), causal and full
   ``F.scaled_dot_product_attention``, ``nn.LayerNorm`` - capture a one-op module and price it
   the way the solver does: ``solve`` pinned to one device, then the per-node
   ``forward_s`` / ``backward_s`` of the chosen strategy (``autopar.solvers.api.search``),
   summed over the module's nodes.
3. Measure the same op: ``--copies`` independent copies (own weights and inputs) run in
   sequence, forward alone and forward + one ``backward`` call over all outputs (the engine's
   fixed start-up cost is shared as in a model's step); ``--reps`` such rounds between two
   CUDA events (host clock on a CPU), after warm-up; median of ``--rounds`` loops, divided by
   the copies; backward = the difference. fp32 runs with
   TF32 off (a plan's fp32 is priced at the fp32 rate); bf16 runs the module in bf16 and is
   priced as ``precision="bf16-mixed"``.
4. Print per op: predicted and measured forward and backward, and the error; on a GPU also
   the prediction from the catalog's datasheet entry for the same GPU (``--catalog``,
   default h100) to show what the profile adds.

On a CPU (``--quick`` is a smoke run) the prices are not like-for-like with a bare op: a CPU
profile carries autopar's runtime cost per node and the first-touch charge of fresh memory
(see ``autopar.cost_model.compute.node_time``), which an eager op outside the runtime does not
pay. A GPU profile has neither; its op price is the launch cost plus the roofline / fit.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

OPS_FULL = {
    # name: (builder kind, shape args)
    "linear 16x4096->4096": ("linear", (16, 4096, 4096)),
    "linear 2048x768->3072": ("linear", (2048, 768, 3072)),
    "linear 8192x768->3072": ("linear", (8192, 768, 3072)),
    "linear 8192x4096->4096": ("linear", (8192, 4096, 4096)),
    "linear 4096x8192->8192": ("linear", (4096, 8192, 8192)),
    "sdpa causal 8x12x1024x64": ("sdpa", (8, 12, 1024, 64, True)),
    "sdpa causal 4x32x2048x128": ("sdpa", (4, 32, 2048, 128, True)),
    "sdpa full 16x16x512x64": ("sdpa", (16, 16, 512, 64, False)),
    "layernorm 2048x768": ("layernorm", (2048, 768)),
    "layernorm 8192x768": ("layernorm", (8192, 768)),
    "layernorm 8192x4096": ("layernorm", (8192, 4096)),
    "layernorm 32768x4096": ("layernorm", (32768, 4096)),
}
OPS_QUICK = {  # sizes a 2-core CPU runs in milliseconds
    "linear 16x512->512": ("linear", (16, 512, 512)),
    "linear 512x512->1024": ("linear", (512, 512, 1024)),
    "sdpa causal 2x4x128x32": ("sdpa", (2, 4, 128, 32, True)),
    "layernorm 512x512": ("layernorm", (512, 512)),
}


def build(kind: str, shape: tuple, device: str, dtype, seed: int = 0):
    """(module, example input) for one op; the module holds the op alone."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "linear":
        m, k, n = shape
        mod = nn.Linear(k, n)
        x = torch.randn(m, k, generator=g)
    elif kind == "layernorm":
        m, h = shape
        mod = nn.LayerNorm(h)
        x = torch.randn(m, h, generator=g)
    elif kind == "sdpa":
        b, h, s, d, causal = shape

        class Attention(nn.Module):
            def forward(self, qkv):
                q, k, v = qkv.unbind(0)
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        mod = Attention()
        x = torch.randn(3, b, h, s, d, generator=g)
    else:
        raise ValueError(f"unknown op kind {kind!r}")
    return mod.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


def predict(struct, cluster, precision: str) -> tuple[float, float]:
    """Sum of the solver's per-node forward / backward seconds for a one-op graph
    (``analyze``'d) on one device of ``cluster``."""
    from autopar.solvers.api import SolverOptions, check_constraints, default_registry, search

    cons = check_constraints(dict(dp=1, tp=1, pp=1, num_microbatches=1, recompute="none", zero=0,
                                  offload="none", schedule="none"))
    out = search(struct, default_registry(), cluster, precision=precision, optimizer="adam",
                 options=SolverOptions(), constraints=cons)
    cg, d = out.costed, out.decision
    dev = cg.stages[0].device
    fwd = sum(n.forward_s[dev][d.strategy[n.name]] for n in cg.nodes)
    both = sum(n.compute_s[dev][d.strategy[n.name]] for n in cg.nodes)
    return fwd, both - fwd


def _structure(kind: str, shape: tuple):
    """The one-op module captured (on the CPU, fp32: pricing reads shapes, not values) and
    analysed, as the solver sees a model."""
    import torch

    from autopar.graph import capture
    from autopar.solvers.api import analyze, default_registry

    mod, x = build(kind, shape, "cpu", torch.float32)
    return analyze(capture(mod, (x,)), default_registry())


def measure(mods, xs, reps: int, rounds: int) -> tuple[float, float]:
    """(forward s, backward s) per op: ``len(mods)`` independent copies of the op run one after
    another - forward, then one backward call over all their outputs - so the fixed cost of a
    ``backward()`` call (the autograd engine's start, ~50-100 us on a GPU) is shared as it is in
    a model's step, not charged to one op. Loops of ``reps`` such rounds are timed as a whole
    (CUDA events on a GPU, the host clock on a CPU); median over ``rounds`` loops after a
    warm-up loop."""
    import torch

    n = len(mods)
    cuda = xs[0].is_cuda
    xs = [x.detach().requires_grad_(True) for x in xs]
    with torch.no_grad():
        dys = [torch.randn_like(m(x)) for m, x in zip(mods, xs)]
    params = [p for m in mods for p in m.parameters()]

    def fwd():
        for m, x in zip(mods, xs):
            m(x)

    def fwd_bwd():
        for t in params + xs:
            t.grad = None
        torch.autograd.backward([m(x) for m, x in zip(mods, xs)], dys)

    def loop(fn) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps / n
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps / n

    out = []
    for fn in (fwd, fwd_bwd):
        loop(fn)  # warm-up: kernels chosen, allocator primed
        out.append(statistics.median(loop(fn) for _ in range(rounds)))
    f, fb = out
    return f, max(0.0, fb - f)


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas > 0 else math.nan


def run(profile_path: str, device: str, dtypes: list[str], ops: dict, reps: int, rounds: int,
        catalog: str | None, copies: int = 1) -> list[dict]:
    import torch

    from autopar.cost_model.cluster import Cluster, cluster_from_profile

    with open(profile_path) as f:
        cluster = cluster_from_profile(json.load(f), 1)
    ref = Cluster.parse(f"{catalog}x1") if catalog else None
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    structs = {label: _structure(kind, shape) for label, (kind, shape) in ops.items()}
    try:
        for dt in dtypes:
            precision = {"fp32": "fp32", "bf16": "bf16-mixed", "fp16": "fp16-mixed"}[dt]
            tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
            for label, (kind, shape) in ops.items():
                pf, pb = predict(structs[label], cluster, precision)
                cf, cb = predict(structs[label], ref, precision) if ref is not None else (math.nan, math.nan)
                built = [build(kind, shape, device, tdt, seed=i) for i in range(copies)]
                mf, mb = measure([b[0] for b in built], [b[1] for b in built], reps, rounds)
                del built
                rows.append(dict(op=label, dtype=dt, pred_fwd=pf, meas_fwd=mf, pred_bwd=pb, meas_bwd=mb,
                                 catalog_fwd=cf, catalog_bwd=cb))
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    return rows


def report(rows: list[dict], catalog: str | None) -> str:
    us = lambda s: f"{s * 1e6:9.1f}" if not math.isnan(s) else "      n/a"
    pc = lambda e: f"{e * 100:+6.0f}%" if not math.isnan(e) else "    n/a"
    head = (f"{'op':28s} {'dtype':5s} | {'pred fwd':>9s} {'meas fwd':>9s} {'err':>7s} | "
            f"{'pred bwd':>9s} {'meas bwd':>9s} {'err':>7s}")
    if catalog:
        head += f" | {catalog + ' sheet fwd':>15s} {'err':>7s}"
    lines = [head + "   (microseconds per call)", "-" * len(head)]
    errs = []
    for r in rows:
        ef, eb = _err(r["pred_fwd"], r["meas_fwd"]), _err(r["pred_bwd"], r["meas_bwd"])
        errs += [abs(e) for e in (ef, eb) if not math.isnan(e)]
        line = (f"{r['op']:28s} {r['dtype']:5s} | {us(r['pred_fwd'])} {us(r['meas_fwd'])} {pc(ef)} | "
                f"{us(r['pred_bwd'])} {us(r['meas_bwd'])} {pc(eb)}")
        if catalog:
            line += f" | {us(r['catalog_fwd']):>15s} {pc(_err(r['catalog_fwd'], r['meas_fwd']))}"
        lines.append(line)
    if errs:
        lines.append(f"mean absolute error over {len(errs)} forward/backward figures: "
                     f"{statistics.mean(errs) * 100:.1f}%, median {statistics.median(errs) * 100:.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", help="profile JSON of this machine (default: profile it now, --nproc 1)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (default fp32,bf16 "
                                                   "on a GPU, fp32 on a CPU)")
    ap.add_argument("--quick", action="store_true", help="small shapes (a CPU smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="rounds per timed loop (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="timed loops per op; the median is kept")
    ap.add_argument("--copies", type=int, default=None,
                    help="independent copies of each op per round, one backward call over all "
                         "(default 8 on a GPU, 1 on a CPU)")
    ap.add_argument("--catalog", default=None,
                    help="catalog kind to compare with on a GPU (default h100; 'none' to skip)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("op_accuracy: --device cuda but torch sees no CUDA device")
    dtypes = (args.dtypes or ("fp32,bf16" if gpu else "fp32")).split(",")
    catalog = None if args.catalog == "none" else (args.catalog or ("h100" if gpu else None))
    reps = args.reps or 5
    copies = args.copies or (8 if gpu else 1)
    ops = OPS_QUICK if args.quick else OPS_FULL
    if gpu:
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="autopar-op-accuracy-") as tmp:
        path = args.profile
        if path is None:
            from autopar.cost_model.profiler import profile

            path = os.path.join(tmp, "profile.json")
            t = time.perf_counter()
            profile(1, path, lambda s: print("  " + s, flush=True))
            print(f"profiled in {time.perf_counter() - t:.0f} s", flush=True)
        rows = run(path, device, dtypes, ops, reps, args.rounds, catalog, copies)
    print(report(rows, catalog))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
