"""Real text with no download: the Python standard library's own source files, byte-level.

Used by the demo, the reference loop, the tests and the benchmarks. Sample *i* is the fixed,
non-overlapping window ``data[i*T : i*T + T + 1]``, so a sample id names the same tokens whatever
the batch size, the number of ranks or the order they are read in.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch


def stdlib_bytes(max_bytes: int = 4_000_000) -> np.ndarray:
    """Concatenated bytes of the standard library's ``.py`` files, in sorted path order (so the
    same Python version always gives the same corpus), up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(
            f"the Python standard library sources are not at {root}; pass your own text "
            "(a uint8 array) to TokenDataset instead"
        )
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            b = path.read_bytes()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
    if len(data) < 1024:
        raise ValueError(f"only {len(data)} bytes of standard-library source found under {root}")
    return data


class TokenDataset(torch.utils.data.Dataset):
    """Byte tokens cut into fixed windows: item i is (x, y), each of `block_size` tokens.

    Args:
        data: uint8 tokens (e.g. `stdlib_bytes()`).
        block_size: sequence length.
    """

    def __init__(self, data: np.ndarray, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.data = torch.from_numpy(np.asarray(data, dtype=np.uint8).copy())
        self.block_size = block_size
        self.n = (len(self.data) - 1) // block_size
        if self.n < 1:
            raise ValueError(f"{len(self.data)} tokens hold no window of {block_size + 1}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} out of range [0, {self.n})")
        w = self.data[i * self.block_size : (i + 1) * self.block_size + 1].long()
        return w[:-1], w[1:]

    def batch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack the samples `ids` into (x, y) of shape (len(ids), block_size)."""
        xs, ys = zip(*(self[int(i)] for i in ids))
        return torch.stack(xs), torch.stack(ys)
