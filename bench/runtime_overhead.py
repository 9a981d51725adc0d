"""Runtime overhead: autopar's plans vs the hand-written PyTorch equivalent, side by side.

    python bench/runtime_overhead.py [--nproc 2] [--steps 10] [--width 1024] [--layers 4] [--batch 256]

Two comparisons, both measured in the same job on the same processes, same model, same data:

1. data parallel: autopar ``dp`` plan vs ``torch.nn.parallel.DistributedDataParallel``;
2. tensor parallel: autopar ``tp`` plan vs ``parallelize_module`` with ColwiseParallel /
   RowwiseParallel on the same Linear pairs (Megatron layout, the one make_plan writes).

Model: an MLP of ``layers`` Linear(width, width) + GELU (pairs for tp). Time per training
step (forward, backward, grad sync, Adam) is the median over ``steps`` steps after 3 warm-up
steps; runs alternate between the two implementations step by step so machine noise hits both.
Prints the table and the ratio autopar / hand-written (target <= 1.05).
"""
from __future__ import annotations

import argparse
import os
import sys


def _mlp(width: int, layers: int):
    import torch.nn as nn

    mods = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.GELU())
    return nn.Sequential(*mods)


def _eager_step(module, opt, x, y):
    """One hand-written training step (MSE loss) of ``module`` with ``opt``, as a closure."""
    import torch.nn.functional as F

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(module(x), y).backward()
        opt.step()
    return step


def worker(args) -> None:
    import copy

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from autopar.graph import capture
    from autopar.runtime.apply import apply_plan
    from autopar.runtime.mesh import init_distributed
    from autopar.runtime.testing import make_plan

    init_distributed("cpu")
    ws, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = _mlp(args.width, args.layers)
    x = torch.randn(args.batch, args.width)
    y = torch.randn(args.batch, args.width)
    graph = capture(model, (x,))
    results = {}

    # --- data parallel
    pm = apply_plan(graph, make_plan(graph, "dp", ws))
    factory = lambda ps: torch.optim.Adam(ps, lr=1e-4)  # noqa: E731
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(copy.deepcopy(model))
    ddp_opt = torch.optim.Adam(ddp.parameters(), lr=1e-4)
    xs, ys = x.chunk(ws)[rank], y.chunk(ws)[rank]

    ddp_step = _eager_step(ddp, ddp_opt, xs, ys)

    def ap_dp_step():
        pm.train_step((x,), y, F.mse_loss, factory)

    results["dp"] = _compare(ap_dp_step, ddp_step, args.steps)

    # --- tensor parallel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    pm_tp = apply_plan(graph, make_plan(graph, "tp", ws))
    tp_mesh = init_device_mesh("cpu", (ws,))
    hand = copy.deepcopy(model)
    linears = [i for i, m in enumerate(hand) if isinstance(m, torch.nn.Linear)]
    plan = {}
    for k, i in enumerate(linears):
        if k % 2 == 0 and k + 1 < len(linears):
            plan[str(i)] = ColwiseParallel()
        elif k % 2 == 1:
            plan[str(i)] = RowwiseParallel()
        else:
            plan[str(i)] = ColwiseParallel(use_local_output=True)
    # last odd-one-out colwise layer: gather its output like autopar's colwise_gather does
    if len(linears) % 2 == 1:
        from torch.distributed.tensor import Replicate

        plan[str(linears[-1])] = ColwiseParallel(output_layouts=Replicate())
    hand = parallelize_module(hand, tp_mesh, plan)
    hand_opt = torch.optim.Adam(hand.parameters(), lr=1e-4)

    hand_tp_step = _eager_step(hand, hand_opt, x, y)

    def ap_tp_step():
        pm_tp.train_step((x,), y, F.mse_loss, factory)

    results["tp"] = _compare(ap_tp_step, hand_tp_step, args.steps)

    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"runtime overhead: MLP {args.layers} x Linear({args.width},{args.width}) ({n_params / 1e6:.1f}M params), "
              f"global batch {args.batch}, {ws} gloo CPU processes, median of {args.steps} steps")
        print(f"{'plan':<6}{'autopar ms':>12}{'hand-written ms':>18}{'ratio':>8}  reference")
        refs = {"dp": "DistributedDataParallel", "tp": "parallelize_module Colwise/Rowwise"}
        for k, (a, h) in results.items():
            print(f"{k:<6}{a * 1e3:>12.2f}{h * 1e3:>18.2f}{a / h:>8.3f}  {refs[k]}")
    dist.destroy_process_group()


def _compare(a_step, b_step, steps: int) -> tuple[float, float]:
    """Median step time of a and b, warmed up, measured alternately step by step.

    Alternating single steps puts both under the same background load (the machine is shared),
    and the median drops the steps a neighbour's burst hit.
    """
    from autopar.runtime.testing import timed_steps

    for _ in range(3):
        a_step()
        b_step()
    ta, tb = [], []
    for _ in range(steps):
        ta += timed_steps(a_step, 1)
        tb += timed_steps(b_step, 1)
    ta.sort()
    tb.sort()
    return ta[len(ta) // 2], tb[len(tb) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker or "RANK" in os.environ:
        worker(args)
        from autopar.runtime.mesh import exit_worker

        exit_worker()
    from autopar.runtime.testing import run_workers

    argv2 = [a for a in (argv if argv is not None else sys.argv[1:])] + ["--worker"]
    outs = run_workers(os.path.abspath(__file__), args.nproc, argv2, timeout_s=590)
    print(outs[0], end="")


if __name__ == "__main__":
    main()
