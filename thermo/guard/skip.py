"""Rung 1: skip a bad step on the device, without a host sync."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from thermo.guard.config import GuardConfig


class _DeviceSkip:
    """Rung 1: decide on the device whether this step's update is applied, and mask it."""

    def __init__(self, cfg: GuardConfig, optimizer, params: list[nn.Parameter], device):
        self.cfg = cfg
        self.params = params
        # (loss, grad norm) of recent healthy steps; NaN = empty slot
        self.window = torch.full((2, cfg.skip_window), float("nan"), device=device)
        self.filled = 0  # host-side count of window writes: which slot is next, no sync
        self.flag = torch.zeros((), device=device)
        self.fused = _fused_optimizers(optimizer)
        for opt in self.fused:
            opt.found_inf = self.flag  # read by the fused kernels at optimizer.step()

    def __call__(self, loss: torch.Tensor, gnorm: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = torch.stack([loss.detach().float().reshape(()), gnorm.detach().float().reshape(())])
        bad = ~torch.isfinite(x).all() if cfg.skip_nonfinite else torch.zeros((), dtype=torch.bool, device=x.device)
        if cfg.skip_z is not None and self.filled >= cfg.skip_min_window:
            mean = self.window.nanmean(dim=1)
            std = (self.window - mean[:, None]).square().nanmean(dim=1).sqrt()
            bad = bad | (x > mean + cfg.skip_z * std).any()
        self.flag.copy_(bad)
        # Only healthy steps enter the window (a skipped slot keeps its old value).
        slot = self.window[:, self.filled % cfg.skip_window]
        slot.copy_(torch.where(bad, slot, torch.nan_to_num(x)))
        self.filled += 1
        if not self.fused:
            for p in self.params:  # other optimizers: drop this step's gradient on the device
                if p.grad is not None:
                    g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    g.copy_(torch.where(bad, 0.0, g))
        return self.flag

    def remove(self) -> None:
        for opt in self.fused:
            if getattr(opt, "found_inf", None) is self.flag:
                del opt.found_inf


def _fused_optimizers(optimizer) -> list:
    """The optimizers whose fused kernels honour ``found_inf`` (all of them, or none)."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's local optimizer
    fused_ok = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD))
    if fused_ok and all(g.get("fused") for g in inner.param_groups):
        return [inner]
    return []
