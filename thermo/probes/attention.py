"""Where attention is computed and what its logits are: the finder that looks for it on the
first forward, and the probe pushed around each attention module afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from thermo.probes.activations import update_max, update_min
from thermo.probes.logits import Logits, flex_logits, mha_logits, sdpa_logits, softmax_logits

_SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}
# Products of two activations (q @ kᵀ); a softmax over a tensor of the same trailing shape in the
# same module is an attention softmax (a router's softmax over F.linear logits is not).
_MATMUL_FUNCS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
                 torch.baddbmm, torch.Tensor.baddbmm, torch.einsum}
_ATTENTION_FUNCS = {F.scaled_dot_product_attention, F.multi_head_attention_forward} | _SOFTMAX_FUNCS | _MATMUL_FUNCS


def _flex_op():
    """The higher-order op that ``torch.nn.attention.flex_attention`` calls: what a
    TorchFunctionMode sees of it (None on a torch without it)."""
    try:
        from torch._higher_order_ops.flex_attention import flex_attention
    except ImportError:
        return None
    return flex_attention


_FLEX = _flex_op()
if _FLEX is not None:
    _ATTENTION_FUNCS.add(_FLEX)


@dataclass
class AttentionSlots:
    """Accumulator views for one attention layer. Per-head views are 1-d of length `heads`."""

    max: torch.Tensor
    min: torch.Tensor
    bound: torch.Tensor
    head_max: torch.Tensor | None = None
    head_min: torch.Tensor | None = None
    head_bound: torch.Tensor | None = None


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
    calls made inside that module. It reads four ways of computing attention:

    * ``F.scaled_dot_product_attention`` (the logits never exist): a bound every step from the
      q and k norms, the exact extremes on sampled steps (a second, chunked QKᵀ, plus the
      additive mask);
    * an explicit ``softmax`` over the last dim of a >= 3-d tensor: its input is the logits,
      taken on sampled steps, with masked entries (-inf or near the dtype's minimum) left out;
    * ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): q and k are rebuilt from
      its input projection on sampled steps;
    * ``flex_attention`` (seen as its higher-order op, inside the compile it makes): the score_mod
      and the block mask's mask_mod are applied to a second, chunked QKᵀ on sampled steps; a
      bound every step where there is no score_mod.

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
        elif func is _FLEX:
            if self.exact or self.bound:
                self.record(flex_logits(self.exact, self.bound, *args, **kwargs))
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

    kinds: set[str] = field(default_factory=set)  # "sdpa", "softmax", "mha", "flex" made by this module itself
    inside: bool = False  # some attention call ran while this module was on the stack
    heads: int | None = None
    measured: list[Logits] = field(default_factory=list)


class AttentionFinder(TorchFunctionMode):
    """Finds where attention is computed, on the model's first training forward(s).

    Every module gets a pre-hook and a forward hook that keep the stack of modules being run; the
    outermost one pushes this mode, which sees every torch function call in the forward. A call
    of ``scaled_dot_product_attention``, ``flex_attention`` (its higher-order op),
    ``multi_head_attention_forward`` or a softmax over the last dim of a q @ kᵀ product is
    attributed to the innermost module running (for the softmax: the innermost one that made the
    product, so an ``nn.Softmax`` child counts for its parent).
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
            elif func is _FLEX:
                self._found(self.stack[-1], "flex", flex_logits(self.exact, self.bound, *args, **kwargs))
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
