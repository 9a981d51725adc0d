"""Offload on one GPU: train a model whose fp32 weights + Adam state are 2x the GPU memory allowed.

    python bench/gpu_offload.py [--profile FILE] [--layers 24 --d-model 2048] [--batch 4 --seq 1024]
                                [--ratio 2.0] [--steps 4]

Issue 5's GPU check. The model is GPT-3 XL's shape by default (24 layers, d_model 2048,
1.3 B parameters: 5.3 GB of fp32 weights, 10.5 GB of Adam moments). The GPU is allowed
``(weights + Adam state) / ratio`` bytes through ``torch.cuda.set_per_process_memory_fraction``
(the caching allocator raises out-of-memory beyond it), and the solver is told the same
capacity:

1. Profile this GPU (``autopar profile --nproc 1``) or read ``--profile``; the cluster is that
   profile's ``local:1`` with the device's memory set to the allowed bytes.
2. Ask the solver for a plan with offload forbidden (``offload="none"``): it must refuse (the
   weights and optimizer state alone exceed the device), which shows the model does not fit.
3. Ask for the free plan: the solver chooses the ZeRO stage, which classes go to host memory
   (optimizer state / gradients / weights), recomputation and activation offload per block.
4. Run that plan with the runtime on a 1-rank NCCL group (model built on the meta device and
   materialised per shard, so the host never holds a second copy), ``--steps`` steps after one
   warm-up step; print measured vs predicted step time, tokens/s, and the GPU's peak
   ``max_memory_allocated`` vs the allowed bytes and the plan's prediction.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time


def _cluster(profile_path: str, allowed: int):
    from autopar.cost_model.cluster import Cluster, cluster_from_profile

    with open(profile_path) as f:
        cl = cluster_from_profile(json.load(f), 1)
    g = cl.groups[0]
    if g.device.kind != "gpu":
        raise SystemExit(f"gpu_offload: the profile's device is a {g.device.kind}, not a GPU ({profile_path})")
    dev = g.device.replace(memory_bytes=int(allowed))
    return Cluster(name=cl.name, groups=(dataclasses.replace(g, device=dev),), inter_node_link=cl.inter_node_link)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", help="profile JSON of this GPU machine (default: profile it now)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=2.0, help="(weights + Adam state) / allowed GPU memory")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--trace", action="store_true",
                    help="after the timed steps, run one more under torch.profiler and print its top ops")
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        raise SystemExit("gpu_offload: needs a CUDA device")
    from autopar.graph import capture
    from autopar.models import gpt
    from autopar.runtime.apply import apply_plan
    from autopar.solvers.api import solve

    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the plan is fp32
    cfg = gpt.GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=args.heads,
                        d_model=args.d_model)
    with torch.device("meta"):
        model = gpt.GPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    state = n_params * (4 + 8)  # fp32 weights + Adam's two fp32 moments
    allowed = int(state / args.ratio)
    total = torch.cuda.get_device_properties(0).total_memory
    print(f"model: GPT {args.layers} layers x d_model {args.d_model}, {n_params / 1e9:.3f} B params; "
          f"weights + Adam state {state / 2**30:.2f} GiB; GPU allowed {allowed / 2**30:.2f} GiB "
          f"of {total / 2**30:.1f} GiB (ratio {args.ratio})", flush=True)
    torch.manual_seed(0)
    inputs = (torch.randint(0, cfg.vocab_size, (args.batch, args.seq)),)
    targets = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    graph = capture(model, inputs)

    with tempfile.TemporaryDirectory(prefix="autopar-gpu-offload-") as tmp:
        path = args.profile
        if path is None:
            from autopar.cost_model.profiler import profile

            path = os.path.join(tmp, "profile.json")
            profile(1, path, lambda s: print("  " + s, flush=True))
        cluster = _cluster(path, allowed)

    t = time.perf_counter()
    try:
        solve(graph, cluster, optimizer="adam", constraints={"offload": "none"}, model_name="gpt")
        print("without offload: the solver found a plan (the model fits?)")
        refused = None
    except Exception as e:  # noqa: BLE001 -- the expected outcome, shown
        refused = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"without offload: refused ({refused})")
    plan = solve(graph, cluster, optimizer="adam", model_name="gpt")
    solve_s = time.perf_counter() - t
    offl = sorted({o for p in plan.params for o in p.offload})
    zero = sorted({p.zero_stage for p in plan.params})
    rec = sum(b.recompute != "none" for b in plan.blocks)
    act = sum(bool(b.offload_activations) for b in plan.blocks)
    pred = plan.predicted
    pred_mem = max(pred.memory_per_device_bytes) if pred.memory_per_device_bytes else 0
    print(f"solver's plan ({solve_s:.1f} s for both solves): zero {zero}, offload {offl or '-'}, "
          f"recompute {rec} / activation offload {act} of {len(plan.blocks)} blocks, "
          f"{plan.pipeline.num_microbatches} microbatch(es); predicted {pred.step_time_s:.3f} s/step, "
          f"{pred_mem / 2**30:.2f} GiB", flush=True)

    torch.cuda.set_per_process_memory_fraction(allowed / total, 0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    loss_fn = gpt.loss_fn
    t = time.perf_counter()
    pm = apply_plan(graph, plan, seed=0)
    print(f"applied in {time.perf_counter() - t:.1f} s; GPU holds {torch.cuda.memory_allocated() / 2**30:.2f} GiB "
          f"after materialising", flush=True)
    factory = lambda ps: torch.optim.Adam(ps, lr=1e-4)  # noqa: E731
    opt_times: list[float] = []
    step_opt = pm._optimizer_step

    def timed_optimizer_step(opt):  # the host Adam step, timed apart (with its copies)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_opt(opt)
        torch.cuda.synchronize()
        opt_times.append(time.perf_counter() - t0)

    pm._optimizer_step = timed_optimizer_step
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = pm.train_step(inputs, targets, loss_fn, factory)
        losses.append(float(loss))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        print(f"  step {i}: {times[-1]:.3f} s, loss {losses[-1]:.4f}", flush=True)
    peak = torch.cuda.max_memory_allocated()
    step = statistics.median(times[1:])
    opt_s = statistics.median(opt_times[1:])
    tokens = args.batch * args.seq
    out = dict(params=n_params, state_bytes=state, allowed_bytes=allowed, gpu=torch.cuda.get_device_name(0),
               torch=torch.__version__, refused_without_offload=refused, zero=zero, offload=offl,
               recompute_blocks=rec, activation_offload_blocks=act, blocks=len(plan.blocks),
               predicted_step_s=pred.step_time_s, measured_step_s=step, step_times_s=times,
               tokens_per_s=tokens / step, peak_bytes=peak, predicted_peak_bytes=pred_mem, losses=losses,
               measured_optimizer_s=opt_s, predicted_breakdown_s=dict(
                   compute=pred.compute_s, communication=pred.communication_s, offload=pred.offload_s))
    print(f"measured {step:.3f} s/step (median of {args.steps}; predicted {pred.step_time_s:.3f}), "
          f"{tokens / step:.0f} tokens/s, {6 * n_params * tokens / step / 1e12:.1f} model TFLOP/s; "
          f"GPU peak {peak / 2**30:.2f} GiB of {allowed / 2**30:.2f} GiB allowed "
          f"(predicted {pred_mem / 2**30:.2f} GiB)")
    print(f"  of which the host optimizer step (with its copies) {opt_s:.3f} s, forward + backward "
          f"{step - opt_s:.3f} s; predicted compute {pred.compute_s:.3f} s, communication / host "
          f"copies + steps {pred.communication_s:.3f} s, exposed offload {pred.offload_s:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            pm.train_step(inputs, targets, loss_fn, factory)
            torch.cuda.synchronize()
        for key in ("self_cpu_time_total", "self_device_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=48))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
