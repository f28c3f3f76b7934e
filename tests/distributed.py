"""Launch a script under `torchrun --nproc_per_node=N --standalone` (gloo, CPU) from a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 240, env=None) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` CPU ranks; raise with the output if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(script), *map(str, args)]  # script may be "-m": then args[0] is the module
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT,
                          start_new_session=True)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {Path(script).name} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
