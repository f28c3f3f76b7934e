"""Plain, slow recomputations of what thermo records, for the exactness tests.

Nothing here shares code with thermo's probes: values are captured with ordinary hooks, copied
to the host (syncs are fine here) and reduced in float64.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn as nn


class Recorder:
    """Captures, per step, max/min of module outputs and max |grad| flowing into them."""

    def __init__(self, model: nn.Module, names: list[str], grad_names: list[str] = ()):
        self.values: dict[tuple[str, str], float] = {}
        self.handles = []
        mods = dict(model.named_modules())
        for name in names:
            self.handles.append(mods[name].register_forward_hook(self._fwd(name, name in grad_names)))

    def _fwd(self, name, want_grad):
        def hook(module, args, out):
            if isinstance(out, (tuple, list)):
                out = out[0]
            x = out.detach().double()
            self._put(name, "act_max", x.max().item(), max)
            self._put(name, "act_min", x.min().item(), min)
            if want_grad and out.requires_grad:
                out.register_hook(lambda g: self._put(name, "grad_max", g.detach().double().abs().max().item(), max))

        return hook

    def _put(self, name, stat, v, op):
        key = (name, stat)
        self.values[key] = v if key not in self.values else op(self.values[key], v)

    def take(self) -> dict[tuple[str, str], float]:
        out, self.values = self.values, {}
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def logit_extremes(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> tuple[float, float]:
    """max/min of q·kᵀ·scale over the causal (or full) positions, float64. q, k: (B, H, T, E)."""
    logits = (q.double() @ k.double().transpose(-2, -1)) * scale
    if causal:
        T, S = logits.shape[-2:]
        allowed = torch.ones(T, S, dtype=torch.bool).tril()
        return logits[..., allowed].max().item(), logits[..., allowed].min().item()
    return logits.max().item(), logits.min().item()


class QKVCapture:
    """Captures the fused qkv projection output of attention layers (thermo GPT's ``c_attn``,
    Hugging Face GPT-2's ``c_attn`` Conv1D) and turns it into per-layer logit extremes."""

    def __init__(self, model: nn.Module, attn_names: list[str], n_head: int):
        self.n_head = n_head
        self.captured = defaultdict(list)
        mods = dict(model.named_modules())
        self.handles = [
            mods[f"{n}.c_attn"].register_forward_hook(self._hook(n)) for n in attn_names
        ]

    def _hook(self, name):
        def hook(module, args, out):
            self.captured[name].append(out.detach().clone())

        return hook

    def take(self) -> dict[str, tuple[float, float]]:
        res = {}
        for name, outs in self.captured.items():
            mx, mn = -math.inf, math.inf
            for qkv in outs:
                B, T, C3 = qkv.shape
                C = C3 // 3
                q, k, _ = qkv.split(C, dim=2)
                q = q.view(B, T, self.n_head, -1).transpose(1, 2)
                k = k.view(B, T, self.n_head, -1).transpose(1, 2)
                a, b = logit_extremes(q, k, (C // self.n_head) ** -0.5, causal=True)
                mx, mn = max(mx, a), min(mn, b)
            res[name] = (mx, mn)
        self.captured.clear()
        return res

    def remove(self):
        for h in self.handles:
            h.remove()


def grad_norm(model: nn.Module) -> float:
    total = 0.0
    for p in model.parameters():
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum().item()
    return math.sqrt(total)


def assert_close(got: float, want: float, rel: float, what: str) -> None:
    if math.isnan(want):
        assert math.isnan(got), f"{what}: got {got}, want nan"
        return
    if math.isinf(want):
        assert got == want, f"{what}: got {got}, want {want}"
        return
    tol = rel * max(abs(want), 1e-6)
    assert abs(got - want) <= tol, f"{what}: got {got!r}, want {want!r} (rel tol {rel})"


HOST_SYNCS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy")


def forbid_host_syncs(monkeypatch, where: str = "inside a step") -> dict[str, bool]:
    """Make every read-back of a tensor to the host raise while ``armed["on"]`` is True (what a
    GPU's ``set_sync_debug_mode("error")`` checks, on the CPU). Returns `armed`."""
    armed = {"on": False}

    def forbid(name, orig):
        def f(self, *a, **k):
            if armed["on"]:
                raise AssertionError(f"host sync: Tensor.{name} called {where}")
            return orig(self, *a, **k)

        return f

    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, forbid(name, getattr(torch.Tensor, name)))
    return armed
