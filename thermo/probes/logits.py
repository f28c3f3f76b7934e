"""Reading attention logits from the arguments of the call that computes attention.

One definition on every path: the logit of query i and key j is the value the softmax sees,
``q_i·k_j·scale + bias_ij``, where the bias is whatever is added before the softmax (T5's position
bias, ALiBi, a float mask's finite entries). Masked positions (bool False, ``-inf``, or an additive
value at or below ``finfo(dtype).min / 2``) are left out.

Each reader returns a `Logits` of (H,) tensors computed on the device; none reads a value back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Query rows per chunk when materialising exact logits: bounds the extra memory to about
# `_LOGIT_CHUNK_ELEMS` fp32 values whatever the sequence length.
_LOGIT_CHUNK_ELEMS = 1 << 24


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


def exact_logit_extremes(q, k, scale, allowed, additive=None, mods=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head max and min of q·kᵀ·scale + additive over the allowed positions, in fp32.

    q: (B, H, L, E), k: (B, H, S, E); allowed (bool) and additive (float): None or broadcastable
    to (B, H, L, S). `mods`, if given, maps the (B, H, rows, S) scores of query rows
    ``start:start+rows`` to (logits, allowed) (flex_attention's score_mod and mask_mod). Returns
    two (H,) tensors. Query rows are processed in chunks so the materialised logits stay below
    `_LOGIT_CHUNK_ELEMS` elements.
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
        keep = _rows(allowed, L, start, stop)
        if mods is not None:
            logits, keep = mods(logits, start)
        mx, mn = _masked_extremes(logits, keep, (0, 2, 3))
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


class _FlexMods:
    """flex_attention's score_mod and mask_mod over a chunk of query rows, vectorised by
    broadcasting: b, h, q_idx and kv_idx are aranges shaped (B,1,1,1), (1,H,1,1), (1,1,rows,1)
    and (1,1,1,S), so a score_mod written with tensor ops (as flex_attention requires) gives the
    (B, H, rows, S) scores its kernel computes. A position is masked where mask_mod is False or
    the modified score is ``-inf`` or at or below ``finfo.min / 2`` (a NaN score stays in)."""

    def __init__(self, score_mod, mask_mod, score_buffers=(), mask_buffers=()):
        self.score_mod, self.mask_mod = score_mod, mask_mod
        self.score_buffers, self.mask_buffers = tuple(score_buffers), tuple(mask_buffers)

    def __call__(self, scores: torch.Tensor, start: int):
        B, H, rows, S = scores.shape
        dev = scores.device
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, H, 1, 1)
        i = torch.arange(start, start + rows, device=dev).view(1, 1, rows, 1)
        j = torch.arange(S, device=dev).view(1, 1, 1, S)
        logits = torch.broadcast_to(self.score_mod(scores, b, h, i, j, *self.score_buffers), scores.shape)
        keep = ~(logits <= torch.finfo(logits.dtype).min / 2)
        if self.mask_mod is not None:
            keep = keep & torch.broadcast_to(self.mask_mod(b, h, i, j, *self.mask_buffers), scores.shape)
        return logits.float(), keep


def flex_logits(exact: bool, bound: bool, query, key, value, score_mod, block_mask, scale,
                kernel_options=None, score_mod_other_buffers=(), mask_mod_other_buffers=(), **_) -> Logits:
    """What the arguments of the ``flex_attention`` higher-order op say about its logits: the
    scores its softmax sees, ``score_mod(q·kᵀ·scale, b, h, q_idx, kv_idx)`` where the block
    mask's mask_mod allows (the definition the block mask's blocks are built from).

    The op is what a ``TorchFunctionMode`` sees of ``torch.nn.attention.flex_attention`` (which
    compiles it, tracing the mode's ``__torch_function__`` with it): q, k, v (B, H, L, E), the
    score_mod, the block mask as a tuple ending in its mask_mod, the resolved scale. The bound
    (max‖q‖·max‖k‖·scale) is given only without a score_mod, which could add anything."""
    from torch.nn.attention.flex_attention import _identity

    q, k = query, _expand_kv_heads(query, key)
    if k.shape[0] != q.shape[0]:
        k = k.expand(q.shape[0], *k.shape[1:])  # one kv batch for every query batch
    mask_mod = block_mask[-1] if isinstance(block_mask, tuple) and block_mask else None
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        b = logit_bound(q, k, scale) if bound and score_mod is _identity else None
        mx = mn = None
        if exact:
            mods = _FlexMods(score_mod, mask_mod, score_mod_other_buffers, mask_mod_other_buffers)
            mx, mn = exact_logit_extremes(q, k, scale, None, None, mods)
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
