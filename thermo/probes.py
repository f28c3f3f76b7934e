"""What thermo watches and how: module selection, activation/gradient hooks, attention logits,
the global gradient norm.

Every probe writes into preallocated 0-d views of the thermometer's device accumulators with
in-place ``max``/``min`` (never ``+=``: a hook that fires twice, as under activation-checkpoint
recompute, must not change the answer). Nothing here reads a value back to the host.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Class names (matched against the whole MRO, so subclasses count) watched by default.
DEFAULT_WATCH = ("Linear", "LayerNorm", "RMSNorm", "Embedding", "Conv1D")
# An attention module is the innermost module whose class name says so.
_ATTN_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "nhead", "nheads", "heads")
# Query rows per chunk when materialising exact logits: bounds the extra memory to about
# `_LOGIT_CHUNK_ELEMS` fp32 values whatever the sequence length.
_LOGIT_CHUNK_ELEMS = 1 << 24

_SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}


def class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


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


def find_attention(model: nn.Module, patterns: Iterable[str] = ()) -> list[str]:
    """Names of the attention modules: those matching `patterns` if given, else the innermost
    modules whose class name contains "attention"/"attn" (CausalSelfAttention, GPT2Attention,
    MultiheadAttention...)."""
    patterns = tuple(patterns)
    named = dict(model.named_modules())
    if patterns:
        return [n for n in named if n and _matches(n, patterns)]
    hits = [
        n
        for n, m in named.items()
        if not isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.Sequential))
        and any(_ATTN_CLASS.search(c) for c in class_names(m) - {"Module"})
    ]
    return [n for n in hits if not any(o != n and o.startswith(n + ".") for o in hits)]


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


def _allowed_mask_sdpa(attn_mask, is_causal: bool, L: int, S: int, device) -> torch.Tensor | None:
    """Boolean (True = takes part) mask broadcastable to (B, H, L, S), in sdpa's conventions."""
    allowed = None
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=0)
    if attn_mask is not None:
        m = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        allowed = m if allowed is None else allowed & m
    return allowed


def _masked_extremes(logits: torch.Tensor, allowed: torch.Tensor | None, reduce_dims):
    if allowed is not None:
        mx = torch.where(allowed, logits, float("-inf")).amax(dim=reduce_dims)
        mn = torch.where(allowed, logits, float("inf")).amin(dim=reduce_dims)
    else:
        mn, mx = logits.amin(dim=reduce_dims), logits.amax(dim=reduce_dims)
    return mx, mn


def exact_logit_extremes(q, k, scale, allowed) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head max and min of q·kᵀ·scale over the allowed positions, in fp32.

    q: (B, H, L, E), k: (B, H, S, E), allowed: None or bool broadcastable to (B, H, L, S).
    Returns two (H,) tensors. Query rows are processed in chunks so the materialised logits
    stay below `_LOGIT_CHUNK_ELEMS` elements.
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
        chunk_allowed = None
        if allowed is not None:
            a = allowed
            if a.dim() >= 2 and a.shape[-2] == L:
                a = a[..., start:stop, :]
            chunk_allowed = a
        mx, mn = _masked_extremes(logits, chunk_allowed, (0, 2, 3))
        maxes.append(mx)
        mins.append(mn)
    if len(maxes) == 1:
        return maxes[0], mins[0]
    return torch.stack(maxes).amax(0), torch.stack(mins).amin(0)


def logit_bound(q, k, scale) -> torch.Tensor:
    """Per-head upper bound of |q·kᵀ·scale|: max‖q_i‖ · max‖k_j‖ · scale (Cauchy-Schwarz),
    taken per (batch, head) and then maxed over the batch. Costs two norms, no (L, S) tensor."""
    qn = torch.linalg.vector_norm(q.detach().float(), dim=-1).amax(dim=-1)  # (B, H)
    kn = torch.linalg.vector_norm(k.detach().float(), dim=-1).amax(dim=-1)  # (B, H)
    return (qn * kn).amax(dim=0) * abs(scale)  # (H,)


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


def _mha_q_k(args, kwargs):
    """q, k (B, H, L, E), scale and allowed-mask from F.multi_head_attention_forward's arguments."""
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
    q = F.linear(query.detach(), wq.detach(), None if bq is None else bq.detach())
    k = F.linear(key.detach(), wk.detach(), None if bk is None else bk.detach())
    hd = E // heads
    q = q.reshape(L, B, heads, hd).permute(1, 2, 0, 3)
    k = k.reshape(S, B, heads, hd).permute(1, 2, 0, 3)
    allowed = None
    mask = a.get("attn_mask")
    if mask is not None:  # MHA convention: bool True = masked out; float: additive
        allowed = ~mask if mask.dtype == torch.bool else mask > float("-inf")
        if allowed.dim() == 3:  # (B*H, L, S)
            allowed = allowed.reshape(B, heads, L, S)
    kpm = a.get("key_padding_mask")
    if kpm is not None:
        if not batched:
            kpm = kpm.unsqueeze(0)
        keep = ~kpm if kpm.dtype == torch.bool else kpm > float("-inf")
        keep = keep[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    return q, k, hd**-0.5, allowed


class AttentionProbe(TorchFunctionMode):
    """Sees the attention logits of one attention module.

    Pushed by the module's forward pre-hook and popped by its forward hook, so it only sees the
    calls made inside that module. It recognises three ways of computing attention:

    * ``F.scaled_dot_product_attention`` (the logits never exist): a bound every step from the
      q and k norms, the exact extremes on sampled steps (a second, chunked QKᵀ);
    * an explicit ``softmax`` (``softmax(q @ kᵀ * scale + mask)``): its input is the logits,
      taken on sampled steps, with masked entries (-inf or near the dtype's minimum) left out;
    * ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): q and k are rebuilt from
      its input projection on sampled steps.

    ``exact`` is a plain attribute set by the thermometer between steps; under torch.compile it
    is guarded, so sampled and unsampled steps are two cached graphs, not a recompile per step.
    """

    def __init__(self, slots: AttentionSlots, bound: bool):
        super().__init__()
        self.slots = slots
        self.bound = bound
        self.exact = False

    def pre_hook(self, module, args):
        if module.training:
            self.__enter__()
        return None

    def post_hook(self, module, args, output):
        if module.training:
            self.__exit__(None, None, None)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self._sdpa(*args, **kwargs)
        elif func in _SOFTMAX_FUNCS:
            if self.exact:
                self._softmax(args[0])
        elif func is F.multi_head_attention_forward:
            if self.exact:
                self._mha(args, kwargs)
        return func(*args, **kwargs)

    def _record(self, mx: torch.Tensor, mn: torch.Tensor | None, bound: torch.Tensor | None):
        """mx, mn, bound: per-head (H,) tensors."""
        s = self.slots
        if mx is not None:
            update_max(s.max, mx.amax())
            if s.head_max is not None:
                update_max(s.head_max, self._per_head(mx))
        if mn is not None:
            update_min(s.min, mn.amin())
            if s.head_min is not None:
                update_min(s.head_min, self._per_head(mn))
        if bound is not None:
            update_max(s.bound, bound.amax())
            if s.head_bound is not None:
                update_max(s.head_bound, self._per_head(bound))

    def _per_head(self, v: torch.Tensor) -> torch.Tensor:
        want = self.slots.head_max.shape[0]
        if v.shape[0] != want:
            raise ValueError(
                f"per-head attention logits: this layer has {v.shape[0]} heads but thermo "
                f"allotted {want}; set ThermometerConfig.attn_heads={v.shape[0]}"
            )
        return v

    def _sdpa(self, query, key, value=None, attn_mask=None, dropout_p=0.0, is_causal=False,
              scale=None, enable_gqa=False, **_):
        q, k = _as_bhle(query), _as_bhle(key)
        k = _expand_kv_heads(q, k)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            bound = logit_bound(q, k, scale) if self.bound else None
            mx = mn = None
            if self.exact:
                allowed = _allowed_mask_sdpa(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
                mx, mn = exact_logit_extremes(q, k, scale, allowed)
            self._record(mx, mn, bound)

    def _softmax(self, logits: torch.Tensor):
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            x = logits.detach().float()
            # Masks write -inf or the dtype's minimum (HF): those entries are not logits.
            valid = x > torch.finfo(logits.dtype).min / 2
            dims = (0, 2, 3) if x.dim() == 4 else tuple(range(x.dim()))
            mx, mn = _masked_extremes(x, valid, dims)
            if x.dim() != 4:
                mx, mn = mx.reshape(1), mn.reshape(1)
            self._record(mx, mn, None)

    def _mha(self, args, kwargs):
        with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            got = _mha_q_k(args, kwargs)
            if got is None:
                return
            q, k, scale, allowed = got
            mx, mn = exact_logit_extremes(q, k, scale, allowed)
            self._record(mx, mn, None)


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
