"""Min/max-preserving downsampling: long series cut to a few thousand points, spikes and NaN kept."""

from __future__ import annotations

import math

import numpy as np

# Points per drawn series: enough to see structure, few enough for a browser to stay responsive.
DEFAULT_MAX_POINTS = 4000


def downsample_index(y: np.ndarray, max_points: int = DEFAULT_MAX_POINTS) -> np.ndarray:
    """Indices of the points of `y` to draw: at most `max_points`, min/max-preserving.

    `y` is cut into equal-count bins; each keeps the index of its smallest and largest finite
    value and of its first non-finite one (NaN, ±inf), plus the first and last point overall. So
    every spike and every NaN survives, whatever the length.

    Args:
        y: the values, in x order.
        max_points: upper bound on the number of indices returned (at least 5).

    Returns:
        Sorted unique indices into `y`.

    Example:
        >>> idx = downsample_index(loss, 4000)
        >>> x_small, y_small = steps[idx], loss[idx]
    """
    y = np.asarray(y, dtype="float64")
    n = len(y)
    if n <= max_points:
        return np.arange(n)
    n_bins = max(1, (max(max_points, 5) - 2) // 3)  # 3 kept per bin + the two ends
    size = math.ceil(n / n_bins)
    n_bins = math.ceil(n / size)
    pad = n_bins * size - n
    finite = np.isfinite(y)
    hi = np.where(finite, y, -np.inf)
    lo = np.where(finite, y, np.inf)
    # (n_bins, size): the padding never wins a max, a min or a non-finite test.
    hi = np.concatenate([hi, np.full(pad, -np.inf)]).reshape(n_bins, size)
    lo = np.concatenate([lo, np.full(pad, np.inf)]).reshape(n_bins, size)
    bad = np.concatenate([~finite, np.zeros(pad, bool)]).reshape(n_bins, size)
    base = np.arange(n_bins) * size
    keep = [base + hi.argmax(1), base + lo.argmin(1)]
    has_bad = bad.any(1)
    keep.append((base + bad.argmax(1))[has_bad])
    idx = np.unique(np.concatenate(keep + [np.array([0, n - 1])]))
    return idx[idx < n]


def downsample(x, y, max_points: int = DEFAULT_MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """`x`, `y` cut to at most `max_points` points by `downsample_index` (spikes and NaN kept).

    Example:
        >>> xs, ys = downsample(steps, loss, 4000)
    """
    x, y = np.asarray(x), np.asarray(y, dtype="float64")
    idx = downsample_index(y, max_points)
    return x[idx], y[idx]
