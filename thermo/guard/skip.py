"""Rung 1: skip a bad step on the device, without a host sync, so that the skipped step changes
nothing: parameters and optimizer state stay bit-identical.

How a step is masked (``GuardConfig.skip_mode``):

==============  ===========================================================================
``fused``       torch's fused Adam/AdamW/SGD read ``found_inf`` (the way GradScaler skips):
                exact, no extra memory. Needs ``fused=True`` in every param group.
``snapshot``    before ``optimizer.step()`` copy the parameters and every optimizer state
                tensor (exp_avg, exp_avg_sq, step, momentum_buffer...); after it, write
                ``torch.where(flag, old, new)`` back. Exact for any optimizer that keeps its
                state as tensors in ``optimizer.state`` (for-loop and foreach Adam/AdamW/SGD
                included). Costs one more copy of the parameters and of the optimizer state
                (Adam: 3x the parameter bytes; SGD with momentum: 2x) and two copies per step.
``zero_grad``   zero the step's gradients: no extra memory, but not exact: Adam's moments,
                step count and weight decay, and SGD's momentum and weight decay, still move
                the weights.
``auto``        ``fused`` where every param group is fused, else ``snapshot`` (and a one-time
                warning with its memory cost, and the hint to pass ``fused=True`` where torch
                has a fused kernel for the optimizer and device).
==============  ===========================================================================

``auto`` never switches the user's optimizer to its fused kernel itself: the fused kernel rounds
differently from foreach/for-loop (every step, not only skipped ones), keeps ``step`` on another
device, and a checkpoint would carry the switched flag into runs without thermo.

Two edges of ``snapshot``, both stated when the Guard is built:

* a state tensor created by the skipped step itself (the optimizer's first step: state is lazy)
  is reset to zeros. For Adam/AdamW that *is* torch's initial state; an SGD momentum buffer of
  zeros acts as "no buffer yet" when ``dampening=0`` (torch's default).
* torch keeps Adam's ``step`` on the host unless ``capturable=True`` or ``fused=True``. With
  parameters on an accelerator, restoring a host tensor from a device flag would be a host sync,
  so that one counter is left to advance (bias correction one step further); moments and
  parameters are still restored.

The decision is the same on every rank: the flag is MAX-all-reduced on the device (a collective
enqueued like any other, no host sync), so ranks whose local loss looked healthy skip too.
ZeroRedundancyOptimizer (masked through its local ``.optim``; every rank restores every parameter,
as each receives the broadcast update) and FSDP2 (DTensor parameters and state, restored through
their local shards) work alike.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from thermo import _dist
from thermo.guard.config import GuardConfig

SKIP_MODES = ("auto", "fused", "snapshot", "zero_grad")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a DTensor holds on this rank (the same storage: in-place writes reach it)."""
    return t._local_tensor if isinstance(t, DTensor) else t


class _DeviceSkip:
    """Rung 1: decide on the device whether this step's update is applied, and mask it.

    Call it after the backward (and any clipping), before ``optimizer.step()``. `restore` runs
    by itself right after ``optimizer.step()`` (a step post-hook on the optimizer), once per
    decision; calling it again (the Guard does, in ``after_step``) is a no-op. Nothing here
    reads a value on the host.

    Attributes:
        mode: the resolved mask: ``"fused"``, ``"snapshot"`` or ``"zero_grad"``.
        flag: 0-d float device tensor, 1.0 when this step is skipped (same on every rank).
    """

    def __init__(self, cfg: GuardConfig, optimizer, params: list[nn.Parameter], device):
        self.cfg = cfg
        self.params = params
        self.inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's local optimizer
        # (loss, grad norm) of recent healthy steps; NaN = empty slot
        self.window = torch.full((2, cfg.skip_window), float("nan"), device=device)
        self.filled = 0  # host-side count of window writes: which slot is next, no sync
        self.flag = torch.zeros((), device=device)
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        self._snap: dict[tuple, torch.Tensor] = {}  # (param index, state key | None) -> copy
        self._taken: set[tuple] = set()  # the keys copied at this decision
        self.mode = _resolve_mode(getattr(cfg, "skip_mode", "auto"), self.inner, params, device)
        self.fused = [self.inner] if self.mode == "fused" else []
        self._opt_params = [p for g in self.inner.param_groups for p in g["params"]]
        self._fresh: list = []  # fused mode: params whose state this step creates (see restore)
        self._warned_scaler = False
        self._restored = True  # host-side: the last decision's restore is done (or not needed)
        # On the optimizer the loop steps (ZeroRedundancyOptimizer: after its broadcast). One
        # that is no torch Optimizer has no hooks: the Guard's after_step restores then.
        register = getattr(optimizer, "register_step_post_hook", None)
        self._hook = register(lambda *_: self.restore()) if register is not None else None
        for opt in self.fused:
            opt.found_inf = self.flag  # read by the fused kernels at optimizer.step()

    def _limit(self) -> torch.Tensor | None:
        """(loss, grad norm) above which a step is a spike: mean + skip_z·σ of the window, on
        the device; None while the rule is off or the window is not full enough."""
        cfg = self.cfg
        if cfg.skip_z is None or self.filled < cfg.skip_min_window:
            return None
        mean = self.window.nanmean(dim=1)
        std = (self.window - mean[:, None]).square().nanmean(dim=1).sqrt()
        return mean + cfg.skip_z * std

    def limits(self) -> dict[str, float]:
        """The spike limits rung 1 applies now, on the host (the replay's share test)."""
        limit = self._limit()
        if limit is None:
            return {}
        loss, gnorm = limit.tolist()  # note: a host sync; off the hot path (the replay calls it)
        return {"loss": loss, "grad_norm": gnorm}

    def state_dict(self) -> dict:
        """The rolling window (what a replay must leave as it found it)."""
        return {"window": self.window.clone(), "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.window.copy_(state["window"])
        self.filled = state["filled"]

    def __call__(self, loss: torch.Tensor, gnorm: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = torch.stack([loss.detach().float().reshape(()), gnorm.detach().float().reshape(())])
        bad = ~torch.isfinite(x).all() if cfg.skip_nonfinite else torch.zeros((), dtype=torch.bool, device=x.device)
        limit = self._limit()
        if limit is not None:
            bad = bad | (x > limit).any()
        self.flag.copy_(bad)
        if _dist.world_size() > 1:
            # One decision for all ranks: a rank whose own loss spiked makes every rank skip.
            # Enqueued on the device like any collective: no host sync.
            _dist.max_(self.flag)
        torch.gt(self.flag, 0, out=self._bad)
        bad = self._bad
        # Only healthy steps enter the window (a skipped slot keeps its old value).
        slot = self.window[:, self.filled % cfg.skip_window]
        slot.copy_(torch.where(bad, slot, torch.nan_to_num(x)))
        self.filled += 1
        self._restored = False
        if self.mode == "snapshot":
            self._take_snapshot()
        elif self.mode == "fused":
            # Set every step: torch's GradScaler.step() replaces found_inf and then deletes it.
            self.inner.found_inf = self.flag
            # Params without state yet (the first step, or after a rollback to step 0 emptied
            # it): host-side dict lookups, and only while some state is missing.
            if len(self.inner.state) < len(self._opt_params):
                self._fresh = [p for p in self._opt_params if not self.inner.state.get(p)]
        elif self.mode == "zero_grad":
            for p in self.params:  # drop this step's gradient on the device (not exact: see above)
                if p.grad is not None:
                    g = _local(p.grad)
                    g.copy_(torch.where(bad, 0.0, g))
        return self.flag

    # -- snapshot mode -------------------------------------------------------------------------

    def _live(self) -> list[tuple[tuple, torch.Tensor]]:
        """Every tensor a step may change, keyed by (param index, state key or None)."""
        out = [((i, None), _local(p)) for i, p in enumerate(self.params)]
        for i, p in enumerate(self.params):
            for key, value in self.inner.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    t = _local(value)
                    if t.device == self.flag.device:  # host-side `step` of a non-capturable Adam: see above
                        out.append(((i, key), t))
        return out

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        live = self._live()
        for key, t in live:
            old = self._snap.get(key)
            if old is None or old.shape != t.shape or old.dtype != t.dtype:
                self._snap[key] = torch.empty_like(t)  # the first step with this state: allocate once
        torch._foreach_copy_([self._snap[k] for k, _ in live], [t for _, t in live])
        self._taken = {k for k, _ in live}  # copies of state emptied since (a rollback) are stale

    @torch.no_grad()
    def restore(self) -> None:
        """After ``optimizer.step()``: undo the step on the device where the flag says skip.

        ``snapshot``: every parameter and state tensor back to its copy. ``fused``: the kernels
        skipped the update, but torch's fused SGD creates its momentum buffers with
        ``empty_like`` on the first step and leaves them unwritten when ``found_inf`` is set,
        so the next step would read garbage (torch 2.13); state created by a skipped first step
        is set to zeros here (Adam's initial state; "no buffer yet" for SGD with dampening=0).
        """
        if self._restored:
            return
        self._restored = True
        bad = self._bad
        if self.mode == "fused" and not self._warned_scaler and getattr(self.inner, "found_inf", None) is not self.flag:
            self._warned_scaler = True  # host-side attribute check, no sync
            warnings.warn(
                "thermo's fused skip lost its found_inf flag during optimizer.step(): a "
                "torch.amp.GradScaler sets (and deletes) its own, so that step's skip was the "
                "scaler's decision, not thermo's. With a GradScaler use GuardConfig(skip_mode='snapshot').",
                stacklevel=3,
            )
        if self.mode == "fused" and self._fresh:
            for p in self._fresh:
                for value in self.inner.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and _local(value).device == bad.device:
                        t = _local(value)
                        t.copy_(torch.where(bad, torch.zeros((), dtype=t.dtype, device=t.device), t))
            self._fresh = []
        if self.mode != "snapshot":
            return
        for key, t in self._live():
            old = self._snap.get(key) if key in self._taken else None
            if old is not None and old.shape == t.shape and old.dtype == t.dtype:
                t.copy_(torch.where(bad, old, t))
            else:  # created by this very step (lazy state): back to the zeros it starts from
                t.copy_(torch.where(bad, torch.zeros((), dtype=t.dtype, device=t.device), t))

    @property
    def extra_bytes(self) -> int:
        """Device memory held by the snapshot (0 for the other modes)."""
        return sum(t.numel() * t.element_size() for t in self._snap.values())

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        for opt in self.fused:
            if getattr(opt, "found_inf", None) is self.flag:
                del opt.found_inf
        self._snap.clear()


def _is_fused(inner) -> bool:
    """Whether every param group runs torch's fused Adam/AdamW/SGD kernel, which honours
    ``found_inf`` (all of them, or none: the attribute is per optimizer)."""
    kind = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD))
    return kind and all(g.get("fused") for g in inner.param_groups)


def _fused_available(inner, device) -> bool:
    """Whether torch has a fused kernel for this optimizer on this device (the hint we give)."""
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        return False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return torch.device(device).type in _get_fused_kernels_supported_devices()
    except ImportError:  # moved in a later torch: no hint rather than a wrong one
        return False


def _snapshot_bytes(inner, params) -> tuple[int, str]:
    """Bytes the snapshot will hold, and how they were counted (params + expected state)."""
    nbytes = sum(_local(p).numel() * _local(p).element_size() for p in params)
    if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        copies = 3 if any(g.get("amsgrad") for g in inner.param_groups) else 2
        return nbytes * (1 + copies), f"parameters + {copies} Adam moments"
    if isinstance(inner, torch.optim.SGD):
        mom = any(g.get("momentum", 0) for g in inner.param_groups)
        return nbytes * (2 if mom else 1), "parameters + momentum buffer" if mom else "parameters"
    return nbytes, "parameters, plus a copy of whatever state the optimizer keeps"


def _resolve_mode(mode: str, inner, params, device) -> str:
    """The mask for `mode` on this optimizer; warns (rank 0, once, at construction) when the
    skip costs memory or is not exact."""
    name = type(inner).__name__
    fused = _is_fused(inner)
    if mode == "fused" and not fused:
        raise ValueError(
            f"GuardConfig.skip_mode='fused' needs torch's fused Adam/AdamW/SGD, got {name} "
            f"without fused=True in every param group; construct it with fused=True, or use "
            "skip_mode='auto' or 'snapshot'"
        )
    if mode == "auto":
        mode = "fused" if fused else "snapshot"
    if mode == "fused" or not _dist.is_rank0():
        return mode
    if mode == "zero_grad":
        warnings.warn(
            f"GuardConfig.skip_mode='zero_grad': a skipped step zeroes the gradients of {name}, "
            "which is not exact (Adam's moments, step count and weight decay, SGD's momentum and "
            "weight decay still move the weights). skip_mode='snapshot' is exact.",
            stacklevel=4,
        )
        return mode
    nbytes, what = _snapshot_bytes(inner, params)
    hint = ""
    if _fused_available(inner, device):
        hint = (f" torch has a fused {name} kernel for {torch.device(device).type}: construct it with "
                "fused=True for an exact skip with no extra memory.")
    host_step = (isinstance(inner, torch.optim.Adam | torch.optim.AdamW)
                 and torch.device(device).type != "cpu"
                 and not all(g.get("capturable") or g.get("fused") for g in inner.param_groups))
    if host_step:
        hint += (f" {name}(capturable=False) keeps its step count on the host: a skipped step "
                 "restores parameters and moments but advances that counter (restoring it would "
                 "be a host sync); capturable=True or fused=True makes it exact.")
    warnings.warn(
        f"thermo skips bad steps of {name} by snapshot and restore (GuardConfig.skip_mode="
        f"'snapshot'): {nbytes / 2**20:.3g} MiB more device memory on this rank ({what}) and "
        f"two extra copies per step.{hint} skip_mode='zero_grad' costs nothing but is not exact.",
        stacklevel=4,
    )
    return mode
