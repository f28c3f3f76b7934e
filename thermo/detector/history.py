"""The rolling history of one signal, and the robust statistics the rules take from it."""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right

import numpy as np

_MAD_TO_SIGMA = 1.4826  # σ of a normal distribution = 1.4826 × its median absolute deviation


class _History:
    """Finite observations of one signal in step order: step, value (log scale), and whether
    the value may enter a baseline. Compact arrays: a large model has thousands of series."""

    __slots__ = ("steps", "vals", "ok")

    def __init__(self):
        self.steps, self.vals, self.ok = array("q"), array("d"), array("b")

    def add(self, step: int, val: float, ok: bool) -> None:
        self.steps.append(step)
        self.vals.append(val)
        self.ok.append(ok)

    def cut(self, first: int, last: int) -> None:
        """Keep only steps in [first, last]."""
        j = bisect_right(self.steps, last)
        del self.steps[j:], self.vals[j:], self.ok[j:]
        i = bisect_left(self.steps, first)
        if i:
            del self.steps[:i], self.vals[:i], self.ok[:i]

    def window(self, lo: int, hi: int, baseline: bool) -> np.ndarray:
        """Values with lo <= step <= hi; only baseline-eligible ones if `baseline`."""
        i, j = bisect_left(self.steps, lo), bisect_right(self.steps, hi)
        v = np.frombuffer(self.vals[i:j], dtype=np.float64)
        return v[np.frombuffer(self.ok[i:j], dtype=np.int8) != 0] if baseline else v

    def walk_back(self, start: int, stop: int, above: float) -> int | None:
        """Earliest step of the unbroken run of values > `above` ending at the last value at or
        before `start` (values before step `stop` are not looked at); None if that value is
        not above."""
        onset = None
        for k in range(bisect_right(self.steps, start) - 1, -1, -1):
            if self.steps[k] < stop or not self.vals[k] > above:
                break
            onset = self.steps[k]
        return onset

    def to_json(self) -> list:
        return [self.steps.tolist(), self.vals.tolist(), self.ok.tolist()]

    @classmethod
    def from_json(cls, d: list) -> _History:
        h = cls()
        h.steps.extend(int(s) for s in d[0])
        h.vals.extend(float(v) for v in d[1])
        h.ok.extend(1 if o else 0 for o in d[2])
        return h


def _robust(base: np.ndarray, floor: float) -> tuple[float, float]:
    med = float(np.median(base))
    return med, max(_MAD_TO_SIGMA * float(np.median(np.abs(base - med))), floor)


def _quantile(v: np.ndarray, q: float) -> float:
    """np.quantile's default (linear) estimate, without its per-call overhead (~10x)."""
    v = np.sort(v)
    pos = q * (len(v) - 1)
    i = int(pos)
    return float(v[i]) if i + 1 >= len(v) else float(v[i] + (v[i + 1] - v[i]) * (pos - i))
