"""What thermo watches and how: module selection, activation/gradient hooks, attention logits,
the global gradient norm.

Every probe writes into preallocated 0-d views of the thermometer's device accumulators with
in-place ``max``/``min`` (never ``+=``: a hook that fires twice, as under activation-checkpoint
recompute, must not change the answer). Nothing here reads a value back to the host.

Attention logits, one definition on every path: the logit of query i and key j is the value the
softmax sees, ``q_i·k_j·scale + bias_ij``, where the bias is whatever is added before the softmax
(T5's position bias, ALiBi, a float mask's finite entries). Masked positions (bool False, ``-inf``,
or an additive value at or below ``finfo(dtype).min / 2``) are left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Class names (matched against the whole MRO, so subclasses count) watched by default.
DEFAULT_WATCH = ("Linear", "LayerNorm", "RMSNorm", "Embedding", "Conv1D")
_HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "nhead", "nheads", "heads")
# Query rows per chunk when materialising exact logits: bounds the extra memory to about
# `_LOGIT_CHUNK_ELEMS` fp32 values whatever the sequence length.
_LOGIT_CHUNK_ELEMS = 1 << 24
# The layer name of the model itself when it is the attention module (its module path is "").
ROOT = "<root>"

_SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}
# Products of two activations (q @ kᵀ); a softmax over a tensor of the same trailing shape in the
# same module is an attention softmax (a router's softmax over F.linear logits is not).
_MATMUL_FUNCS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
                 torch.baddbmm, torch.Tensor.baddbmm, torch.einsum}
_ATTENTION_FUNCS = {F.scaled_dot_product_attention, F.multi_head_attention_forward} | _SOFTMAX_FUNCS | _MATMUL_FUNCS


def _pattern_regex(pattern: str) -> re.Pattern:
    """Module-path glob: ``*`` and ``?`` stay within one dotted component, ``**`` spans any
    number of them (``blocks.*`` is ``blocks.0``, not ``blocks.0.qkv``; ``**.attn`` is every
    ``attn`` at any depth)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**.", i):
            out.append(r"(?:.*\.)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def path_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether module path `name` matches one of the module-path globs (see `_pattern_regex`)."""
    return any(_pattern_regex(p).match(name) for p in patterns)


def pattern_candidates(pattern: str, names: list[str], limit: int = 12) -> str:
    """A short list of module paths a mistyped pattern may have meant: those whose last
    component matches the pattern's, else those at the pattern's depth, else all."""
    last = pattern.rsplit(".", 1)[-1]
    near = ([n for n in names if n and path_matches(n.rsplit(".", 1)[-1], (last,))]
            or [n for n in names if n and n.count(".") == pattern.count(".")] or [n for n in names if n])
    more = f" ... ({len(near) - limit} more)" if len(near) > limit else ""
    return ", ".join(near[:limit]) + more


def class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / DeepSpeed / torch.compile wrappers, so layer names do not
    depend on them."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # OptimizedModule from torch.compile
        elif type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            return model


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks: members of a ModuleList/Sequential of >= 2 modules of
    one class that holds other modules (so a list of bare Linears is not a block stack)."""
    blocks = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) == 1 and any(True for _ in next(iter(mod)).children()):
            blocks.extend(f"{name}.{i}" if name else str(i) for i in range(len(mod)))
    return blocks


def head_count(module: nn.Module) -> int | None:
    """The number of attention heads a module declares, if it says so in a usual attribute."""
    for attr in _HEAD_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(module, "config", None)
    v = getattr(cfg, "num_attention_heads", None)
    return v if isinstance(v, int) and v > 0 else None


def first_tensor(out) -> torch.Tensor | None:
    """The main floating-point tensor of a module output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


@dataclass
class Slot:
    """Preallocated 0-d views into the accumulators for one (layer, stat)."""

    layer: str
    stat: str
    view: torch.Tensor


def update_max(view: torch.Tensor, value: torch.Tensor) -> None:
    torch.maximum(view, value, out=view)


def update_min(view: torch.Tensor, value: torch.Tensor) -> None:
    torch.minimum(view, value, out=view)


class ActivationHook:
    """Forward hook: amax/amin of a module's output, and optionally the amax of |grad| flowing
    back into that output (a tensor hook registered on the output each forward)."""

    def __init__(
        self,
        amax: torch.Tensor,
        amin: torch.Tensor,
        grad_amax: torch.Tensor | None,
        nonfinite: torch.Tensor | None,
        record_eval: bool,
    ):
        self.amax, self.amin, self.grad_amax, self.nonfinite = amax, amin, grad_amax, nonfinite
        self.record_eval = record_eval

    def __call__(self, module: nn.Module, args, output) -> None:
        if not (module.training or self.record_eval):
            return None
        out = first_tensor(output)
        if out is None or out.numel() == 0:
            return None
        x = out.detach()
        mn, mx = torch.aminmax(x)
        update_max(self.amax, mx)
        update_min(self.amin, mn)
        if self.nonfinite is not None:
            # max, not sum: a recompute of the same forward sees the same count.
            update_max(self.nonfinite, (~torch.isfinite(x)).sum())
        if self.grad_amax is not None and out.requires_grad:
            out.register_hook(self._grad_hook)
        return None

    def _grad_hook(self, grad: torch.Tensor) -> None:
        # max |g| as max(max g, -min g): one pass and no |g| temporary (abs().amax() makes one).
        mn, mx = torch.aminmax(grad.detach())
        update_max(self.grad_amax, torch.maximum(mx, -mn))
        return None  # returning a tensor would replace the gradient


@dataclass
class AttentionSlots:
    """Accumulator views for one attention layer. Per-head views are 1-d of length `heads`."""

    max: torch.Tensor
    min: torch.Tensor
    bound: torch.Tensor
    head_max: torch.Tensor | None = None
    head_min: torch.Tensor | None = None
    head_bound: torch.Tensor | None = None


@dataclass
class Logits:
    """What one attention call measured, per head: (H,) tensors, None where not measured."""

    max: torch.Tensor | None
    min: torch.Tensor | None
    bound: torch.Tensor | None
    heads: int | None  # None: the call's layout does not say (a 3-d softmax input)


def _to4d(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """A mask or bias broadcastable to (*lead, L, S) as a 4-d tensor broadcastable to (B, H, L, S),
    with `lead` the query's leading dims flattened the way `_as_bhle` flattens them."""
    n = len(lead) + 2
    if t.dim() < n:
        t = t.reshape((1,) * (n - t.dim()) + tuple(t.shape))
    if n == 4:
        return t
    if n < 4:
        return t.reshape((1,) * (4 - n) + tuple(t.shape))
    return t.expand(*lead, *t.shape[-2:]).flatten(0, n - 4)


def split_mask(mask: torch.Tensor | None, true_keeps: bool):
    """(allowed, additive) from a boolean or additive float mask. Bool: `true_keeps` says whether
    True means "takes part" (sdpa) or "masked out" (nn.MultiheadAttention). Float: added to the
    logits; ``-inf`` and anything at or below ``finfo(dtype).min / 2`` masks the position (HF
    fills masks with ``finfo.min``, which is finite)."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return (mask if true_keeps else ~mask), None
    return mask > torch.finfo(mask.dtype).min / 2, mask


def _and(a, b):
    return b if a is None else a if b is None else a & b


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _masked_extremes(logits: torch.Tensor, allowed: torch.Tensor | None, reduce_dims):
    if allowed is not None:
        mx = torch.where(allowed, logits, float("-inf")).amax(dim=reduce_dims)
        mn = torch.where(allowed, logits, float("inf")).amin(dim=reduce_dims)
    else:
        mn, mx = logits.amin(dim=reduce_dims), logits.amax(dim=reduce_dims)
    return mx, mn


def _rows(t: torch.Tensor | None, L: int, start: int, stop: int):
    if t is not None and t.dim() >= 2 and t.shape[-2] == L:
        return t[..., start:stop, :]
    return t


def exact_logit_extremes(q, k, scale, allowed, additive=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head max and min of q·kᵀ·scale + additive over the allowed positions, in fp32.

    q: (B, H, L, E), k: (B, H, S, E); allowed (bool) and additive (float): None or broadcastable
    to (B, H, L, S). Returns two (H,) tensors. Query rows are processed in chunks so the
    materialised logits stay below `_LOGIT_CHUNK_ELEMS` elements.
    """
    B, H, L, _ = q.shape
    S = k.shape[-2]
    q = q.detach().float()
    kt = k.detach().float().transpose(-2, -1)
    rows = max(1, min(L, _LOGIT_CHUNK_ELEMS // max(1, B * H * S)))
    maxes, mins = [], []
    for start in range(0, L, rows):
        stop = min(L, start + rows)
        logits = torch.matmul(q[:, :, start:stop], kt) * scale  # (B, H, rows, S)
        add = _rows(additive, L, start, stop)
        if add is not None:
            logits = logits + add.detach().float()
        mx, mn = _masked_extremes(logits, _rows(allowed, L, start, stop), (0, 2, 3))
        maxes.append(mx.expand(H))
        mins.append(mn.expand(H))
    if len(maxes) == 1:
        return maxes[0], mins[0]
    return torch.stack(maxes).amax(0), torch.stack(mins).amin(0)


def logit_bound(q, k, scale, allowed=None, additive=None) -> torch.Tensor:
    """Per-head upper bound of |q·kᵀ·scale + additive|: max‖q_i‖ · max‖k_j‖ · scale
    (Cauchy-Schwarz), taken per (batch, head) and then maxed over the batch, plus the largest
    |additive| over allowed positions. Costs two norms (and one pass over a float mask), no
    (L, S) product."""
    qn = torch.linalg.vector_norm(q.detach().float(), dim=-1).amax(dim=-1)  # (B, H)
    kn = torch.linalg.vector_norm(k.detach().float(), dim=-1).amax(dim=-1)  # (B, H)
    bound = (qn * kn).amax(dim=0) * abs(scale)  # (H,)
    if additive is not None:
        a = additive.detach().float().abs()
        if allowed is not None:
            a = torch.where(allowed, a, 0.0)
        bound = bound + a.amax(dim=(0, 2, 3))  # (H,) or (1,): broadcasts
    return bound


def _expand_kv_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk and hk > 0 and hq % hk == 0:
        k = k.repeat_interleave(hq // hk, dim=-3)  # grouped-query attention
    return k


def _as_bhle(t: torch.Tensor) -> torch.Tensor:
    """sdpa accepts (..., L, E) with any number of leading dims; view it as (B, H, L, E)."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(0)
    if t.dim() == 2:
        return t[None, None]
    return t.flatten(0, t.dim() - 4)


def sdpa_logits(exact: bool, bound: bool, query, key, value=None, attn_mask=None, dropout_p=0.0,
                is_causal=False, scale=None, enable_gqa=False, **_) -> Logits:
    """What `F.scaled_dot_product_attention`'s arguments say about its logits: the bound every
    call (if `bound`), the exact extremes when `exact` (a second, chunked QKᵀ)."""
    lead = query.shape[:-2]
    q, k = _as_bhle(query), _as_bhle(key)
    k = _expand_kv_heads(q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    L, S = q.shape[-2], k.shape[-2]
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        allowed, additive = split_mask(attn_mask, true_keeps=True)
        if allowed is not None:
            allowed = _to4d(allowed, lead)
        if additive is not None:
            additive = _to4d(additive, lead)
        if is_causal:  # sdpa's causal mask is aligned top-left
            allowed = _and(allowed, torch.ones(L, S, dtype=torch.bool, device=q.device).tril())
        b = logit_bound(q, k, scale, allowed, additive) if bound else None
        mx = mn = None
        if exact:
            mx, mn = exact_logit_extremes(q, k, scale, allowed, additive)
        return Logits(mx, mn, b, q.shape[-3])


def softmax_logits(x: torch.Tensor, heads: int | None) -> Logits:
    """The extremes of a softmax input (the logits themselves), masked entries left out.
    x: (B, H, L, S), or (B*H, L, S) read per head when `heads` divides its first dim."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        valid = x.detach() > torch.finfo(x.dtype).min / 2  # masks write -inf or the dtype's min
        v = x.detach().float()
        if v.dim() == 3 and heads and v.shape[0] % heads == 0:
            v, valid = v.unflatten(0, (-1, heads)), valid.unflatten(0, (-1, heads))
        if v.dim() == 4:
            mx, mn = _masked_extremes(v, valid, (0, 2, 3))
            return Logits(mx, mn, None, v.shape[1])
        mx, mn = _masked_extremes(v, valid, tuple(range(v.dim())))
        return Logits(mx.reshape(1), mn.reshape(1), None, None if v.dim() == 3 else 1)


def mha_logits(args, kwargs) -> Logits | None:
    """Exact logits of `F.multi_head_attention_forward` (``nn.MultiheadAttention``): q and k
    rebuilt from its input projection, masks in its conventions (bool True = masked out, float
    additive). None where it adds key rows we do not rebuild (bias_k, add_zero_attn, static_k)."""
    names = (
        "query key value embed_dim_to_check num_heads in_proj_weight in_proj_bias bias_k bias_v "
        "add_zero_attn dropout_p out_proj_weight out_proj_bias training key_padding_mask "
        "need_weights attn_mask use_separate_proj_weight q_proj_weight k_proj_weight "
        "v_proj_weight static_k static_v average_attn_weights is_causal"
    ).split()
    a = dict(zip(names, args))
    a.update(kwargs)
    if a.get("bias_k") is not None or a.get("add_zero_attn") or a.get("static_k") is not None:
        return None  # extra key rows we do not rebuild: skip rather than report a wrong value
    query, key, heads = a["query"], a["key"], a["num_heads"]
    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        E = query.shape[-1]
        if a.get("use_separate_proj_weight"):
            wq, wk = a["q_proj_weight"], a["k_proj_weight"]
        else:
            wq, wk = a["in_proj_weight"].split(E)[:2]
        bq = bk = None
        if a.get("in_proj_bias") is not None:
            bq, bk = a["in_proj_bias"].split(E)[:2]
        batched = query.dim() == 3
        if not batched:
            query, key = query.unsqueeze(1), key.unsqueeze(1)
        L, B, _ = query.shape
        S = key.shape[0]
        q = F.linear(query.detach().float(), wq.detach().float(), None if bq is None else bq.detach().float())
        k = F.linear(key.detach().float(), wk.detach().float(), None if bk is None else bk.detach().float())
        hd = E // heads
        q = q.reshape(L, B, heads, hd).permute(1, 2, 0, 3)  # (B, H, L, hd)
        k = k.reshape(S, B, heads, hd).permute(1, 2, 0, 3)  # (B, H, S, hd)
        allowed, additive = split_mask(a.get("attn_mask"), true_keeps=False)
        if allowed is not None and allowed.dim() == 3:  # (B*H, L, S)
            allowed = allowed.reshape(B, heads, L, S)
            additive = None if additive is None else additive.reshape(B, heads, L, S)
        kpm = a.get("key_padding_mask")
        if kpm is not None:
            if not batched:
                kpm = kpm.unsqueeze(0)
            keep, kadd = split_mask(kpm, true_keeps=False)
            allowed = _and(allowed, keep[:, None, None, :])
            additive = _add(additive, None if kadd is None else kadd[:, None, None, :])
        mx, mn = exact_logit_extremes(q, k, hd**-0.5, allowed, additive)
        return Logits(mx, mn, None, heads)


def _is_product(func, args) -> bool:
    """A matmul of two activations (no parameter): the shape of an attention score product."""
    if func is torch.einsum:
        ts = [a for a in args[1:] if isinstance(a, torch.Tensor)]
        if len(ts) == 1 and isinstance(args[1], (list, tuple)):
            ts = [a for a in args[1] if isinstance(a, torch.Tensor)]
    elif func in (torch.baddbmm, torch.Tensor.baddbmm):
        ts = list(args[1:3])
    else:
        ts = list(args[:2])
    return (len(ts) == 2 and all(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in ts)
            and not any(isinstance(t, nn.Parameter) for t in ts))


def _softmax_input(args, kwargs) -> torch.Tensor | None:
    """The softmax's input when it normalises over the last dim of a >= 3-d tensor."""
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or dim not in (-1, x.dim() - 1):
        return None
    return x


class AttentionProbe(TorchFunctionMode):
    """Sees the attention logits of one attention module.

    Pushed by the module's forward pre-hook and popped by its forward hook, so it only sees the
    calls made inside that module. It reads three ways of computing attention:

    * ``F.scaled_dot_product_attention`` (the logits never exist): a bound every step from the
      q and k norms, the exact extremes on sampled steps (a second, chunked QKᵀ, plus the
      additive mask);
    * an explicit ``softmax`` over the last dim of a >= 3-d tensor: its input is the logits,
      taken on sampled steps, with masked entries (-inf or near the dtype's minimum) left out;
    * ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): q and k are rebuilt from
      its input projection on sampled steps.

    ``exact`` is a plain attribute set by the thermometer between steps; under torch.compile it
    is guarded, so sampled and unsampled steps are two cached graphs, not a recompile per step.
    """

    def __init__(self, slots: AttentionSlots, bound: bool, heads: int | None = None,
                 record_eval: bool = False):
        super().__init__()
        self.slots = slots
        self.bound = bound
        self.heads = heads
        self.record_eval = record_eval
        self.exact = False

    def pre_hook(self, module, args):
        if module.training or self.record_eval:
            self.__enter__()
        return None

    def post_hook(self, module, args, output):
        if module.training or self.record_eval:
            self.__exit__(None, None, None)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            if self.exact or self.bound:
                self.record(sdpa_logits(self.exact, self.bound, *args, **kwargs))
        elif func in _SOFTMAX_FUNCS:
            if self.exact:
                x = _softmax_input(args, kwargs)
                if x is not None:
                    self.record(softmax_logits(x, self.heads))
        elif func is F.multi_head_attention_forward:
            if self.exact:
                got = mha_logits(args, kwargs)
                if got is not None:
                    self.record(got)
        return func(*args, **kwargs)

    def record(self, got: Logits, per_head: bool = True) -> None:
        s = self.slots
        per_head = per_head and s.head_max is not None
        if got.max is not None:
            update_max(s.max, got.max.amax())
            if per_head:
                update_max(s.head_max, self._per_head(got.max))
        if got.min is not None:
            update_min(s.min, got.min.amin())
            if per_head:
                update_min(s.head_min, self._per_head(got.min))
        if got.bound is not None:
            update_max(s.bound, got.bound.amax())
            if per_head:
                update_max(s.head_bound, self._per_head(got.bound))

    def _per_head(self, v: torch.Tensor) -> torch.Tensor:
        want = self.slots.head_max.shape[0]
        if v.shape[0] != want:
            raise ValueError(
                f"per-head attention logits: this layer has {v.shape[0]} heads but thermo "
                f"allotted {want}; set ThermometerConfig.attn_heads={v.shape[0]}"
            )
        return v


@dataclass
class Found:
    """What the finder saw of one module: attention computed in it or below it."""

    kinds: set[str] = field(default_factory=set)  # "sdpa", "softmax", "mha" made by this module itself
    inside: bool = False  # some attention call ran while this module was on the stack
    heads: int | None = None
    measured: list[Logits] = field(default_factory=list)


class AttentionFinder(TorchFunctionMode):
    """Finds where attention is computed, on the model's first training forward(s).

    Every module gets a pre-hook and a forward hook that keep the stack of modules being run; the
    outermost one pushes this mode, which sees every torch function call in the forward. A call
    of ``scaled_dot_product_attention``, ``multi_head_attention_forward`` or a softmax over the
    last dim of a q @ kᵀ product is attributed to the innermost module running (for the softmax:
    the innermost one that made the product, so an ``nn.Softmax`` child counts for its parent).
    Hugging Face's attention-function registry (``ALL_ATTENTION_FUNCTIONS``: sdpa, eager) ends in
    those calls, so it counts wherever the module calls it. The logits of these first forwards
    are measured too (`measured`), so the first step is recorded like any other.

    The thermometer reads `found` at its first `step()` and then removes every hook of the
    finder (`remove`): later steps pay only for the probes on the modules found. ``active`` is
    read by the hooks, so under torch.compile turning it off retraces once without the finder.
    """

    def __init__(self, model: nn.Module, record_eval: bool, bound: bool):
        super().__init__()
        self.record_eval = record_eval
        self.bound = bound
        self.exact = False
        self.active = True
        self.seen = False  # a recorded forward ran
        self.stack: list[str] = []
        self.found: dict[str, Found] = {}
        self.products: dict[str, set[tuple[int, int]]] = {}
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(), always_call=True))

    def _pre(self, name: str):
        def hook(module, args):
            if self.active and (module.training or self.record_eval):
                if not self.stack:  # the outermost module run: watch the whole forward
                    self.__enter__()
                    self.seen = True
                self.stack.append(name)
            return None

        return hook

    def _post(self):
        def hook(module, args, output):
            if self.active and (module.training or self.record_eval) and self.stack:
                self.stack.pop()
                if not self.stack:
                    self.__exit__(None, None, None)
            return None

        return hook

    def remove(self) -> None:
        self.active = False
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # The stack is read only for the calls that matter: under torch.compile, frames that
        # read it are guarded on its contents (a recompile per module during discovery).
        if func in _ATTENTION_FUNCS and self.stack:
            if func is F.scaled_dot_product_attention:
                self._found(self.stack[-1], "sdpa", sdpa_logits(self.exact, self.bound, *args, **kwargs))
            elif func is F.multi_head_attention_forward:
                got = mha_logits(args, kwargs) if self.exact else None
                self._found(self.stack[-1], "mha", got or Logits(None, None, None, args[4] if len(args) > 4
                                                                  else kwargs.get("num_heads")))
            elif func in _MATMUL_FUNCS:
                if _is_product(func, args):
                    out = func(*args, **kwargs)
                    if isinstance(out, torch.Tensor) and out.dim() >= 3:
                        self.products.setdefault(self.stack[-1], set()).add(tuple(out.shape[-2:]))
                    return out
            elif func in _SOFTMAX_FUNCS:
                x = _softmax_input(args, kwargs)
                if x is not None:
                    owner = None
                    for n in reversed(self.stack):
                        if tuple(x.shape[-2:]) in self.products.get(n, ()):
                            owner = n
                            break
                    if owner is not None:
                        got = softmax_logits(x, None) if self.exact else Logits(
                            None, None, None, x.shape[1] if x.dim() == 4 else None)
                        self._found(owner, "softmax", got)
        return func(*args, **kwargs)

    def _found(self, name: str, kind: str, got: Logits) -> None:
        self.found.setdefault(name, Found()).kinds.add(kind)
        for n in self.stack[: self.stack.index(name) + 1]:  # the module and those around it
            g = self.found.setdefault(n, Found())
            g.inside = True
            g.measured.append(got)
            if got.heads is not None:
                g.heads = got.heads if g.heads is None else max(g.heads, got.heads)


def grad_norm_and_nonfinite(params: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """The global L2 norm of all gradients and the number of gradient tensors (local shards
    under FSDP) holding a non-finite value, both as 0-d fp32 device tensors.

    Plain tensors are taken as they are: under DDP and ZeroRedundancyOptimizer every rank holds
    the full averaged gradient, so the local norm is the global one. DTensor gradients (FSDP2)
    are reduced through DTensor's own placements (one all-reduce), which is exact for sharded and
    replicated dimensions alike.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None, None
    from torch.distributed.tensor import DTensor

    plain = [g.detach() for g in grads if not isinstance(g, DTensor)]
    dtensors = [g.detach() for g in grads if isinstance(g, DTensor)]
    sq_terms, nonfinite_terms = [], []
    if plain:
        norms = torch.stack([n.float() for n in torch._foreach_norm(plain, 2.0)])
        sq_terms.append(norms.square().sum())
        nonfinite_terms.append((~torch.isfinite(norms)).sum())
    if dtensors:
        total = torch.nn.utils.get_total_norm(dtensors, 2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # all-reduce of the partial norms (no host sync)
        sq_terms.append(total.float().square())
        local = torch.stack([n.float() for n in torch._foreach_norm([g.to_local() for g in dtensors], 2.0)])
        nonfinite_terms.append((~torch.isfinite(local)).sum())
    norm = torch.stack(sq_terms).sum().sqrt() if len(sq_terms) > 1 else sq_terms[0].sqrt()
    nonfinite = torch.stack(nonfinite_terms).sum() if len(nonfinite_terms) > 1 else nonfinite_terms[0]
    return norm, nonfinite.float()
