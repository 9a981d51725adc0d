"""Offload on a real GPU: ZeRO-Offload / ZeRO-Infinity plans give one device's numbers, and the
offloaded tensors really leave GPU memory. Skipped without CUDA (CI has none; run on a lent GPU
with ``pytest -m gpu tests/test_gpu_offload.py``).

On a CPU the host is the device and these plans are no-op copies (tests/test_runtime_exactness.py
runs them there); here the weights live in pinned host memory and are copied in at each use, the
gradients come back to the host as autograd finishes them, and Adam steps on the host."""
import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 3
OFFLOADS = {
    "none": (),
    "optimizer": ("optimizer_state",),
    "grads": ("grads", "optimizer_state"),
    "params": ("params", "grads", "optimizer_state"),
}


@pytest.fixture(scope="module")
def group():
    import torch.distributed as dist

    torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 is fp32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    dist.destroy_process_group()


def _gpt(n_layer=2, d_model=16, vocab=64, block=8, batch=8):
    from autopar.models import gpt

    torch.manual_seed(1234)
    cfg = gpt.GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=2, d_model=d_model,
                        tie_embeddings=False)
    model = gpt.GPT(cfg)
    inputs = (torch.randint(0, vocab, (batch, block)),)
    return model, inputs, gpt.make_targets(model, inputs), gpt.loss_fn


def _plan(graph, offload, recompute=False, microbatches=1):
    from autopar.runtime.testing import make_plan

    zero = 3 if "params" in offload else 0
    return make_plan(graph, "fsdp" if zero else "dp", 1, offload=offload, zero_stage=zero,
                     recompute=recompute, microbatches=microbatches)


def _reference(model, inputs, targets, loss_fn):
    m = copy.deepcopy(model).cuda()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, y = inputs[0].cuda(), targets.cuda()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().cpu())
    return losses, {k: v.detach().cpu() for k, v in m.named_parameters()}


@pytest.mark.parametrize("kind", sorted(OFFLOADS))
@pytest.mark.parametrize("recompute", [False, True])
def test_offload_plans_match_one_gpu(group, kind, recompute):
    from autopar.graph import capture
    from autopar.runtime.apply import apply_plan

    model, inputs, targets, loss_fn = _gpt()
    ref_losses, ref_params = _reference(model, inputs, targets, loss_fn)
    graph = capture(model, inputs)
    pm = apply_plan(graph, _plan(graph, OFFLOADS[kind], recompute=recompute, microbatches=2))
    factory = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    losses = [pm.train_step(inputs, targets, loss_fn, factory) for _ in range(STEPS)]
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        torch.testing.assert_close(a.detach().cpu(), b, msg=lambda m, i=i: f"{kind}: loss at step {i}: {m}")
    full = pm.full_state_dict()
    for k, ref in ref_params.items():
        # Adam's m/sqrt(v) turns summation-order noise of near-zero grads into up to +-lr:
        # the tolerance of runtime.exactness for Adam (5 % of one lr=1e-2 step)
        torch.testing.assert_close(full[graph.param_aliases.get(k, k)], ref, atol=5e-4, rtol=5e-4,
                                   msg=lambda m, k=k: f"{kind}: param {k}: {m}")
    where = {f: p._local_tensor.device.type for f, p in pm.local_params.items()}
    if "params" in OFFLOADS[kind]:
        assert set(where.values()) == {"cpu"}, where
        assert all(p._local_tensor.is_pinned() for p in pm.local_params.values())
    else:
        assert set(where.values()) == {"cuda"}, where
    if "optimizer_state" in OFFLOADS[kind]:
        states = [t for s in pm._opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
        assert states and all(t.device.type == "cpu" for t in states)
    if "grads" in OFFLOADS[kind]:  # no gradient is left on the device after a step
        assert all(p.grad is None or p.grad._local_tensor.device.type == "cpu" for p in pm.local_params.values())


def test_params_offload_keeps_the_weights_off_the_gpu(group):
    """A model whose weights + grads + Adam state are 4x its activations: with everything
    offloaded the GPU peak stays below the weights alone; without, it holds them all."""
    from autopar.graph import capture
    from autopar.runtime.apply import apply_plan

    model, inputs, targets, loss_fn = _gpt(n_layer=4, d_model=1024, vocab=1024, block=64, batch=4)
    weights = sum(p.numel() * 4 for p in model.parameters())
    graph = capture(model, inputs)
    factory = lambda ps: torch.optim.Adam(ps, lr=1e-3)  # noqa: E731
    peaks = {}
    for kind in ("none", "params"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        pm = apply_plan(graph, _plan(graph, OFFLOADS[kind]))
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            pm.train_step(inputs, targets, loss_fn, factory)
        torch.cuda.synchronize()
        peaks[kind] = torch.cuda.max_memory_allocated() - base
        del pm
    assert peaks["none"] >= 3 * weights, peaks  # weights, grads, 2 Adam moments
    assert peaks["params"] < weights / 2, (peaks, weights)


def test_checkpoint_from_host_held_weights_loads_under_another_plan(group, tmp_path):
    """Save under the ZeRO-Infinity plan (weights in host memory), load under a plain one."""
    from autopar.graph import capture
    from autopar.runtime.apply import apply_plan
    from autopar.runtime.checkpoint import load_checkpoint, save_checkpoint

    model, inputs, targets, loss_fn = _gpt()
    ref_losses, ref_params = _reference(model, inputs, targets, loss_fn)
    graph = capture(model, inputs)
    pm = apply_plan(graph, _plan(graph, OFFLOADS["params"]))
    factory = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    for _ in range(STEPS - 1):
        pm.train_step(inputs, targets, loss_fn, factory)
    save_checkpoint(pm, pm._opt, str(tmp_path / "ck"))
    pm2 = apply_plan(graph, _plan(graph, OFFLOADS["none"]))
    opt2 = torch.optim.Adam(pm2.optimizer_params(), lr=1e-2)
    load_checkpoint(pm2, opt2, str(tmp_path / "ck"))
    loss = pm2.train_step(inputs, targets, loss_fn, opt2)
    torch.testing.assert_close(loss.detach().cpu(), ref_losses[-1])
    full = pm2.full_state_dict()
    for k, ref in ref_params.items():
        torch.testing.assert_close(full[graph.param_aliases.get(k, k)], ref, atol=5e-4, rtol=5e-4,
                                   msg=lambda m, k=k: f"param {k}: {m}")
