"""Capture: nn.Module -> Graph, on both IR levels, without allocating weights."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
from autopar.graph import CaptureError, OpKind, capture


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln(x)).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + y.transpose(1, 2).contiguous().view(B, T, C)
        return x + self.fc2(F.gelu(self.fc1(x)))


class TinyLM(nn.Module):
    def __init__(self, layers=2, d=32, vocab=100, heads=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.h = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied: counted once

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.h:
            x = b(x)
        return self.head(x)


def test_fx_capture_specs_params_blocks_flops():
    torch.manual_seed(0)
    m = TinyLM()
    g = capture(m, (torch.randint(0, 100, (4, 16)),))
    assert g.ir == "fx"
    assert g.num_params == sum(p.numel() for p in m.parameters())
    assert g.param_aliases == {"head.weight": "emb.weight"}
    assert g.blocks == ("h.0", "h.1")
    fc1 = g.nodes["h_0_fc1"]
    assert fc1.kind is OpKind.LINEAR
    assert fc1.params == ("h.0.fc1.weight", "h.0.fc1.bias")
    assert fc1.outputs[0].shape == (4, 16, 128)
    assert fc1.outputs[0].nbytes == 4 * 16 * 128 * 4
    assert fc1.block == "h.0"
    assert fc1.flops == 2 * (4 * 16) * 32 * 128  # 2 FLOPs per multiply-add
    attn = [n for n in g.nodes.values() if n.kind is OpKind.ATTENTION]
    assert len(attn) == 2 and attn[0].flops == 2 * 2 * 4 * 4 * 16 * 16 * 8
    head = g.nodes["head"]
    assert head.params == ("emb.weight",) and head.block is None
    assert g.inputs[0].shape == (4, 16) and g.batch_size == 4
    nxg = g.to_networkx()
    assert nxg.has_edge("h_0_fc1", "gelu")


def test_fx_and_export_agree():
    m = TinyLM()
    x = torch.randint(0, 100, (2, 8))
    a = capture(m, (x,), ir="fx")
    b = capture(m, (x,), ir="export")
    assert b.ir == "export"
    assert a.num_params == b.num_params
    assert a.total_flops() == pytest.approx(b.total_flops())
    assert a.blocks == b.blocks
    kinds_a = sorted(n.kind.value for n in a.nodes.values() if n.kind in (OpKind.LINEAR, OpKind.ATTENTION))
    kinds_b = sorted(n.kind.value for n in b.nodes.values() if n.kind in (OpKind.LINEAR, OpKind.ATTENTION))
    assert kinds_a == kinds_b
    torch.testing.assert_close(a.gm(x), m(x))
    torch.testing.assert_close(b.gm(x), m(x))
    assert {n.block for n in b.nodes.values() if n.kind is OpKind.LINEAR} >= {"h.0", "h.1"}


def test_meta_model_and_meta_inputs_allocate_nothing():
    with torch.device("meta"):
        m = TinyLM(layers=3, d=64)
    g = capture(m, (torch.empty(8, 32, dtype=torch.long, device="meta"),))
    assert g.num_params == sum(p.numel() for p in m.parameters())
    assert g.nodes["head"].outputs[0].shape == (8, 32, 100)
    assert len(g.blocks) == 3


def test_fingerprint_changes_with_shapes():
    m = TinyLM()
    a = capture(m, (torch.randint(0, 100, (2, 8)),)).fingerprint()
    b = capture(m, (torch.randint(0, 100, (2, 8)),)).fingerprint()
    c = capture(m, (torch.randint(0, 100, (4, 8)),)).fingerprint()
    assert a == b != c


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:
            return y * 2
        return y


def test_capture_error_names_construct_and_line():
    with pytest.raises(CaptureError) as ei:
        capture(DataDependent(), (torch.randn(2, 4),))
    msg = str(ei.value)
    assert "DataDependent" in msg
    assert "test_capture.py" in msg and "if y.sum() > 0:" in msg
    assert "control flow" in msg and "torch.where" in msg


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(ValueError, match="ir must be"):
        capture(TinyLM(), (torch.randint(0, 100, (2, 8)),), ir="jit")
    with pytest.raises(ValueError, match="at least one example input"):
        capture(TinyLM(), ())


def test_public_api_exports_capture():
    assert autopar.capture is capture


transformers = pytest.importorskip("transformers")


def _hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    llama = LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64, use_cache=False))
    return {"gpt2": (gpt2, "transformer.h"), "llama": (llama, "model.layers")}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hugging_face_models_capture_via_export(name):
    torch.manual_seed(0)
    model, stack = _hf_models()[name]
    x = torch.randint(0, 1000, (2, 16))
    g = capture(model, (x,))
    assert g.ir == "export"  # symbolic_trace cannot read HF forward signatures
    assert g.num_params == sum(p.numel() for p in model.parameters())
    assert g.blocks == (f"{stack}.0", f"{stack}.1")
    linears = [n for n in g.nodes.values() if n.kind is OpKind.LINEAR]
    assert len(linears) >= 2 * 4 + 1
    assert all(n.params for n in linears)
    torch.testing.assert_close(g.gm(x).logits, model(x).logits)


def test_gpt3_175b_captures_on_meta_under_3gb():
    """GPT-3 175B (96 layers, d=12288, seq 2048) from the zoo, in a fresh process."""
    code = textwrap.dedent("""
        import resource, time, torch
        from autopar.models import gpt
        model, inputs = gpt.gpt3_175b()
        t = time.time()
        import autopar
        g = autopar.capture(model, inputs)
        n = sum(p.numel() for p in model.parameters())
        assert g.num_params == n, (g.num_params, n)
        assert len(g.blocks) == 96, len(g.blocks)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(n, peak, time.time() - t)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    n, peak, secs = out.stdout.split()
    assert 170e9 < int(n) < 180e9
    assert int(peak) < 3 * 1024**3, f"peak host memory {int(peak) / 2**30:.2f} GiB"


def test_saved_fraction_is_what_the_backward_keeps():
    """Measured at capture with autograd on fake tensors: a linear keeps its input (so the op
    producing it counts), GELU its input, the last linear's output is kept by nobody, views
    and adds keep nothing of their own, layer norm adds its small statistics."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(16)
            self.fc1 = nn.Linear(16, 64)
            self.fc2 = nn.Linear(64, 16)

        def forward(self, x):
            h = self.fc1(self.ln(x))
            y = self.fc2(F.gelu(h))
            return (x + y).reshape(-1)

    g = capture(Net(), torch.randn(8, 16))
    frac = {n.name: n.saved_fraction for n in g.nodes.values()}
    assert frac["fc1"] == 1.0  # gelu keeps its input
    assert frac["gelu"] == 1.0  # fc2 keeps its input
    assert frac["fc2"] == 0.0 and frac["add"] == 0.0 and frac["reshape"] == 0.0
    assert 1.0 < frac["ln"] < 1.2  # fc1 keeps its output, plus mean and rstd per row


def test_saved_bytes_count_a_storage_once_through_its_views():
    """Attention keeps q, k and v as views of the qkv projection: one storage, counted once,
    for the projection (an earlier model counted every op's output)."""
    g = capture(TinyLM(layers=1, d=32, heads=4), torch.randint(0, 100, (2, 8)))
    qkv = next(n for n in g.nodes.values() if n.name.endswith("qkv"))
    assert qkv.saved_fraction == 1.0
    views = [n for n in g.nodes.values() if n.kind is OpKind.VIEW]
    assert views and all(n.saved_fraction == 0.0 for n in views)
