"""Activation probes: the extremes of a module's output and of the gradient flowing back into
it, and the global gradient norm.

Accumulators are preallocated 0-d views of the thermometer's device buffer, updated in place with
``max``/``min`` (never ``+=``: a hook that fires twice, as under activation-checkpoint recompute,
must not change the answer). Nothing here reads a value back to the host.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def update_max(view: torch.Tensor, value: torch.Tensor) -> None:
    torch.maximum(view, value, out=view)


def update_min(view: torch.Tensor, value: torch.Tensor) -> None:
    torch.minimum(view, value, out=view)


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
