"""QK-Clip (Kimi K2): a thermostat for attention-logit growth, on the device, driven by the
thermometer's own exact per-head logits.

When a head's max attention logit S_max exceeds ``tau``, its query and key projections are scaled
right after the optimizer step so that, on the same input, the head's max logit becomes ``tau``:
factor γ = min(1, tau / S_max), sqrt(γ) on W_q's rows (and bias) of the head and sqrt(γ) on W_k's.
Megatron-LM's ``clip_qk`` reads the max with ``.item()``; here γ is computed and applied with
device ops only (clamp, sqrt, an in-place row multiply), so no step waits for the host.

Which steps clip: only steps where the thermometer computed the exact logits (every
``ThermometerConfig.attn_every`` steps). The Cauchy-Schwarz bound recorded on the other steps
(max‖q‖·max‖k‖·scale) can exceed the true max many times over, and clipping on it would shrink
healthy heads; set ``attn_every=1`` to clip every step (one more QKᵀ per step). A step the Guard
skipped (rung 1) is not clipped either, so that a skip stays a step that changed nothing.

Layouts (``layout`` of each `_Target`):

=============  =============================================================================
``fused``      nanoGPT-style ``c_attn = nn.Linear(d, 3d)`` (q, k, v stacked on the output rows),
               and ``nn.MultiheadAttention``'s ``in_proj_weight``.
``conv1d``     Hugging Face GPT-2's ``Conv1D`` ``c_attn``: weight (d, 3d), q/k/v on the columns.
``separate``   Llama/Qwen2-style ``q_proj``/``k_proj`` Linears, with grouped-query attention:
               several q heads share one k head. There the whole γ goes on the q head's rows
               and W_k is left alone: sqrt on a shared k head would also cool its sibling heads
               (or, with the group's min, over-clip them), while γ on q alone brings exactly the
               hot head to tau and leaves every other head bit-identical. Without GQA (as many k
               heads as q heads) it is sqrt on both, as Kimi K2.
=============  =============================================================================

A layout it cannot map is an error naming the module and what was expected, raised as soon as
the layers are known: the thermometer finds its attention layers in the first forward, so that is
the first step's `capture` after it (step 2 under the Guard). So is a ``q_norm``/``k_norm`` after
the projections (the norm would undo the scale).

Under torch.distributed the per-head maxima are MAX-all-reduced first (on the device), so every
rank applies the same factors; FSDP2's DTensor parameters are scaled through DTensor ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from thermo import _dist
from thermo.probes import class_names


@dataclass
class _Target:
    """One attention layer: where its q and k heads live."""

    name: str
    layout: str  # "fused", "conv1d" or "separate"
    heads: int  # q heads (= the thermometer's per-head slots)
    kv_heads: int
    head_dim: int
    q_weight: nn.Parameter
    q_bias: nn.Parameter | None
    k_weight: nn.Parameter | None  # None for "fused"/"conv1d": q and k share q_weight
    k_bias: nn.Parameter | None
    d: int = 0  # model width of a fused projection (k starts at row d)


def _heads_of(mod: nn.Module, cfg_attr: str, attrs: tuple[str, ...]) -> int | None:
    for a in attrs:
        v = getattr(mod, a, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(getattr(mod, "config", None), cfg_attr, None)
    return v if isinstance(v, int) and v > 0 else None


def map_attention(name: str, mod: nn.Module, heads: int) -> _Target:
    """Where the q and k heads of attention module `mod` live; `heads` is the thermometer's
    per-head count. Raises ValueError naming the module and the layouts understood."""
    where = f"QK-Clip: attention layer {name!r} ({type(mod).__name__})"
    for norm in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
        if isinstance(getattr(mod, norm, None), nn.Module):
            raise ValueError(
                f"{where} normalises q/k after the projection ({norm}): scaling W_q/W_k would be "
                "undone by the norm, so QK-Clip cannot act there; leave GuardConfig.qk_clip_tau=None "
                "for this model (QK-norm already bounds the logits)"
            )
    if isinstance(mod, nn.MultiheadAttention):
        if not mod._qkv_same_embed_dim or mod.in_proj_weight is None:
            raise ValueError(f"{where}: separate q/k/v projection weights of nn.MultiheadAttention "
                             "are not supported; use kdim=vdim=embed_dim")
        d = mod.embed_dim
        return _Target(name, "fused", heads, heads, d // heads, mod.in_proj_weight, mod.in_proj_bias,
                       None, None, d)
    c_attn = getattr(mod, "c_attn", None)
    if c_attn is not None:
        w = c_attn.weight
        if "Conv1D" in class_names(c_attn) and w.dim() == 2 and w.shape[1] == 3 * w.shape[0]:
            d = w.shape[0]
            return _Target(name, "conv1d", heads, heads, d // heads, w, c_attn.bias, None, None, d)
        if isinstance(c_attn, nn.Linear) and w.shape[0] == 3 * w.shape[1]:
            d = w.shape[1]
            return _Target(name, "fused", heads, heads, d // heads, w, c_attn.bias, None, None, d)
        raise ValueError(
            f"{where}: c_attn is {type(c_attn).__name__} with weight {tuple(w.shape)}; expected "
            "nn.Linear(d, 3d) (weight (3d, d), nanoGPT) or Hugging Face Conv1D (weight (d, 3d))"
        )
    q, k = getattr(mod, "q_proj", None), getattr(mod, "k_proj", None)
    if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
        if q.weight.shape[0] % heads:
            raise ValueError(f"{where}: q_proj has {q.weight.shape[0]} outputs, not a multiple of "
                             f"{heads} heads")
        head_dim = q.weight.shape[0] // heads
        if k.weight.shape[0] % head_dim:
            raise ValueError(f"{where}: k_proj has {k.weight.shape[0]} outputs, not a multiple of "
                             f"the head size {head_dim}")
        kv = k.weight.shape[0] // head_dim
        if heads % kv:
            raise ValueError(f"{where}: {heads} q heads cannot share {kv} k heads evenly")
        return _Target(name, "separate", heads, kv, head_dim, q.weight, q.bias, k.weight, k.bias)
    raise ValueError(
        f"{where}: cannot find its query and key projections; expected a fused `c_attn` "
        "(nn.Linear(d, 3d) as nanoGPT, or Hugging Face GPT-2's Conv1D), nn.MultiheadAttention, or "
        "separate `q_proj`/`k_proj` nn.Linear (Llama, Qwen2, Mistral). Leave "
        "GuardConfig.qk_clip_tau=None for this model, or exclude the layer from the thermometer"
    )


class QKClip:
    """Scale W_q/W_k of every attention head whose exact max logit exceeded `tau`.

    Args:
        thermometer: a `Thermometer` with ``attn_per_head=True`` and ``attn_every > 0``.
        tau: the largest max logit a head keeps (Kimi K2 used 100).

    Call `capture` after the backward, before ``thermometer.step()`` (which resets the
    accumulators), and `apply` right after ``optimizer.step()``. The Guard does both when
    ``GuardConfig.qk_clip_tau`` is set.

    Example::

        clip = QKClip(therm, tau=100.0)
        loss.backward()
        hot = clip.capture()          # (device) number of heads above tau this step
        therm.step(loss, qk_clip_heads=hot)
        opt.step()
        clip.apply()
    """

    def __init__(self, thermometer, tau: float = 100.0):
        if not tau > 0:
            raise ValueError(f"QKClip: tau must be > 0, got {tau}")
        cfg = thermometer.config
        if not (cfg.attention and cfg.attn_per_head and cfg.attn_every > 0):
            raise ValueError(
                "QK-Clip needs the exact per-head attention logits: construct the thermometer with "
                f"ThermometerConfig(attention=True, attn_per_head=True, attn_every>0); got "
                f"attention={cfg.attention}, attn_per_head={cfg.attn_per_head}, attn_every={cfg.attn_every}"
            )
        self.tau = float(tau)
        self.therm = thermometer
        self.targets: list[_Target] | None = None  # bound once the thermometer knows its attention
        self._smax: torch.Tensor | None = None  # every layer's per-head maxima, one flat tensor
        self._hot: torch.Tensor | None = None
        self._pending = False
        self._none = torch.zeros((), device=thermometer.buffer.device)  # "no head clipped", never written
        views = thermometer.attention_head_max()
        if views:
            self._bind(views)

    def _bind(self, views: dict[str, torch.Tensor]) -> None:
        """Map each attention layer to its q/k projections (raises for a layout it cannot map)."""
        mods = dict(self.therm.model.named_modules())
        self.targets = [map_attention(n, mods[n], v.shape[0]) for n, v in views.items()]
        device = next(iter(views.values())).device
        self._smax = torch.full((sum(v.shape[0] for v in views.values()),), float("-inf"), device=device)
        self._hot = torch.zeros((), device=device)

    @torch.no_grad()
    def capture(self) -> torch.Tensor:
        """Copy this step's per-head maxima off the thermometer's accumulators (a step with no
        exact logits leaves -inf there: nothing clips). Returns the number of heads above tau,
        a 0-d device tensor; reading it is a host sync.

        The thermometer finds its attention layers in the first forward and lays out their
        slots at its first `step`, so the layers are mapped at the first capture after that
        (an unmappable layout raises then); until then nothing is captured."""
        # The thermometer alone decides which steps have exact logits (the same on every rank);
        # on the others there is nothing to read, reduce or scale.
        if not self.therm._is_exact():
            return self._none
        # Fetched every step: the thermometer replaces its buffer once, when it lays out attention.
        views = self.therm.attention_head_max()
        if not views:
            if getattr(self.therm, "_finder", None) is None:  # discovery over, still nothing
                raise ValueError(
                    "QK-Clip: the thermometer records no attention layer per head, so there is "
                    "nothing to clip; name the attention modules with ThermometerConfig.attn_modules "
                    "(and attn_heads if the head count cannot be read), or leave "
                    "GuardConfig.qk_clip_tau=None"
                )
            return self._none  # before the thermometer's first step: no layer known yet
        if self.targets is None:
            self._bind(views)
        torch.cat(list(views.values()), out=self._smax)
        if _dist.world_size() > 1:
            # Every rank must scale alike: the max over ranks (NaN would not survive a MAX
            # collective reliably, and is no reason to clip: it becomes -inf).
            self._smax.nan_to_num_(nan=float("-inf"))
            _dist.max_(self._smax)
        self._hot.copy_(self._hot_mask().sum())
        self._pending = True
        return self._hot

    def _hot_mask(self) -> torch.Tensor:
        s = self._smax
        return torch.isfinite(s) & (s > self.tau)  # +inf/NaN: the skip and the rollback act, not a clip

    @torch.no_grad()
    def apply(self, skipped: torch.Tensor | None = None) -> None:
        """Scale the hot heads' projections in place; `skipped` (the Guard's device flag, 1.0 =
        this step's update was skipped) turns the clip off for that step. No host sync."""
        if not self._pending:
            return
        self._pending = False
        hot = self._hot_mask()
        if skipped is not None:
            hot = hot & (skipped <= 0)
        gamma = torch.where(hot, self.tau / self._smax, 1.0)  # (sum of heads,) in (0, 1]
        start = 0
        for t in self.targets:
            g = gamma[start : start + t.heads]
            start += t.heads
            _scale(t, g)


def qk_clip_thermometer(config, thermometer):
    """The thermometer configuration a Guard with ``GuardConfig.qk_clip_tau`` set needs: per-head
    exact logits. None becomes the default with ``attn_per_head=True``; a configuration the user
    gave is used as it is, or refused with the fix (never silently changed)."""
    from thermo.thermometer import ThermometerConfig

    if config is None or config.qk_clip_tau is None:
        return thermometer
    if thermometer is None:
        return ThermometerConfig(attn_per_head=True)
    if not (thermometer.attention and thermometer.attn_per_head and thermometer.attn_every > 0):
        raise ValueError(
            f"GuardConfig.qk_clip_tau={config.qk_clip_tau} clips on the exact per-head attention "
            "logits, but the ThermometerConfig given has attention="
            f"{thermometer.attention}, attn_per_head={thermometer.attn_per_head}, attn_every="
            f"{thermometer.attn_every}; pass ThermometerConfig(..., attn_per_head=True) with "
            "attention=True and attn_every > 0, or leave qk_clip_tau=None"
        )
    return thermometer


def _rows(factor: torch.Tensor, head_dim: int) -> torch.Tensor:
    return factor.repeat_interleave(head_dim)  # (heads,) -> (heads * head_dim,)


def _scale(t: _Target, gamma: torch.Tensor) -> None:
    """Multiply the q (and k) rows of each head by its factor; gamma: (heads,)."""
    if t.layout in ("fused", "conv1d"):
        root = gamma.sqrt()
        ones = torch.ones(t.d, dtype=root.dtype, device=root.device)
        f = torch.cat([_rows(root, t.head_dim), _rows(root, t.head_dim), ones])  # (3d,): q, k, v
        _mul(t.q_weight, f, dim=1 if t.layout == "conv1d" else 0)
        _mul(t.q_bias, f, dim=0)
        return
    if t.kv_heads == t.heads:  # no GQA: sqrt on both, as Kimi K2
        qf = kf = _rows(gamma.sqrt(), t.head_dim)
    else:  # GQA: all of it on the q head (see the module docstring)
        qf, kf = _rows(gamma, t.head_dim), None
    _mul(t.q_weight, qf, dim=0)
    _mul(t.q_bias, qf, dim=0)
    if kf is not None:
        _mul(t.k_weight, kf, dim=0)
        _mul(t.k_bias, kf, dim=0)


def _mul(p: torch.Tensor | None, f: torch.Tensor, dim: int) -> None:
    """p *= f along `dim` (f's length = p.shape[dim]), in place, in p's dtype."""
    if p is None:
        return
    shape = [1] * p.dim()
    shape[dim] = -1
    f = f.reshape(shape)
    if isinstance(p, DTensor):  # FSDP2: a replicated factor; DTensor slices it to the local shard
        from torch.distributed.tensor import Replicate

        f = DTensor.from_local(f.to(p.dtype), p.device_mesh, [Replicate()] * p.device_mesh.ndim,
                               run_check=False)
        p.mul_(f)
        return
    p.mul_(f.to(p.dtype))
