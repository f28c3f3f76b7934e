"""`BatchLedger`: step -> the global batch's sample ids, for the recent steps."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class BatchLedger:
    """Which sample ids each step trained on (the global batch), for the recent steps.

    The Guard records every step, persists new rows with ``Store.write_ledger`` at each flush
    (`pop_unwritten`), and on a verdict asks for the ids of steps [onset - a, detection]
    (`ids_for`; the batches after the detection come from `ResumableSampler.peek`).

    Args:
        max_steps: steps kept in memory (oldest dropped first; rows not yet popped by
            `pop_unwritten` are kept until they are).

    Example:
        >>> ledger.record(step, ids)
        >>> store.write_ledger(attempt, ledger.pop_unwritten())    # at flush
        >>> bad = ledger.ids_for(onset - 20, detection)
        >>> ledger.rewind(checkpoint_step)                          # after a rollback
    """

    def __init__(self, max_steps: int = 10_000):
        if max_steps < 1:
            raise ValueError(f"BatchLedger.max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        # step -> ids; int64 arrays: a Python list of ints costs ~4x the memory
        self._rows: dict[int, np.ndarray] = {}
        self._unwritten: dict[int, np.ndarray] = {}

    def record(self, step: int, ids: Iterable[int]) -> None:
        """Record the global batch of `step` (a step recorded again, after a rewind, is replaced)."""
        arr = np.fromiter((int(i) for i in ids), dtype=np.int64)
        self._rows.pop(step, None)  # re-insert at the end: dicts keep insertion order
        self._rows[step] = arr
        self._unwritten[step] = arr
        while len(self._rows) > self.max_steps:
            del self._rows[next(iter(self._rows))]

    def __contains__(self, step: object) -> bool:
        return step in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def batches(self, first_step: int, last_step: int) -> dict[int, list[int]]:
        """step -> ids for the recorded steps in [first_step, last_step], in step order."""
        return {s: self._rows[s].tolist() for s in sorted(self._rows) if first_step <= s <= last_step}

    def ids_for(self, first_step: int, last_step: int) -> list[int]:
        """The distinct sample ids of the recorded steps in [first_step, last_step], sorted.

        Steps never recorded (before the run, or dropped past `max_steps`) contribute nothing;
        check with ``step in ledger`` or fall back to ``Store.ledger``.
        """
        rows = [a for s, a in self._rows.items() if first_step <= s <= last_step]
        return np.unique(np.concatenate(rows)).tolist() if rows else []

    def pop_unwritten(self) -> list[tuple[int, list[int]]]:
        """(step, ids) rows recorded since the last call, in step order, for ``Store.write_ledger``."""
        rows = [(s, self._unwritten[s].tolist()) for s in sorted(self._unwritten)]
        self._unwritten.clear()
        return rows

    def rewind(self, step: int) -> None:
        """Forget the steps after `step` (a rollback to a checkpoint taken at `step`: they are redone)."""
        for d in (self._rows, self._unwritten):
            for s in [s for s in d if s > step]:
                del d[s]
