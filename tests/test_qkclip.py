"""QK-Clip: on every layout thermo reads (nanoGPT fused qkv, HF GPT-2 Conv1D, Llama q/k_proj with
and without GQA), the hot head's exact max logit after the clip equals tau on the same input, every
other head and weight stays bit-identical, nothing syncs, and the Guard clips only on steps with
exact logits and never on a healthy run at the default tau."""

from __future__ import annotations

import math

import pytest
import torch

import thermo
from tests.reference import forbid_host_syncs
from thermo.gpt import GPT, GPTConfig
from thermo.guard import Guard, GuardConfig
from thermo.guard.qkclip import QKClip
from thermo.thermometer import ThermometerConfig
from thermo.train_gpt import parse_args, train

HOT_HEAD, HEADS, HEAD_DIM = 1, 4, 8


def heads_rows(head, offset=0):
    return set(range(offset + head * HEAD_DIM, offset + (head + 1) * HEAD_DIM))


def nanogpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=HEADS, n_embd=HEADS * HEAD_DIM, block_size=16))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    w = model.h[0].attn.c_attn.weight  # (3d, d): q rows, k rows, v rows
    d = HEADS * HEAD_DIM
    expect = {"h.0.attn.c_attn.weight": (0, heads_rows(HOT_HEAD) | heads_rows(HOT_HEAD, d)),
              "h.0.attn.c_attn.bias": (0, heads_rows(HOT_HEAD) | heads_rows(HOT_HEAD, d))}
    return model, lambda: model(x, x)[1], "h.0.attn", w, 0, expect


def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=HEADS * HEAD_DIM, n_layer=2,
                                  n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: (d, 3d), q/k/v on the columns
    d = HEADS * HEAD_DIM
    cols = heads_rows(HOT_HEAD) | heads_rows(HOT_HEAD, d)
    expect = {"transformer.h.0.attn.c_attn.weight": (1, cols), "transformer.h.0.attn.c_attn.bias": (0, cols)}
    return model, lambda: model(x, labels=x).loss, "transformer.h.0.attn", w, 1, expect


def hf_llama(kv_heads):
    def build():
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=HEADS * HEAD_DIM, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=HEADS,
                                       num_key_value_heads=kv_heads, max_position_embeddings=16,
                                       attention_bias=True)  # q/k biases, as Qwen2
        model = transformers.LlamaForCausalLM(cfg)
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        attn = model.model.layers[0].self_attn
        pre = "model.layers.0.self_attn"
        expect = {f"{pre}.q_proj.weight": (0, heads_rows(HOT_HEAD)), f"{pre}.q_proj.bias": (0, heads_rows(HOT_HEAD))}
        if kv_heads == HEADS:  # no GQA: sqrt on q and k
            expect[f"{pre}.k_proj.weight"] = (0, heads_rows(HOT_HEAD))
            expect[f"{pre}.k_proj.bias"] = (0, heads_rows(HOT_HEAD))
        return model, lambda: model(x, labels=x).loss, pre, attn.q_proj.weight, 0, expect

    return build


LAYOUTS = {"nanogpt-fused": nanogpt, "hf-gpt2-conv1d": hf_gpt2, "llama-gqa": hf_llama(2),
           "llama-mha": hf_llama(HEADS)}


def discover(therm, loss_fn):
    """The thermometer lays out its attention layers at the first step after a forward."""
    therm.step(loss_fn().detach())


def head_maxima(therm, loss_fn):
    """One training-mode forward; the exact per-head max logits thermo recorded for it."""
    loss = loss_fn()
    out = {k: v.clone() for k, v in therm.attention_head_max().items()}
    therm.step(loss.detach())
    return out


def make_hot(w, dim):
    """Make head HOT_HEAD's queries large: its max logit grows, the others' do not."""
    with torch.no_grad():
        idx = torch.tensor(sorted(heads_rows(HOT_HEAD)))
        fresh = torch.randn(w.index_select(dim, idx).shape, generator=torch.Generator().manual_seed(2))
        w.index_copy_(dim, idx, fresh * 2.0)


def changed_indices(a, b, dim):
    diff = (a != b)
    other = [d for d in range(diff.dim()) if d != dim]
    return set(torch.nonzero(diff.any(dim=other[0]) if other else diff).flatten().tolist())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_hot_head_is_brought_to_tau_and_everything_else_is_untouched(layout):
    model, loss_fn, layer, w, dim, expect = LAYOUTS[layout]()
    make_hot(w, dim)
    params = dict(model.named_parameters())
    with torch.no_grad():  # initialised to zeros, a bias would stay zero whatever the clip does
        for n in expect:
            if n.endswith("bias"):
                params[n].copy_(0.1 * torch.randn(params[n].shape, generator=torch.Generator().manual_seed(3)))
    model.train()
    therm = thermo.Thermometer(model, attn_per_head=True, attn_every=1, flush_every=50)
    discover(therm, loss_fn)
    s0 = head_maxima(therm, loss_fn)
    hot = float(s0[layer][HOT_HEAD])
    tau = hot / 4
    others = [float(v) for name, t in s0.items() for h, v in enumerate(t) if (name, h) != (layer, HOT_HEAD)]
    assert max(others) < tau, "test setup: only one head may be above tau"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    clip = QKClip(therm, tau=tau)
    loss = loss_fn()
    n_hot = clip.capture()
    therm.step(loss.detach())
    clip.apply()
    assert n_hot.item() == 1

    s1 = head_maxima(therm, loss_fn)
    assert float(s1[layer][HOT_HEAD]) == pytest.approx(tau, rel=2e-6)  # float32 rounding
    # The other heads of the clipped layer see the same q and k (later layers see a changed input).
    for h in range(HEADS):
        if h != HOT_HEAD:
            assert torch.equal(s1[layer][h], s0[layer][h]), f"{layer} head {h} changed"
    for n, p in model.named_parameters():
        if n in expect:
            d, rows = expect[n]
            assert changed_indices(before[n], p.detach(), d) == rows, n
        else:
            assert torch.equal(before[n], p.detach()), f"{n} changed"
    therm.close()


def test_no_host_sync_and_a_skipped_step_is_not_clipped(monkeypatch):
    model, loss_fn, layer, w, dim, _ = nanogpt()
    make_hot(w, dim)
    therm = thermo.Thermometer(model, attn_per_head=True, attn_every=1, flush_every=50)
    discover(therm, loss_fn)
    clip = QKClip(therm, tau=1e-3)  # every head is hot
    armed = forbid_host_syncs(monkeypatch, "by QK-Clip")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = loss_fn()
    armed["on"] = True
    clip.capture()
    armed["on"] = False
    therm.step(loss.detach())
    armed["on"] = True
    clip.apply(skipped=torch.tensor(1.0))  # the Guard skipped this step's update: no clip either
    armed["on"] = False
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    loss = loss_fn()
    armed["on"] = True
    clip.capture()
    armed["on"] = False
    therm.step(loss.detach())
    armed["on"] = True
    clip.apply(skipped=torch.tensor(0.0))
    armed["on"] = False
    assert not torch.equal(before["h.0.attn.c_attn.weight"], model.h[0].attn.c_attn.weight)
    therm.close()


def test_a_step_without_exact_logits_never_clips():
    model, loss_fn, layer, w, dim, _ = nanogpt()
    make_hot(w, dim)
    therm = thermo.Thermometer(model, attn_per_head=True, attn_every=3, flush_every=50, start_step=1)
    clip = QKClip(therm, tau=1e-3)
    assert clip.capture().item() == 0  # before the first forward: no layer known yet
    discover(therm, loss_fn)  # step 1
    before = w.detach().clone()
    loss = loss_fn()  # step 2: only the Cauchy-Schwarz bound is computed
    assert clip.capture().item() == 0
    therm.step(loss.detach())
    clip.apply()
    assert torch.equal(before, w)
    therm.close()


class _OddAttention(torch.nn.Module):
    n_head = 2

    def __init__(self):
        super().__init__()
        self.wqkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.wqkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class _QKNormAttention(_OddAttention):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.q_norm = torch.nn.LayerNorm(4)


@pytest.mark.parametrize("cls,match", [(_OddAttention, r"'0' \(_OddAttention\).*expected a fused `c_attn`"),
                                       (_QKNormAttention, r"q_norm.*undone by the norm")])
def test_a_layout_it_cannot_map_is_a_clear_error(cls, match):
    model = torch.nn.Sequential(cls(), torch.nn.Linear(8, 8))
    therm = thermo.Thermometer(model, attn_per_head=True, attn_every=1)
    clip = QKClip(therm, tau=100.0)
    model(torch.randn(2, 5, 8)).sum().backward()
    therm.step()  # the thermometer now knows the attention layer; QK-Clip maps it at its capture
    with pytest.raises(ValueError, match=match):
        clip.capture()
    therm.close()


def test_the_guard_refuses_a_thermometer_without_per_head_logits(tmp_path):
    model, *_ = nanogpt()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    sampler = thermo.data.ResumableSampler(64, 4)
    with pytest.raises(ValueError, match="qk_clip_tau=100.0.*attn_per_head=True"):
        Guard(model, opt, tmp_path, data=sampler, fetch=lambda ids: ids, config=GuardConfig(qk_clip_tau=100.0),
              thermometer=ThermometerConfig(attn_every=5))
    with pytest.raises(ValueError, match="GuardConfig.qk_clip_tau"):
        GuardConfig(qk_clip_tau=0.0)


TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--checkpoint-every", "20", "--good-after", "20", "--flush-every", "10",
        "--attn-every", "5", "--lr", "3e-3", "--warmup", "10", "--quiet", "--steps", "30"]


def test_the_guard_clips_only_on_exact_steps_and_never_on_a_healthy_run_at_the_default_tau(tmp_path):
    plain = train(parse_args([*TINY, "--run-dir", str(tmp_path / "plain")]))
    healthy = train(parse_args([*TINY, "--run-dir", str(tmp_path / "healthy"), "--qk-clip", "100"]))
    s = thermo.load(tmp_path / "healthy").scalars
    assert (s["qk_clip_heads"] == 0).all() and len(s) == 30
    assert healthy.final_loss == plain.final_loss  # untouched: the same run, bit for bit

    # A tau every head exceeds: the clip fires, on the steps with exact logits only.
    train(parse_args([*TINY, "--run-dir", str(tmp_path / "cold"), "--qk-clip", "1e-3"]))
    s = thermo.load(tmp_path / "cold").scalars.set_index("step")
    fired = sorted(s.index[s["qk_clip_heads"] > 0])
    assert fired == list(range(5, 31, 5))
    assert all(s.loc[f, "qk_clip_heads"] == 8 for f in fired)  # 2 layers x 4 heads
    assert not math.isnan(s["loss"].iloc[-1])


def test_ranks_clip_alike_replicated_and_under_fsdp2(tmp_path):
    """Each rank sees its own batch; the per-head maxima are reduced, so both ranks scale by the
    same factor: the max over ranks of the hot head's logit becomes tau."""
    import json

    from tests.distributed import ROOT, torchrun

    out = tmp_path / "out.json"
    torchrun(ROOT / "tests/dist/qkclip_ranks.py", "--out", out)
    got = json.loads(out.read_text())
    for setup, ranks in got.items():
        for r in ranks:
            assert r["hot"] == 1, setup
            assert r["after"] == pytest.approx(r["tau"], rel=2e-6), setup
            assert r["others_unchanged"], setup
        assert ranks[0]["tau"] == ranks[1]["tau"]
        if setup == "plain":
            assert all(r["identical"] for r in ranks)
