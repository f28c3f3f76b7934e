"""What the checkpoint checksums cost: a save of a small GPT with AdamW state (DCP, one process),
and the part of it spent hashing the folder's files (sha256, the manifest's ``files``).

    python benchmarks/checksums.py

Restore verifies the same bytes once per process, at the same rate.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

import thermo.checkpoints.checkpoints as cc
from thermo.checkpoints import Checkpoints
from thermo.checkpoints import manifest as mf
from thermo.gpt import GPT, GPTConfig


def main() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=6, n_embd=256, n_head=8, block_size=128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 128))
    model(x, x)[1].backward()
    opt.step()
    ckpts = Checkpoints(Path(tempfile.mkdtemp()), keep_last=2, good_after=0)
    real, hashing = mf._checksum, [0.0]

    def timed(path, rel):
        t = time.perf_counter()
        out = real(path, rel)
        hashing[0] += time.perf_counter() - t
        return out

    cc._checksum = timed
    saves, sums = [], []
    for step in range(1, 8):
        mf._verified.clear()
        hashing[0] = 0.0
        t = time.perf_counter()
        entry = ckpts.save(step, model, opt)
        saves.append(time.perf_counter() - t)
        sums.append(hashing[0])
    size = sum(v[0] for v in entry.files.values())
    n = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{n:.1f}M params, checkpoint {size / 1e6:.0f} MB in {len(entry.files)} files, 7 saves")
    print(f"save (with checksums) median {statistics.median(saves) * 1e3:.0f} ms; hashing median "
          f"{statistics.median(sums) * 1e3:.0f} ms = {statistics.median([h / s for h, s in zip(sums, saves)]):.0%} "
          f"of the save ({size / statistics.median(sums) / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
