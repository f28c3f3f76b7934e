"""Models nobody here wrote: Hugging Face GPT-2 (eager and sdpa attention) and
torch.nn.TransformerEncoder. Attention layers are found without being named, and the logits
thermo records match a plain recomputation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import thermo
from tests.reference import QKVCapture, Recorder, assert_close, grad_norm, logit_extremes


def hf_gpt2(impl: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation=impl,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.config._attn_implementation == impl
    return model


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_gpt2(impl):
    model = hf_gpt2(impl)
    model.train()
    therm = thermo.Thermometer(model, flush_every=2, attn_every=1)
    kinds = {layer.name: layer.kind for layer in therm.layers}
    assert [n for n, k in kinds.items() if k == "attention"] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert [n for n, k in kinds.items() if k == "block"] == ["transformer.h.0", "transformer.h.1"]
    assert kinds["transformer.h.0.mlp.c_fc"] == "module"  # GPT-2's Conv1D counts as a linear layer
    watched = [n for n, k in kinds.items() if k != "attention"]
    ref = Recorder(model, watched, grad_names=["transformer.h.0", "transformer.h.1"])
    qkv = QKVCapture(model, ["transformer.h.0.attn", "transformer.h.1.attn"], n_head=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    records, expected = [], []
    for _ in range(2):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        expected.append((ref.take(), qkv.take(), grad_norm(model)))
        records += therm.step(loss)
        opt.step()
        opt.zero_grad()
    therm.close()
    assert len(records) == 2
    for rec, (acts, logits, gn) in zip(records, expected):
        assert_close(rec.scalars["grad_norm"], gn, 1e-5, "grad_norm")
        for key, want in acts.items():
            assert_close(rec.layers[key], want, 1e-7, str(key))
        for name, (mx, mn) in logits.items():
            assert_close(rec.layers[(name, "attn_max")], mx, 1e-5, f"{impl} {name} max")
            assert_close(rec.layers[(name, "attn_min")], mn, 1e-5, f"{impl} {name} min")
            if impl == "sdpa":
                assert rec.layers[(name, "attn_bound")] >= max(abs(mx), abs(mn))


def test_transformer_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    therm = thermo.Thermometer(model, flush_every=1, attn_every=1)
    kinds = {layer.name: layer.kind for layer in therm.layers}
    assert [n for n, k in kinds.items() if k == "attention"] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert [n for n, k in kinds.items() if k == "block"] == ["layers.0", "layers.1"]

    # Reference: rebuild q, k from each MultiheadAttention's input and in-projection.
    captured = {}

    def capture(name):
        def pre(mod, args, kwargs):
            x = args[0].detach().double()
            w, b = mod.in_proj_weight.detach().double(), mod.in_proj_bias.detach().double()
            q = (x @ w[:32].T + b[:32]).view(2, 10, 4, 8).transpose(1, 2)
            k = (x @ w[32:64].T + b[32:64]).view(2, 10, 4, 8).transpose(1, 2)
            captured[name] = logit_extremes(q, k, 8**-0.5, causal=True)

        return pre

    for i, l in enumerate(model.layers):
        l.self_attn.register_forward_pre_hook(capture(f"layers.{i}.self_attn"), with_kwargs=True)
    mask = nn.Transformer.generate_square_subsequent_mask(10)
    x = torch.randn(2, 10, 32)
    out = model(x, mask=mask, is_causal=True)
    out.square().mean().backward()
    (rec,) = therm.step()
    therm.close()
    for name, (mx, mn) in captured.items():
        assert_close(rec.layers[(name, "attn_max")], mx, 1e-5, f"{name} max")
        assert_close(rec.layers[(name, "attn_min")], mn, 1e-5, f"{name} min")
