"""Models thermo's authors did not write, with the default configuration: the attention is found
without being named, and every number matches a plain recomputation.

Tiny configurations on CPU (2 layers, d=32, sequence 8), random weights from configs (nothing is
downloaded). For each model: the attention layers thermo finds, attention-logit and activation
extremes against a recomputation in float64 (to float32 rounding), the gradient norm within 1e-5,
and no warning but the ones expected.

The logits' reference: for Hugging Face models, the input of the softmax in an eager twin of the
model (same weights, ``attn_implementation="eager"``), so an sdpa model's numbers are checked
against what its eager twin's softmax sees, position biases and masks included: one definition on
both paths. For the others, q and k rebuilt from the module's own projections in float64.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import thermo
from tests.reference import Recorder, assert_close, grad_norm
from thermo.gpt import GPT, GPTConfig

T = 8  # sequence length
STEPS = 2


class SoftmaxInputs(TorchFunctionMode):
    """Captures max/min (float64) of every softmax input inside the modules it is pushed around,
    leaving out masked entries (-inf, or the mask value finfo.min added to a logit)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.values: dict[str, tuple[float, float]] = {}
        self.current = None
        mods = dict(model.named_modules())
        self.handles = []
        for n in names:
            self.handles.append(mods[n].register_forward_pre_hook(self._enter(n)))
            self.handles.append(mods[n].register_forward_hook(self._exit))

    def _enter(self, name):
        def hook(mod, args):
            self.current = name
            self.__enter__()

        return hook

    def _exit(self, mod, args, out):
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.softmax, torch.softmax, torch.Tensor.softmax):
            x = args[0].detach()
            valid = x > torch.finfo(x.dtype).min / 2
            x = x.double()[valid]
            mx, mn = x.max().item(), x.min().item()
            old = self.values.get(self.current, (-math.inf, math.inf))
            self.values[self.current] = (max(old[0], mx), min(old[1], mn))
        return func(*args, **kwargs)

    def take(self):
        out, self.values = self.values, {}
        return out


def eager_twin_logits(model: nn.Module, names: list[str]):
    """A function of the inputs giving {attention module: (max, min)} of the softmax inputs in
    an eager copy of `model` holding its current weights."""
    twin = copy.deepcopy(model)
    twin.config._attn_implementation = "eager"
    for m in twin.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"

    def logits(inputs):
        twin.load_state_dict(model.state_dict())
        twin.train()
        cap = SoftmaxInputs(twin, names)
        with torch.no_grad():
            twin(**inputs)
        for h in cap.handles:
            h.remove()
        return cap.take()

    return logits


def thermo_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "thermo" in str(w.message)]


def check(model, run_step, expected_attn, attach_ref, expected_warnings=(), compile=False, backward=True):
    """Train `model` STEPS steps under a default Thermometer (exact logits every step) and check
    every recorded number. `run_step(m, i)` runs step i's forward on `m` and returns the loss;
    `attach_ref(m)` hooks the logits' reference on `m` and returns a function giving
    {attention layer: (max, min)} of the forward just run. ``backward=False``: forwards only, in
    training mode under ``torch.no_grad()`` (for attention torch cannot differentiate here), so
    no gradient is recorded.

    Compiled (attached first, then ``torch.compile``): the references' hooks read values back
    with ``.item()``, so they run on an eager twin holding the same weights and inputs."""
    model.train()
    twin = copy.deepcopy(model) if compile else model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        therm = thermo.Thermometer(model, flush_every=STEPS, attn_every=1)
        watched = [layer.name for layer in therm.layers]
        blocks = [layer.name for layer in therm.layers if layer.kind == "block"]
        ref = Recorder(twin, watched, grad_names=blocks)
        ref_logits = attach_ref(twin)
        fwd = torch.compile(model, backend="aot_eager") if compile else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        records, expected = [], []
        for i in range(STEPS):
            if compile:
                twin.load_state_dict(model.state_dict())
                run_step(twin, i).backward()
                twin.zero_grad()
            if backward:
                loss = run_step(fwd, i)
                loss.backward()
            else:
                with torch.no_grad():
                    loss = run_step(fwd, i)
            expected.append((ref.take(), ref_logits(), grad_norm(model) if backward else None))
            records += therm.step(loss)
            opt.step()
            opt.zero_grad()
        therm.close()
        ref.remove()
    got_attn = [layer.name for layer in therm.layers if layer.kind == "attention"]
    assert got_attn == expected_attn
    assert len(records) == STEPS
    for rec, (acts, logits, gn) in zip(records, expected):
        if gn is None:
            assert "grad_norm" not in rec.scalars
        else:
            assert_close(rec.scalars["grad_norm"], gn, 1e-5, "grad_norm")
        assert set(acts) == {k for k in rec.layers if k[1] in ("act_max", "act_min", "grad_max")}
        for key, want in acts.items():
            assert_close(rec.layers[key], want, 1e-6, f"step {rec.step} {key}")
        assert set(logits) == set(expected_attn), f"reference saw {sorted(logits)}"
        for name, (mx, mn) in logits.items():
            assert_close(rec.layers[(name, "attn_max")], mx, 1e-5, f"step {rec.step} {name} max")
            assert_close(rec.layers[(name, "attn_min")], mn, 1e-5, f"step {rec.step} {name} min")
            bound = rec.layers.get((name, "attn_bound"))
            if bound is not None:
                assert bound >= max(abs(mx), abs(mn)) * (1 - 1e-6), f"{name} bound {bound} < |logit|"
    msgs = thermo_warnings(caught)
    assert len(msgs) == len(expected_warnings), f"warnings: {msgs}"
    for msg, want in zip(msgs, expected_warnings):
        assert want in msg, f"{want!r} not in {msg!r}"


# -- models written here -----------------------------------------------------------------------


def ids_batch(seed, vocab=128, B=2):
    return torch.randint(1, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


class QKCapture:
    """Logit extremes rebuilt in float64 from captured q and k. `qk(module, args, out)` returns
    (q, k, scale, allowed-or-None, additive-or-None), q and k as (B, H, L, E)."""

    def __init__(self, model, names, qk):
        self.values = {}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n, qk)) for n in names]

    def _hook(self, name, qk):
        def hook(mod, args, out):
            q, k, scale, allowed, additive = qk(mod, args, out)
            logits = (q.double() @ k.double().transpose(-2, -1)) * scale
            if additive is not None:
                logits = logits + additive.double()
            if allowed is not None:
                logits = logits[allowed.expand_as(logits)]
            self.values[name] = (logits.max().item(), logits.min().item())

        return hook

    def take(self):
        out, self.values = self.values, {}
        return out


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_nanogpt(impl):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=T, vocab_size=128, attn_impl=impl))
    names = ["h.0.attn", "h.1.attn"]

    def qk(mod, args, out):
        q, k, _ = mod.c_attn(args[0]).detach().split(32, dim=2)
        q, k = (t.view(2, T, 4, 8).transpose(1, 2) for t in (q, k))
        return q, k, 8**-0.5, torch.ones(T, T, dtype=torch.bool).tril(), None

    check(model, lambda m, i: m(ids_batch(i), ids_batch(50))[1], names, lambda m: QKCapture(m, names, qk).take)


class Block(nn.Module):
    """A minimal GPT block with attention inline: no attention class, no attention child."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln(x)).split(C, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, L, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp(x)


class InlineGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(128, 32)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(32, 128)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def inline_gpt_case():
    torch.manual_seed(0)
    model = InlineGPT()
    names = ["blocks.0", "blocks.1"]

    def qk(mod, args, out):
        q, k, _ = mod.qkv(mod.ln(args[0])).detach().split(32, -1)
        q, k = (t.view(2, T, 4, 8).transpose(1, 2) for t in (q, k))
        return q, k, 8**-0.5, torch.ones(T, T, dtype=torch.bool).tril(), None

    run = lambda m, i: F.cross_entropy(m(ids_batch(i)).flatten(0, 1), ids_batch(50).flatten())  # noqa: E731
    return model, run, names, lambda m: QKCapture(m, names, qk).take


def test_inline_sdpa_block():
    check(*inline_gpt_case())


# -- torch.nn ------------------------------------------------------------------------------------


def mha_qk(embed=32, heads=4, batch_first=True):
    def qk(mod, args, out):
        x = args[0].detach().double()
        if not batch_first:
            x = x.transpose(0, 1)
        w, b = mod.in_proj_weight.detach().double(), mod.in_proj_bias.detach().double()
        B, L, _ = x.shape
        q = (x @ w[:embed].T + b[:embed]).view(B, L, heads, -1).transpose(1, 2)
        k = (x @ w[embed:2 * embed].T + b[embed:2 * embed]).view(B, L, heads, -1).transpose(1, 2)
        return q, k, (embed // heads) ** -0.5

    return qk


def test_transformer_encoder_norm_first_with_key_padding():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                       batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    names = ["layers.0.self_attn", "layers.1.self_attn"]
    pad = torch.zeros(2, T, dtype=torch.bool)
    pad[1, 5:] = True  # the second sequence has three padding tokens
    causal = nn.Transformer.generate_square_subsequent_mask(T)  # float: 0 and -inf

    def qk(mod, args, out):
        q, k, scale = mha_qk()(mod, args, out)
        allowed = (~pad)[:, None, None, :] & (causal == 0)
        return q, k, scale, allowed, None

    xs = torch.randn(STEPS, 2, T, 32, generator=torch.Generator().manual_seed(0))
    run = lambda m, i: m(xs[i], mask=causal, src_key_padding_mask=pad).square().mean()  # noqa: E731
    check(model, run, names, lambda m: QKCapture(m, names, qk).take,
          expected_warnings=["['layers.0.self_attn.out_proj', 'layers.1.self_attn.out_proj']. "
                             "A module whose weight is used directly"])


def test_multihead_attention_as_the_model():
    torch.manual_seed(0)
    model = nn.MultiheadAttention(32, 4, batch_first=False)
    x = torch.randn(T, 2, 32)
    mask = torch.zeros(T, T)
    mask[:, -2:] = torch.finfo(torch.float32).min  # an additive mask in HF's style: finite minimum
    mask[0, 1] = 0.5  # and one finite bias

    def qk(mod, args, out):
        q, k, scale = mha_qk(batch_first=False)(mod, args, out)
        return q, k, scale, mask > torch.finfo(torch.float32).min / 2, mask

    def attach_ref(m):
        cap = QKCapture(m, [""], qk)  # the root module's path is ""; thermo calls it "<root>"
        return lambda: {"<root>": v for v in cap.take().values()}

    check(model, lambda m, i: m(x, x, x, attn_mask=mask, need_weights=False)[0].square().mean(), ["<root>"], attach_ref,
          expected_warnings=["['out_proj']. A module whose weight is used directly"])


# -- Hugging Face ----------------------------------------------------------------------------------


def hf_case(kind: str, impl: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=128, attn_implementation=impl)
    lm = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, **common)
    inputs = {"input_ids": ids_batch(0)}
    loss = lambda out: out.loss  # noqa: E731
    warn = ()
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common))
        names = [f"transformer.h.{i}.attn" for i in range(2)]
    elif kind in ("llama", "qwen2", "mistral"):
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
        extra = {"sliding_window": 4} if kind == "mistral" else {}  # a window shorter than the sequence
        model = cls[1](cls[0](**lm, **extra))
        names = [f"model.layers.{i}.self_attn" for i in range(2)]
    elif kind == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, **common))
        names = ["encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention",
                 "decoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.1.EncDecAttention",
                 "decoder.block.1.layer.0.SelfAttention", "decoder.block.1.layer.1.EncDecAttention"]
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, 6:] = 0
        inputs = {"input_ids": ids_batch(0), "attention_mask": mask, "labels": ids_batch(1)}
        # T5 embeds through encoder.embed_tokens and decoder.embed_tokens, tied to `shared`,
        # which is never called itself. Under sdpa it passes one float mask holding the position
        # bias and finfo.min where masked (not -inf): read as masked, the bias as a logit term.
        warn = ("['shared']",)
    elif kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32,
            **common))
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, 5:] = 0  # padding
        inputs = {"input_ids": ids_batch(0), "attention_mask": mask}
        loss = lambda out: out.last_hidden_state.square().mean()  # noqa: E731
        names = [f"encoder.layer.{i}.attention.self" for i in range(2)]
    elif kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation=impl))
        inputs = {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))}
        loss = lambda out: out.last_hidden_state.square().mean()  # noqa: E731
        names = [f"layers.{i}.attention" for i in range(2)]
    else:
        raise AssertionError(kind)
    if "labels" not in inputs and kind not in ("bert", "vit"):
        inputs["labels"] = inputs["input_ids"]
    assert model.config._attn_implementation == impl
    ref = eager_twin_logits(model, names)
    return model, (lambda m, i: loss(m(**inputs))), names, (lambda m: lambda: ref(inputs)), warn


HF = ["gpt2", "llama", "qwen2", "mistral", "t5", "bert", "vit"]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", HF)
def test_hugging_face(kind, impl):
    model, run, names, ref, warn = hf_case(kind, impl)
    check(model, run, names, ref, expected_warnings=warn)


# -- flex_attention ----------------------------------------------------------------------------


class FlexBlock(nn.Module):
    """Attention through ``flex_attention``, inline: an ALiBi score_mod (a slope per head, read
    from a captured buffer), a causal sliding-window block mask, grouped-query heads (4 query
    heads share 2 kv heads)."""

    def __init__(self, d=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.ln = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * kv_heads * self.hd)
        self.proj = nn.Linear(d, d)
        self.register_buffer("slopes", 2.0 ** -torch.arange(1.0, heads + 1))

    def qk(self, x):
        B, L, _ = x.shape
        h = self.ln(x)
        q = self.q(h).view(B, L, self.heads, self.hd).transpose(1, 2)  # (B, H, L, hd)
        k, v = (t.view(B, L, self.kv_heads, self.hd).transpose(1, 2) for t in self.kv(h).chunk(2, -1))
        return q, k, v

    def forward(self, x, block_mask):
        from torch.nn.attention.flex_attention import flex_attention

        B, L, C = x.shape
        q, k, v = self.qk(x)
        slopes = self.slopes

        def alibi(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx)

        y = flex_attention(q, k, v, score_mod=alibi, block_mask=block_mask, enable_gqa=True)
        return x + self.proj(y.transpose(1, 2).reshape(B, L, C))


WINDOW = 4  # keys at most WINDOW - 1 positions back


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


class FlexGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(128, 32)
        self.blocks = nn.ModuleList(FlexBlock() for _ in range(2))
        self.head = nn.Linear(32, 128)

    def forward(self, idx):
        from torch.nn.attention.flex_attention import create_block_mask

        mask = create_block_mask(sliding_window, None, None, idx.shape[1], idx.shape[1], device=idx.device)
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x, mask)
        return self.head(x)


def flex_case():
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    model = FlexGPT()
    names = ["blocks.0", "blocks.1"]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]

    def qk(mod, args, out):
        q, k, _ = mod.qk(args[0].detach())
        k = k.repeat_interleave(mod.heads // mod.kv_heads, dim=1)
        bias = -mod.slopes.view(1, -1, 1, 1) * (i - j)  # (1, H, L, S)
        return q, k, mod.hd**-0.5, sliding_window(None, None, i, j), bias

    run = lambda m, i: F.cross_entropy(m(ids_batch(i)).flatten(0, 1), ids_batch(50).flatten())  # noqa: E731
    return model, run, names, lambda m: QKCapture(m, names, qk).take


def test_flex_attention_score_mod_and_block_mask():
    """Forwards only: torch cannot differentiate flex_attention on CPU (see the next test)."""
    model, run, names, ref = flex_case()
    with warnings.catch_warnings():
        # torch's own note that eager flex_attention materialises the scores
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        check(model, run, names, ref, backward=False)


def test_hugging_face_flex_attention():
    """HF Llama with ``attn_implementation="flex_attention"`` (its causal block mask, GQA), forwards
    only, against its eager twin, with no warning."""
    model, run, names, ref, _ = hf_case("llama", "flex_attention")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        check(model, run, names, ref, backward=False)


def test_flex_attention_grad_norm():
    model, run, names, ref = flex_case()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        try:
            run(model, 0).backward()
        except NotImplementedError as e:
            pytest.skip(f"torch {torch.__version__} cannot differentiate flex_attention here: {e}")
        model.zero_grad()
        check(model, run, names, ref)


# -- torch.compile (attached first, then compiled) ----------------------------------------------


@pytest.mark.slow
def test_compiled_nanogpt():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=T, vocab_size=128))
    names = ["h.0.attn", "h.1.attn"]

    def qk(mod, args, out):
        q, k, _ = mod.c_attn(args[0]).detach().split(32, dim=2)
        q, k = (t.view(2, T, 4, 8).transpose(1, 2) for t in (q, k))
        return q, k, 8**-0.5, torch.ones(T, T, dtype=torch.bool).tril(), None

    check(model, lambda m, i: m(ids_batch(i), ids_batch(50))[1], names, lambda m: QKCapture(m, names, qk).take,
          compile=True)


@pytest.mark.slow
def test_compiled_inline_sdpa_block():
    torch._dynamo.reset()
    check(*inline_gpt_case(), compile=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama"])
def test_compiled_hugging_face(kind):
    torch._dynamo.reset()
    model, run, names, ref, warn = hf_case(kind, "sdpa")
    check(model, run, names, ref, expected_warnings=warn, compile=True)
