"""Thermometer: every recorded value equals a plain recomputation; no host sync between
flushes; removable; works under torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import thermo
from tests.reference import QKVCapture, Recorder, assert_close, forbid_host_syncs, grad_norm, logit_extremes
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
    assert blocks == ["h.0", "h.1"]
    assert not [layer for layer in therm.layers if layer.kind == "attention"]  # found by the 1st forward
    attn = ["h.0.attn", "h.1.attn"]
    assert {"wte", "wpe", "ln_emb", "h.0.attn.c_attn", "h.1.mlp.c_fc", "ln_f", "lm_head"} <= set(watched)
    ref = Recorder(model, watched, grad_names=blocks)
    qkv = QKVCapture(model, attn, n_head=4)
    expected = {}

    def on_step(i, loss):
        expected[i] = (ref.take(), qkv.take(), grad_norm(model), loss.item())

    records = train(model, therm, batches(7), autocast=dtype, on_step=on_step)
    therm.close()
    assert [layer.name for layer in therm.layers if layer.kind == "attention"] == attn
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


class FoldedHeads(nn.Module):
    """Attention over (batch·heads, T, T) scores: the logits' layout does not show the heads, and
    the module declares no head attribute."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):  # x: (B, T, 8), two heads of 4
        B, T, _ = x.shape
        q, k, v = (t.reshape(B, T, 2, 4).transpose(1, 2).reshape(B * 2, T, 4) for t in self.qkv(x).split(8, -1))
        att = torch.bmm(q, k.transpose(1, 2)) * 0.5  # (B*2, T, T)
        y = torch.bmm(att.softmax(-1), v)
        return y.reshape(B, 2, T, 4).transpose(1, 2).reshape(B, T, 8)


def test_per_head_needs_a_head_count():
    torch.manual_seed(0)
    model = nn.Sequential(FoldedHeads(), nn.Linear(8, 1))
    x = torch.randn(3, 5, 8)
    therm = thermo.Thermometer(model, attn_per_head=True, flush_every=1, attn_every=1)
    model(x).sum().backward()
    with pytest.raises(ValueError, match="attn_heads"):
        therm.step()
    therm.close()
    therm = thermo.Thermometer(model, attn_per_head=True, attn_heads=2, flush_every=1, attn_every=1)
    model(x).sum().backward()
    (rec,) = therm.step()
    therm.close()
    q, k, _ = model[0].qkv(x).detach().double().split(8, -1)
    q, k = (t.reshape(3, 5, 2, 4).transpose(1, 2) for t in (q, k))
    # The first step's logits were seen before the heads were known: the layer's extremes only.
    mx, mn = logit_extremes(q, k, 0.5, causal=False)
    assert_close(rec.layers[("0", "attn_max")], mx, 1e-6, "max")
    assert_close(rec.layers[("0", "attn_min")], mn, 1e-6, "min")
    assert ("0", "attn_max.h0") not in rec.layers
    therm = thermo.Thermometer(model, attn_per_head=True, attn_heads=2, flush_every=1, attn_every=1)
    for _ in range(2):  # the second step is read per head
        model(x).sum().backward()
        recs = therm.step()
    therm.close()
    for head in range(2):
        mx, mn = logit_extremes(q[:, head : head + 1], k[:, head : head + 1], 0.5, causal=False)
        assert_close(recs[0].layers[("0", f"attn_max.h{head}")], mx, 1e-6, f"head {head} max")
        assert_close(recs[0].layers[("0", f"attn_min.h{head}")], mn, 1e-6, f"head {head} min")


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
    armed = forbid_host_syncs(monkeypatch)
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


def test_the_finder_is_gone_after_the_first_step():
    """Discovery hooks every module for the first forward only: from the first step on, only the
    attention modules found carry a pre-hook (no global cost on later steps)."""
    model = tiny_gpt()
    therm = thermo.Thermometer(model, flush_every=2)
    assert all(m._forward_pre_hooks for m in model.modules())  # the finder, on every module
    train(model, therm, batches(1))
    with_pre = [n for n, m in model.named_modules() if m._forward_pre_hooks]
    assert with_pre == ["h.0.attn", "h.1.attn"]
    therm.close()


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
        model, watch=("LayerNorm",), include=("h.*.mlp.c_fc",), exclude=("h.1",), blocks=False,
        attention=False,
    )
    names = {layer.name for layer in therm.layers}
    therm.close()
    assert names == {"ln_emb", "h.0.ln_1", "h.0.ln_2", "h.0.mlp.c_fc", "ln_f"}


def test_patterns_are_module_paths_checked_at_construction():
    model = tiny_gpt()
    # '*' stays within one component: "h.*" is the two blocks, not the 14 modules inside them.
    therm = thermo.Thermometer(model, watch=(), include=("h.*",), blocks=False, attention=False)
    assert [layer.name for layer in therm.layers] == ["h.0", "h.1"]
    therm.close()
    therm = thermo.Thermometer(model, watch=(), include=("**.c_fc",), blocks=False, attention=False)
    assert [layer.name for layer in therm.layers] == ["h.0.mlp.c_fc", "h.1.mlp.c_fc"]
    therm.close()
    for field in ("include", "exclude", "attn_modules"):
        with pytest.raises(ValueError, match=rf"ThermometerConfig.{field}: pattern '\*.attn' matches no module"
                                             r"(.|\n)*h.0.attn"):
            thermo.Thermometer(model, **{field: ("*.attn",)})


def test_attn_modules_must_compute_attention():
    model = tiny_gpt()
    therm = thermo.Thermometer(model, attn_modules=("h.0.attn.c_attn",), flush_every=1)
    b = batches(1)[0]
    model(b[:, :-1], b[:, 1:])[1].backward()
    with pytest.raises(ValueError, match=r"names \['h.0.attn.c_attn'\], which computed no attention(.|\n)*"
                                         r"Attention is computed in: 'h.0.attn', 'h.1.attn'"):
        therm.step()
    therm.close()
    # A module with attention inside it may be named: its probe sees the calls of its children.
    therm = thermo.Thermometer(model, attn_modules=("h.*",), flush_every=1, attn_every=1)
    (rec,) = train(model, therm, batches(1))
    therm.close()
    assert [layer.name for layer in therm.layers if layer.kind == "attention"] == ["h.0", "h.1"]
    assert ("h.0", "attn_max") in rec.layers and ("h.0.attn", "attn_max") not in rec.layers


def test_no_attention_layer_is_reported():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    therm = thermo.Thermometer(mlp, flush_every=1)
    mlp(torch.randn(2, 4)).sum().backward()
    with pytest.warns(UserWarning, match="saw no attention computed in the first forward of Sequential"):
        therm.step()
    therm.close()


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
    model(torch.randn(2, 5, 8)).sum().backward()
    with pytest.warns(UserWarning, match=r"saw no attention computed"):
        therm.step()
    therm.close()
    therm = thermo.Thermometer(model, attn_modules=("0",))
    model(torch.randn(2, 5, 8)).sum().backward()
    with pytest.raises(ValueError, match=r"names \['0'\], which computed no attention(.|\n)*computed in: none"):
        therm.step()
    therm.close()


def test_a_root_attention_module_is_watched():
    class Attention(nn.Module):  # the model is the attention layer itself
        def __init__(self):
            super().__init__()
            self.n_head = 2
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in self.qkv(x).split(8, -1))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)

    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(2, 6, 8)
    therm = thermo.Thermometer(model, flush_every=1, attn_every=1)
    model(x).square().sum().backward()
    (rec,) = therm.step()
    therm.close()
    q, k, _ = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in model.qkv(x).detach().split(8, -1))
    mx, mn = logit_extremes(q, k, 0.5, causal=True)
    assert_close(rec.layers[("<root>", "attn_max")], mx, 1e-6, "max")
    assert_close(rec.layers[("<root>", "attn_min")], mn, 1e-6, "min")


def test_watched_modules_that_never_run_are_named_once():
    class Tied(nn.Module):  # the head reuses the embedding's weight through F.linear
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.unused = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10)

        def forward(self, idx):
            return F.linear(self.emb(idx), self.emb.weight)

    model = Tied()
    therm = thermo.Thermometer(model, flush_every=2, attn_every=2, attention=False)
    with pytest.warns(UserWarning, match=r"never ran in the first 2 steps, so they record nothing: \['unused', 'head'\]"):
        for _ in range(2):
            model(torch.tensor([[1, 2, 3]])).sum().backward()
            therm.step()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):  # once: later flushes say nothing
            model(torch.tensor([[1, 2, 3]])).sum().backward()
            therm.step()
    therm.close()


def test_a_flex_attention_call_before_attaching_is_not_a_stale_compile():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    import warnings

    torch._dynamo.reset()
    q = torch.randn(1, 1, 4, 4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        flex.flex_attention(q, q, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thermo.Thermometer(nn.Linear(4, 4), attention=False).close()


def test_a_loss_that_is_not_one_number_is_one_clear_error_and_loses_no_step(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    therm = thermo.Thermometer(model, tmp_path, thermo.ThermometerConfig(flush_every=2))
    per_sample = None
    for step in range(3):
        per_sample = model(torch.randn(8, 4)).squeeze(1) ** 2  # (8,): a loss not yet reduced
        per_sample.mean().backward()
        therm.step(per_sample.mean())
    with pytest.raises(ValueError, match=r"loss must be a scalar, got a tensor of shape \(8,\); .*loss\.mean\(\)"):
        therm.step(per_sample)
    with pytest.raises(ValueError, match=r"lr must be a scalar, got a tensor of shape \(2,\)"):
        therm.step(per_sample.mean(), lr=torch.ones(2))
    therm.step(per_sample.mean())
    therm.close()
    assert thermo.load(tmp_path).scalars["step"].tolist() == [0, 1, 2, 3]
