"""The exactness check: a plan on N ranks vs one process, step by step.

Run on every rank (``python -m autopar.runtime.exactness CASE [CASE ...]`` under
:func:`autopar.runtime.testing.run_workers` or torchrun). A CASE is
``model:kind[:option=value,...]``, e.g. ``mlp:dp``, ``gpt:pp_dp:schedule=1f1b,mb=2``,
``mlp:fsdp:ckpt=tp`` (train 2 steps under fsdp, save a checkpoint, load it under a tp plan,
train the 3rd step there). Every rank trains the same model on one process as the reference
(tiny models: this is cheap) and compares, with ``torch.testing.assert_close`` defaults for
fp32: the loss after each of 3 optimizer steps and every parameter after the last.

Rank 0 prints one JSON line per case: ``{"case", "ok", "error", "loss_err", "param_err"}``.
Cases share one process group, so several plan kinds cost one spawn.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

from autopar.graph import capture
from autopar.runtime.apply import apply_plan
from autopar.runtime.testing import make_plan

STEPS = 3
LR = 1e-2
# The default optimizer is SGD with momentum (it has state, so checkpoints carry optimizer
# state too): parameters then follow the gradients linearly and are compared with
# assert_close's fp32 defaults. With Adam (``opt=adam``) a gradient entry near zero turns fp32
# summation-order noise (tensor parallel adds partial products in another order) into an
# update of up to +-lr (m/sqrt(v) flips sign), so Adam cases use atol=rtol=5e-4 (5% of one
# lr=1e-2 step; a wrong gradient moves parameters by ~lr). Losses always use the defaults.
TOLERANCE = {"sgd": {}, "adam": {"atol": 5e-4, "rtol": 5e-4}}


def build_model(name: str):
    """(model, inputs, targets, loss_fn) for a tiny model, identical on every rank (seeded)."""
    torch.manual_seed(1234)
    if name in ("gpt", "gpt_tied"):  # untied by default: pipelines refuse weights tied across stages
        from autopar.models import gpt

        cfg = gpt.GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, d_model=16,
                            tie_embeddings=(name == "gpt_tied"))
        model = gpt.GPT(cfg)
        inputs = (torch.randint(0, cfg.vocab_size, (8, cfg.block_size)),)
        return model, inputs, gpt.make_targets(model, inputs), gpt.loss_fn
    if name.startswith("hf_"):
        return build_hf(name[3:])
    from autopar.models import ZOO

    if name in ZOO:
        e = ZOO[name]
        model, inputs = e.build("tiny", batch_size=8)
        return model, inputs, e.make_targets(model, inputs), e.loss_fn
    raise KeyError(f"unknown test model {name!r}")


def make_optimizer(params, kind: str = "sgd"):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR * 10, momentum=0.9)
    return torch.optim.Adam(params, lr=LR)


def build_hf(kind: str):
    """Hugging Face GPT-2 / LLaMA at a small config, returning logits only (captured via export)."""
    import torch.nn.functional as F
    import transformers

    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        inner = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                       max_position_embeddings=8)
        inner = transformers.LlamaForCausalLM(cfg)
    else:
        raise KeyError(kind)
    inner.config.use_cache = False

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, idx):
            return self.m(input_ids=idx, use_cache=False).logits

    model = Logits(inner).eval()  # no dropout either way
    idx = torch.randint(0, 64, (8, 8))
    tgt = torch.randint(0, 64, (8, 8))
    return model, (idx,), tgt, lambda out, y: F.cross_entropy(out.flatten(0, -2), y.flatten())


def train_plainly(module, opt, inputs, targets, loss_fn, steps: int) -> list:
    """The user's own loop: ``module(x)``, ``loss.backward()``, ``opt.step()``; the losses."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(module(*inputs), targets)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def reference(model, inputs, targets, loss_fn, steps: int = STEPS, opt_kind: str = "sgd"):
    import copy

    m = copy.deepcopy(model)
    losses = train_plainly(m, make_optimizer(m.parameters(), opt_kind), inputs, targets, loss_fn, steps)
    out = {k: v.detach() for k, v in m.named_parameters()}
    # batch-norm running statistics, which a training step also updates
    out.update({f"buffer:{k}": v.detach().clone() for k, v in m.named_buffers() if v.is_floating_point()})
    return losses, out


def parse_case(case: str) -> tuple[str, str, dict]:
    parts = case.split(":")
    opts = {}
    if len(parts) > 2 and parts[2]:
        for kv in parts[2].split(","):
            k, _, v = kv.partition("=")
            opts[k] = v
    return parts[0], parts[1], opts


#: ``offload=`` in a case: 1 = optimizer state (ZeRO-Offload); grads / params add the gradients,
#: then the weights (ZeRO-Infinity; on a CPU the host is the device, so these check the plan runs)
_OFFLOAD = {"1": True, "grads": ("grads", "optimizer_state"), "params": ("params", "grads", "optimizer_state")}


def _plan(graph, kind, ws, opts):
    if kind == "solver":  # the solver's own choice for local:<ws>
        from autopar.solvers.api import solve

        cons = {k: int(opts[o]) for o, k in (("mb", "num_microbatches"), ("dp", "dp"), ("tp", "tp"),
                                              ("pp", "pp"), ("zero", "zero")) if o in opts} or None
        return solve(graph, f"local:{ws}", optimizer="sgd" if opts.get("opt", "sgd") == "sgd" else "adam",
                     constraints=cons)
    return make_plan(
        graph, kind, ws,
        schedule=opts.get("schedule"),
        microbatches=int(opts.get("mb", 1)),
        recompute=opts.get("recompute") == "1",
        offload=_OFFLOAD.get(opts.get("offload", ""), False),
        zero_stage=int(opts["zero"]) if "zero" in opts else None,
        virtual_stages=int(opts.get("v", 1)),
        vocab_partial=opts.get("vocab_partial") == "1",
        optimizer="sgd" if opts.get("opt", "sgd") == "sgd" else "adam",
    )


def run_case(case: str, ckpt_root: str) -> dict:
    name, kind, opts = parse_case(case)
    if "expect" in opts:  # a plan/use the runtime must refuse, with a message naming the fix
        try:
            _run_case(case, name, kind, {k: v for k, v in opts.items() if k != "expect"}, ckpt_root)
        except Exception as e:  # noqa: BLE001
            if opts["expect"] in str(e):
                return {"case": case, "ok": True, "refused": str(e)[:300]}
            raise
        raise AssertionError(f"expected an error mentioning {opts['expect']!r}; the case ran")
    if "bucket" in opts:  # dp gradient buckets of this many bytes: many buckets, launched apart
        import autopar.runtime.apply as apply_mod

        saved = apply_mod.BUCKET_BYTES, apply_mod.FIRST_BUCKET_BYTES
        apply_mod.BUCKET_BYTES = apply_mod.FIRST_BUCKET_BYTES = int(opts["bucket"])
        try:
            return _run_case(case, name, kind, opts, ckpt_root)
        finally:
            apply_mod.BUCKET_BYTES, apply_mod.FIRST_BUCKET_BYTES = saved
    return _run_case(case, name, kind, opts, ckpt_root)


def _run_case(case: str, name: str, kind: str, opts: dict, ckpt_root: str) -> dict:
    ws = dist.get_world_size()
    model, inputs, targets, loss_fn = build_model(name)
    opt_kind = opts.get("opt", "sgd")
    seed = None
    if opts.get("meta") == "1":  # built on meta: shards initialised per module, like materialize()
        import copy

        from autopar.runtime.apply import materialize

        model = copy.deepcopy(model).to("meta")  # as if built under torch.device("meta")
        seed = 7
        graph = capture(model, inputs)
        model = materialize(copy.deepcopy(model), seed=seed)  # the unsharded reference
    else:
        graph = capture(model, inputs)
    ref_losses, ref_params = reference(model, inputs, targets, loss_fn, opt_kind=opt_kind)
    plan = _plan(graph, kind, ws, opts)
    pm = apply_plan(graph, plan, seed=seed)
    factory = lambda ps: make_optimizer(ps, opt_kind)  # noqa: E731
    step_kw = {"loss_over": opts["loss"]} if "loss" in opts else {}
    from autopar.runtime.checkpoint import load_checkpoint, save_checkpoint

    def path_of(tag: str) -> str:
        return os.path.join(ckpt_root, tag)

    if opts.get("probe") == "1":  # DTensor really leaves Partial grads for the runtime to reduce
        pm._defer_sync = True
        loss_fn(pm._forward_dt(inputs).to_local(), pm._shard_batch(targets)).backward()
        pm._defer_sync = False
        partial = [f for f, p in pm.local_params.items() if p.grad is not None and p.grad.placements[0].is_partial()]
        if not partial:
            raise AssertionError("expected Partial (pending dp sum) grads before sync_grads; got none")
        for p in pm.local_params.values():
            p.grad = None
    if opts.get("resharded") == "1":  # ZeRO-3: no gathered parameter outlives the forward
        import gc
        import time

        out = pm._forward_dt(inputs)
        gathered = [ex._zero3 for ex in pm.executors.values() if ex._zero3 is not None]
        # the communication thread may hold the last all-gather's output a moment after the
        # wait (a loaded host made this case fail once with lm_head.weight): give it a second
        deadline = time.monotonic() + 1.0
        while any(z.live for z in gathered) and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        alive = sorted({f for z in gathered for f in z.live.values()})
        bad = torch.tensor([float(not gathered or bool(alive))])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank fails together: no hung peer
        if float(bad) > 0:
            raise AssertionError(f"after the forward, gathered ZeRO-3 parameters alive: "
                                 f"{alive or ('no ZeRO-3' if not gathered else 'on another rank')}")
        del out
    losses = []
    ref_steps = list(range(STEPS))
    if "load" in opts:  # resume a checkpoint another job (maybe another world size) saved
        with torch.no_grad():  # scramble: the load must overwrite every parameter
            for p in pm.local_params.values():
                p.detach().fill_(0.5)
        opt = make_optimizer(pm.optimizer_params(), opt_kind)
        load_checkpoint(pm, opt, path_of(opts["load"]))
        losses.append(pm.train_step(inputs, targets, loss_fn, opt))
        ref_steps = [STEPS - 1]
    elif opts.get("plain") == "1":  # the user's own loop: model(x), loss.backward(), optimizer.step()
        losses = train_plainly(pm, make_optimizer(pm.parameters(), opt_kind), inputs, targets, loss_fn, STEPS)
    else:
        n = STEPS - 1 if ("ckpt" in opts or "save" in opts) else STEPS
        for _ in range(n):
            losses.append(pm.train_step(inputs, targets, loss_fn, factory, **step_kw))
        if "save" in opts:
            save_checkpoint(pm, pm._opt, path_of(opts["save"]))
            ref_steps = ref_steps[:n]
        if "ckpt" in opts:  # save, load under another plan on the same ranks, one more step
            path = path_of(case.replace(":", "_").replace(",", "_").replace("=", "-"))
            save_checkpoint(pm, pm._opt, path)
            pm2 = apply_plan(graph, _plan(graph, opts["ckpt"], ws, {}))
            with torch.no_grad():
                for p in pm2.local_params.values():
                    p.detach().fill_(0.5)
            opt2 = make_optimizer(pm2.optimizer_params(), opt_kind)
            load_checkpoint(pm2, opt2, path)
            losses.append(pm2.train_step(inputs, targets, loss_fn, opt2))
            pm = pm2
    if "bucket" in opts:
        buckets = sum(len(b.members) for b in pm._bucket_sets.values())
        if buckets < 2:
            raise AssertionError(f"bucket={opts['bucket']}: expected several gradient buckets, got {buckets}")
    # grads are left in each parameter's storage placement (a dp-replicated weight's grad comes
    # out of DTensor Partial on dp; sync_grads must have all-reduced it)
    for fqn, p in pm.local_params.items():
        if p.grad is not None and tuple(p.grad.placements) != tuple(p.placements):
            raise AssertionError(f"param {fqn}: grad placements {p.grad.placements} != param {p.placements}")
    ref_losses = [ref_losses[i] for i in ref_steps]
    if "save" in opts:  # parameters are compared after the 3rd step, in the loading job
        ref_params = reference(model, inputs, targets, loss_fn, steps=len(ref_steps), opt_kind=opt_kind)[1]
    full = pm.full_state_dict()
    loss_err = max(abs(float(a) - float(b)) for a, b in zip(losses, ref_losses))
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        torch.testing.assert_close(torch.as_tensor(float(a)), b.float(), msg=lambda m, i=i: f"loss at step {i}: {m}")
    param_err = 0.0
    for k, ref in ref_params.items():
        if k.startswith("buffer:"):  # running statistics: same as one device (not checkpointed)
            name = k[len("buffer:"):]
            if any(o in opts for o in ("load", "ckpt", "save")) or name not in dict(pm.gm.named_buffers()):
                continue
            got = pm.gm.get_buffer(name)
            got = (got.full_tensor() if hasattr(got, "full_tensor") else got).detach().cpu()
            torch.testing.assert_close(got, ref, **TOLERANCE[opt_kind], msg=lambda m, k=k: f"{k}: {m}")
            continue
        k2 = graph.param_aliases.get(k, k)
        got = full[k2]
        param_err = max(param_err, float((got - ref).abs().max()))
        torch.testing.assert_close(got, ref, **TOLERANCE[opt_kind],
                                   msg=lambda m, k=k: f"param {k}: {m}")
    # every rank reports the same loss
    t = torch.tensor([float(losses[-1])], device=pm.device)
    mx, mn = t.clone(), t.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    dist.all_reduce(mn, op=dist.ReduceOp.MIN)
    if float(mx - mn) > 0:
        raise AssertionError(f"ranks report different losses: {float(mn)} .. {float(mx)}")
    return {"case": case, "ok": True, "loss_err": loss_err, "param_err": param_err}


def main(cases: list[str]) -> None:
    from autopar.runtime.mesh import init_distributed

    init_distributed("cpu")
    if os.environ.get("AUTOPAR_DEBUG_HANG_S"):  # dump every thread's stack if a case hangs
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["AUTOPAR_DEBUG_HANG_S"]), exit=True)
    root = [os.environ.get("AUTOPAR_TEST_CKPT") or
            (tempfile.mkdtemp(prefix="autopar-ckpt-") if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(root, src=0)  # one directory shared by all ranks
    ckpt_root = root[0]
    for case in cases:
        try:
            res = run_case(case, ckpt_root)
        except Exception as e:  # reported per case; the pytest side asserts
            res = {"case": case, "ok": False, "error": f"{type(e).__name__}: {e}",
                   "trace": traceback.format_exc()[-3000:]}
            print(f"[rank {dist.get_rank()}] case {case} failed:\n{traceback.format_exc()}", file=sys.stderr,
                  flush=True)
        dist.barrier()
        if dist.get_rank() == 0:
            print(json.dumps(res), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from autopar.runtime.mesh import exit_worker

    main(sys.argv[1:])
    exit_worker()
