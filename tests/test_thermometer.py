"""Thermometer: every recorded value equals a plain recomputation; no host sync between
flushes; removable; works under torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import thermo
from tests.reference import QKVCapture, Recorder, assert_close, grad_norm, logit_extremes
from thermo.gpt import GPT, GPTConfig


def tiny_gpt(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def batches(n, B=4, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (B, T + 1), generator=g) for _ in range(n)]


def train(model, therm, data, autocast=None, on_step=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    records = []
    for i, b in enumerate(data):
        x, y = b[:, :-1], b[:, 1:]
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            _, loss = model(x, y)
        loss.backward()
        if on_step is not None:
            on_step(i, loss)
        records += therm.step(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    records += therm.flush()
    return records


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_value_matches_plain_recomputation(tmp_path, attn_impl, dtype):
    model = tiny_gpt(attn_impl=attn_impl)
    therm = thermo.Thermometer(model, run_dir=tmp_path, flush_every=3, attn_every=2)
    watched = [layer.name for layer in therm.layers if layer.kind != "attention"]
    blocks = [layer.name for layer in therm.layers if layer.kind == "block"]
    attn = [layer.name for layer in therm.layers if layer.kind == "attention"]
    assert blocks == ["h.0", "h.1"] and attn == ["h.0.attn", "h.1.attn"]
    assert {"wte", "wpe", "ln_emb", "h.0.attn.c_attn", "h.1.mlp.c_fc", "ln_f", "lm_head"} <= set(watched)
    ref = Recorder(model, watched, grad_names=blocks)
    qkv = QKVCapture(model, attn, n_head=4)
    expected = {}

    def on_step(i, loss):
        expected[i] = (ref.take(), qkv.take(), grad_norm(model), loss.item())

    records = train(model, therm, batches(7), autocast=dtype, on_step=on_step)
    therm.close()
    # sdpa logits are recomputed in fp32 from q, k; explicit ones are the model's own softmax
    # input, which under bf16 autocast is a bf16 matmul: equal to bf16 rounding.
    logit_rel = 2**-7 if (dtype is torch.bfloat16 and attn_impl == "explicit") else 1e-5
    assert [r.step for r in records] == list(range(7))
    for rec in records:
        acts, logits, gn, loss = expected[rec.step]
        assert_close(rec.scalars["loss"], loss, 1e-7, "loss")
        assert_close(rec.scalars["grad_norm"], gn, 1e-5, "grad_norm")
        assert rec.scalars["grad_nonfinite"] == 0
        for key, want in acts.items():
            assert_close(rec.layers[key], want, 1e-7, f"step {rec.step} {key}")
        assert {k for k in rec.layers if k[1] == "grad_max"} == {(b, "grad_max") for b in blocks}
        for name, (mx, mn) in logits.items():
            if rec.step % 2 == 0:  # sampled step: exact logits
                assert_close(rec.layers[(name, "attn_max")], mx, logit_rel, f"step {rec.step} {name} max")
                assert_close(rec.layers[(name, "attn_min")], mn, logit_rel, f"step {rec.step} {name} min")
            else:
                assert (name, "attn_max") not in rec.layers
            if attn_impl == "sdpa":
                bound = rec.layers[(name, "attn_bound")]
                assert bound >= max(abs(mx), abs(mn)) * (1 - 1e-6)
            else:
                assert (name, "attn_bound") not in rec.layers  # no q, k to bound from
    # The store holds exactly what step() returned.
    run = thermo.load(tmp_path)
    assert list(run.scalars["step"]) == list(range(7))
    stored = run.layers.set_index(["step", "layer", "stat"])["value"]
    for rec in records:
        for (layer, stat), v in rec.layers.items():
            assert stored[(rec.step, layer, stat)] == pytest.approx(v, rel=0, abs=0)


def test_attention_bound_is_the_norm_product(tmp_path):
    model = tiny_gpt()
    therm = thermo.Thermometer(model, flush_every=1, attn_every=0)
    captured = []
    h = model.h[0].attn.c_attn.register_forward_hook(lambda m, a, o: captured.append(o.detach()))
    (rec,) = train(model, therm, batches(1))
    h.remove()
    q, k, _ = captured[0].split(32, dim=2)
    q = q.view(4, 16, 4, 8).transpose(1, 2).double()
    k = k.view(4, 16, 4, 8).transpose(1, 2).double()
    want = (q.norm(dim=-1).amax(-1) * k.norm(dim=-1).amax(-1)).max().item() * 8**-0.5
    assert_close(rec.layers[("h.0.attn", "attn_bound")], want, 1e-6, "bound")
    assert ("h.0.attn", "attn_max") not in rec.layers  # attn_every=0: never exact


def test_per_head_logits(tmp_path):
    model = tiny_gpt()
    therm = thermo.Thermometer(model, flush_every=1, attn_every=1, attn_per_head=True)
    captured = []
    h = model.h[1].attn.c_attn.register_forward_hook(lambda m, a, o: captured.append(o.detach()))
    (rec,) = train(model, therm, batches(1))
    h.remove()
    q, k, _ = captured[0].split(32, dim=2)
    q = q.view(4, 16, 4, 8).transpose(1, 2)
    k = k.view(4, 16, 4, 8).transpose(1, 2)
    for head in range(4):
        mx, mn = logit_extremes(q[:, head : head + 1], k[:, head : head + 1], 8**-0.5, causal=True)
        assert_close(rec.layers[("h.1.attn", f"attn_max.h{head}")], mx, 1e-5, f"head {head} max")
        assert_close(rec.layers[("h.1.attn", f"attn_min.h{head}")], mn, 1e-5, f"head {head} min")
    heads = [rec.layers[("h.1.attn", f"attn_max.h{i}")] for i in range(4)]
    assert rec.layers[("h.1.attn", "attn_max")] == max(heads)


def test_per_head_needs_a_head_count():
    class Attn(nn.Module):  # no head attribute anywhere
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="attn_heads"):
        thermo.Thermometer(nn.Sequential(Attn()), attn_per_head=True)
    therm = thermo.Thermometer(nn.Sequential(Attn()), attn_per_head=True, attn_heads=2)
    therm.close()


def test_nonfinite_values_are_recorded_not_lost(tmp_path):
    model = tiny_gpt()
    therm = thermo.Thermometer(model, run_dir=tmp_path, flush_every=4, count_nonfinite=True)
    poison = {"on": False}

    def nan_hook(module, args, out):
        if poison["on"]:
            out = out.clone()
            out[0, 0, 0] = float("nan")
            out[0, 0, 1] = float("inf")
            return out
        return None

    model.h[1].mlp.register_forward_hook(nan_hook)

    def on_step(i, loss):
        poison["on"] = i == 1  # the forward of step 2 is poisoned

    records = train(model, therm, batches(4), on_step=on_step)
    therm.close()
    bad = records[2]
    assert math.isnan(bad.scalars["loss"])
    assert math.isnan(bad.scalars["grad_norm"])
    assert bad.scalars["grad_nonfinite"] > 0
    assert math.isnan(bad.layers[("h.1", "act_max")])
    assert bad.layers[("h.1", "act_nonfinite")] >= 2  # at least the NaN and the inf we planted
    assert records[1].layers[("h.1", "act_nonfinite")] == 0
    run = thermo.load(tmp_path)
    row = run.scalars.set_index("step").loc[2]
    assert math.isnan(row["loss"]) and math.isnan(row["grad_norm"])


def test_no_host_sync_between_flushes(monkeypatch):
    """Between flushes, a step must not read any value back to the host."""
    model = tiny_gpt()
    therm = thermo.Thermometer(model, flush_every=4, attn_every=2)
    armed = {"on": False}

    def forbid(name, orig):
        def f(self, *a, **k):
            if armed["on"]:
                raise AssertionError(f"host sync: Tensor.{name} called inside a step")
            return orig(self, *a, **k)

        return f

    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name, getattr(torch.Tensor, name)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flushed = []
    for i, b in enumerate(batches(8)):
        armed["on"] = (i + 1) % 4 != 0  # steps 3 and 7 flush: syncs are allowed there
        _, loss = model(b[:, :-1], b[:, 1:])
        loss.backward()
        flushed.append(len(therm.step(loss, lr=torch.tensor(1e-3))))
        armed["on"] = False
        opt.step()  # torch's own AdamW reads its step count on the host: not ours to police
        opt.zero_grad()
    assert flushed == [0, 0, 0, 4, 0, 0, 0, 4]
    therm.close()


def _hook_state(model):
    return [
        (name, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
         dict(m._backward_pre_hooks), sorted(m.__dict__))
        for name, m in model.named_modules()
    ]


def test_remove_restores_the_model_exactly(tmp_path):
    model = tiny_gpt()
    before = _hook_state(model)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    modes_before = torch._C._len_torch_function_stack()
    with thermo.Thermometer(model, run_dir=tmp_path, flush_every=2) as therm:
        assert _hook_state(model) != before
        train(model, therm, batches(3))
    assert _hook_state(model) == before
    assert torch._C._len_torch_function_stack() == modes_before
    # Weights changed by training, but nothing of thermo's is left in the state dict.
    assert set(model.state_dict()) == set(params)
    therm.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        therm.step(torch.tensor(1.0))


def test_probe_is_popped_when_the_forward_raises():
    model = tiny_gpt()
    therm = thermo.Thermometer(model)
    depth = torch._C._len_torch_function_stack()
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))  # block_size is 16: raises after wte
    bad = torch.zeros(1, 8, dtype=torch.long)
    model.h[0].attn.c_proj.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        model(bad)
    assert torch._C._len_torch_function_stack() == depth
    therm.close()


def test_close_flushes_the_partial_window(tmp_path):
    model = tiny_gpt()
    therm = thermo.Thermometer(model, run_dir=tmp_path, flush_every=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for b in batches(3):
        _, loss = model(b[:, :-1], b[:, 1:])
        loss.backward()
        assert therm.step(loss) == []
        opt.step()
        opt.zero_grad()
    therm.close()
    assert list(thermo.load(tmp_path).scalars["step"]) == [0, 1, 2]


def test_eval_forwards_are_not_recorded():
    def first_record(with_validation: bool):
        model = tiny_gpt()
        therm = thermo.Thermometer(model, flush_every=1, attn_every=1)
        if with_validation:  # a validation pass on very different data, between steps
            model.eval()
            with torch.no_grad():
                model(torch.full((2, 16), 7) * 30)
            model.train()
        (rec,) = train(model, therm, batches(1))
        therm.close()
        return rec.layers

    assert first_record(True) == first_record(False)


def test_scalars_and_explicit_steps(tmp_path):
    model = tiny_gpt()
    therm = thermo.Thermometer(model, run_dir=tmp_path, flush_every=2, start_step=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, b in enumerate(batches(4)):
        _, loss = model(b[:, :-1], b[:, 1:])
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        therm.step(loss, grad_norm=gn, lr=0.1 * (i + 1), tokens=torch.tensor(64.0 * (i + 1)))
        opt.step()
        opt.zero_grad()
    therm.close()
    s = thermo.load(tmp_path).scalars.set_index("step")
    assert list(s.index) == [100, 101, 102, 103]
    assert list(s["lr"]) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert list(s["tokens"]) == [64.0, 128.0, 192.0, 256.0]
    assert (s["grad_norm"] > 0.5).all()  # the pre-clip norm clip_grad_norm_ returned
    assert "grad_nonfinite" not in s or s["grad_nonfinite"].isna().all()


def test_state_dict_round_trip():
    model = tiny_gpt()
    a = thermo.Thermometer(model, flush_every=3, start_step=5)
    train(model, a, batches(2))
    state = a.state_dict()
    a.close()
    b = thermo.Thermometer(model, flush_every=3)
    b.load_state_dict(state)
    assert b.state_dict() == state == {"step": 7, "attempt": 0}
    (rec, *_), = [train(model, b, batches(1))]
    assert rec.step == 7
    b.close()


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(flush_every=0), "flush_every"),
        (dict(attn_every=-1), "attn_every"),
        (dict(grad="some"), "grad"),
        (dict(watch="Linear"), "watch"),
        (dict(attn_heads=0), "attn_heads"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"ThermometerConfig.{field}"):
        thermo.ThermometerConfig(**kw)


def test_watch_selection_by_type_and_name():
    model = tiny_gpt()
    therm = thermo.Thermometer(
        model, watch=("LayerNorm",), include=("*.mlp.c_fc",), exclude=("h.1*",), blocks=False,
        attention=False,
    )
    names = {layer.name for layer in therm.layers}
    therm.close()
    assert names == {"ln_emb", "h.0.ln_1", "h.0.ln_2", "h.0.mlp.c_fc", "ln_f"}


def test_no_attention_layer_is_reported():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="found no attention layer"):
        thermo.Thermometer(mlp).close()


def test_attention_computed_some_other_way_is_reported():
    class OddAttention(nn.Module):  # normalises exp(qkᵀ) by hand: nothing thermo can see
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).split(8, -1)
            w = torch.exp(q @ k.transpose(-2, -1) / 8**0.5)
            return (w / w.sum(-1, keepdim=True)) @ v

    model = nn.Sequential(OddAttention(), nn.Linear(8, 1))
    therm = thermo.Thermometer(model, flush_every=2, attn_every=1)
    with pytest.warns(UserWarning, match=r"no attention logits were seen"):
        for _ in range(2):
            model(torch.randn(2, 5, 8)).sum().backward()
            therm.step()
    therm.close()
