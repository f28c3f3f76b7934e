"""The preallocated on-device stats of the current step, the ring of the last `flush_every`
steps, and the one copy out to (pinned) host memory per flush.

Layout::

    acc_max (n_max,)    probes write running maxima here during a step   (reset to -inf)
    acc_min (n_min,)    probes write running minima here                 (reset to +inf)
    ring    (F, n_max + n_min + n_dev | n_sum)   one row per step; the left block is reduced
            across ranks with MAX (minima are stored negated so MAX serves them too), the right
            block (the loss) with SUM. Both blocks are views of one flat tensor, so a flush is one
            device-to-host copy.

A ring value of -inf in the MAX block means "not recorded this step" (the accumulator was never
touched): a sampled probe that did not run, an attention layer that was not called.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from thermo import _dist

# Stand-ins used only while MAX-reducing across ranks, because a collective's MAX need not
# propagate NaN (NCCL's does not promise to): NaN -> +inf, +inf -> float32 max, and back after.
_F32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class Column:
    layer: str  # "" for step scalars
    stat: str
    negated: bool = False


class StatsBuffer:
    """Device accumulators and ring of per-step rows (see the module docstring).

    Slots are declared first (`max_slot`, `min_slot`, `device_scalar`, `sum_scalar`), then
    `allocate()` creates the tensors once; probes get 0-d or 1-d views with `view`.
    """

    def __init__(self, device: torch.device, flush_every: int):
        self.device = torch.device(device)
        self.flush_every = flush_every
        self._max: list[Column] = []
        self._min: list[Column] = []
        self._dev: list[Column] = []
        self._sum: list[Column] = []
        self.allocated = False

    # -- declaring -------------------------------------------------------------------------

    def max_slot(self, layer: str, stat: str) -> tuple[str, int]:
        self._max.append(Column(layer, stat))
        return ("max", len(self._max) - 1)

    def min_slot(self, layer: str, stat: str) -> tuple[str, int]:
        self._min.append(Column(layer, stat, negated=True))
        return ("min", len(self._min) - 1)

    def device_scalar(self, name: str) -> int:
        """A per-step scalar written by `write_step` and MAX-reduced (grad norm: equal on all
        ranks; non-finite counts: the worst rank)."""
        self._dev.append(Column("", name))
        return len(self._dev) - 1

    def sum_scalar(self, name: str) -> int:
        """A per-step scalar averaged over ranks (the loss)."""
        self._sum.append(Column("", name))
        return len(self._sum) - 1

    # -- allocating ------------------------------------------------------------------------

    def allocate(self) -> None:
        F = self.flush_every
        self.n_max, self.n_min, self.n_dev, self.n_sum = (
            len(self._max), len(self._min), len(self._dev), len(self._sum))
        self.n_left = self.n_max + self.n_min + self.n_dev
        dev = self.device
        self.acc_max = torch.full((self.n_max,), float("-inf"), device=dev)
        self.acc_min = torch.full((self.n_min,), float("inf"), device=dev)
        self.flat = torch.full((F * (self.n_left + self.n_sum),), float("-inf"), device=dev)
        self.ring_max = self.flat[: F * self.n_left].view(F, self.n_left)
        self.ring_sum = self.flat[F * self.n_left :].view(F, self.n_sum)
        pin = dev.type == "cuda"
        self.host = torch.empty(self.flat.shape, dtype=torch.float32, pin_memory=pin)
        self.columns = self._max + self._min + self._dev
        self.allocated = True

    def view(self, slot: tuple[str, int], length: int = 0) -> torch.Tensor:
        """A 0-d view of one slot, or a 1-d view of `length` consecutive slots."""
        kind, i = slot
        acc = self.acc_max if kind == "max" else self.acc_min
        return acc[i] if length == 0 else acc[i : i + length]

    # -- per step --------------------------------------------------------------------------

    def write_step(
        self,
        row: int,
        dev_scalars: dict[int, torch.Tensor],
        sum_scalars: dict[int, torch.Tensor | float],
    ) -> None:
        """Move the accumulators into ring row `row` and reset them. Device ops only."""
        r = self.ring_max[row]
        r[: self.n_max].copy_(self.acc_max)
        torch.neg(self.acc_min, out=r[self.n_max : self.n_max + self.n_min])
        base = self.n_max + self.n_min
        for i, v in dev_scalars.items():
            r[base + i].copy_(v)
        for i, v in sum_scalars.items():
            if isinstance(v, torch.Tensor):
                self.ring_sum[row, i].copy_(v.detach().reshape(()))
            else:
                self.ring_sum[row, i].fill_(float(v))
        self.acc_max.fill_(float("-inf"))
        self.acc_min.fill_(float("inf"))

    # -- flushing --------------------------------------------------------------------------

    def reduce(self, rows: int) -> None:
        """Reduce the first `rows` rows across ranks: one MAX all-reduce for every extreme (and
        the negated minima), one SUM all-reduce for the averaged scalars."""
        world = _dist.world_size()
        if world == 1:
            return
        left = self.ring_max[:rows]
        enc = torch.where(torch.isnan(left), float("inf"),
                          torch.where(left == float("inf"), _F32_MAX, left))
        _dist.max_(enc)
        dec = torch.where(enc == float("inf"), float("nan"),
                          torch.where(enc == _F32_MAX, float("inf"), enc))
        left.copy_(dec)
        if self.n_sum:
            right = self.ring_sum[:rows].contiguous()
            _dist.sum_(right)
            self.ring_sum[:rows].copy_(right / world)

    def copy_out(self) -> torch.cuda.Event | None:
        """Start the one device-to-host copy of the ring; returns an event to wait on (CUDA)."""
        if self.device.type == "cuda":
            self.host.copy_(self.flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return event
        self.host.copy_(self.flat)  # CPU or other devices: a plain (blocking) copy
        return None

    def host_rows(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decode the first `rows` rows of the host copy; call only once the copy is complete.

        Returns (values, recorded, sums): the MAX block (rows, n_left) with minima un-negated,
        a bool mask of the slots that were written that step, and the SUM block (rows, n_sum).
        """
        F = self.flush_every
        h = self.host.numpy()
        raw = h[: F * self.n_left].reshape(F, self.n_left)[:rows]
        sums = h[F * self.n_left :].reshape(F, self.n_sum)[:rows].copy()
        recorded = raw != -np.inf
        values = raw.copy()
        values[:, self.n_max : self.n_max + self.n_min] *= -1
        return values, recorded, sums
