"""Preemption and a changed world size, timed: the README's fault-table rows for them.

The reference loop at the tests' tiny settings (2 layers, d=32, seq 32, batch 8, flush every 10
steps), CPU, gloo:

  preemption   2 ranks (FSDP2) under torchrun under ``thermo supervise --max-restarts 0``; rank 1
               alone gets SIGUSR1 at step 23. Printed: signal -> both ranks checkpointed and the
               command exited (*detected*), signal -> the relaunched command's first step
               (*recovered*), the checkpoint, steps redone (the last step trained - the checkpoint).
  resize       2 ranks -> 1 -> 2 (torchrun each time, preempted by SIGTERM at steps 13 and 33),
               FSDP2 and ZeRO-1, against one process never stopped: the sample stream (equal or
               not) and the largest relative loss gap, with each launch's wall time.

    python benchmarks/preemption.py        # ~2 minutes on 2 CPU cores

Timings include process start-up (imports, rendezvous), which dominates at this size.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import thermo  # noqa: E402
from thermo.supervisor import Supervisor, SupervisorConfig  # noqa: E402

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--good-after", "20", "--flush-every", "10", "--attn-every", "5",
        "--warmup", "10", "--quiet", "--steps", "60"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            "-m", "thermo.train_gpt", *TINY, *args]


def preemption(root: Path) -> str:
    run = root / "preempt"
    cmd = torchrun(2, "--shard", "fsdp", "--checkpoint-every", "20", "--run-dir", str(run), "--preempt-at", "23",
                   "--preempt-rank", "1", "--preempt-signal", "SIGUSR1", "--fault-once")
    cfg = SupervisorConfig(max_restarts=0, poll=0.2, restart_delay=0.0, grace=20.0, status_every=0.0)
    t0 = time.time()
    out = Supervisor(run, cmd, cfg, env={"OMP_NUM_THREADS": "1"}).run()
    wall = time.time() - t0
    fired = (run / ".fault_fired").stat().st_mtime  # written as the signal is sent
    first, second = out.launches
    ev = thermo.load(run).events
    (pre,) = ev[ev["kind"] == "preempt"]["data"]
    ckpt = pre["checkpoint"]
    return (f"| preemption (2 ranks) | torchrun, FSDP2: SIGUSR1 to rank 1 only at step 23; `thermo supervise "
            f"--max-restarts 0` | {out.status} ({' → '.join(la.ending for la in out.launches)}); both ranks "
            f"checkpointed step {ckpt}, not counted as a crash | {first.end - fired:.1f}s | "
            f"{second.first_sign - fired:.1f}s | 0 | {wall:.0f}s |")


def resize(root: Path, shard: str) -> str:
    run, whole = root / f"resize-{shard}", root / f"whole-{shard}"
    walls = []
    for nproc, extra in ((2, ["--preempt-at", "13"]), (1, ["--preempt-at", "33"]), (2, [])):
        t0 = time.time()
        proc = subprocess.run(torchrun(nproc, "--shard", shard, "--checkpoint-every", "25", "--run-dir", str(run),
                                       *extra), env=ENV, capture_output=True, text=True, start_new_session=True)
        walls.append(time.time() - t0)
        if proc.returncode not in (0, 1):
            raise SystemExit(proc.stderr[-3000:])
    subprocess.run([sys.executable, "-m", "thermo.train_gpt", *TINY, "--checkpoint-every", "25", "--run-dir",
                    str(whole)], env=ENV, check=True, capture_output=True)
    with thermo.Store(run, readonly=True) as a, thermo.Store(whole, readonly=True) as b:
        same = a.ledger() == b.ledger()
    la = thermo.load(run).scalars.set_index("step")["loss"]
    lb = thermo.load(whole).scalars.set_index("step")["loss"]
    gap = float(((la - lb).abs() / lb).max())
    health = {e["step"]: e["health"] for e in json.loads((run / "manifest.json").read_text())["checkpoints"]}
    name = {"fsdp": "FSDP2", "zero1": "ZeRO-1"}[shard]
    return (f"| resize 2 → 1 → 2 ranks ({name}) | preempted at 13 on 2 ranks (checkpoint 20), resumed on 1, "
            f"preempted at 33, resumed on 2 | finished; sample stream {'equal to' if same else 'NOT equal to'} "
            f"one process never stopped, loss within {gap:.1e} of it; checkpoint 33 {health.get(33)}; launches "
            f"{', '.join(f'{w:.0f}s' for w in walls)} | - | - | 0 | {sum(walls):.0f}s |")


def main() -> None:
    load = os.getloadavg()[0]
    print(f"# {datetime.date.today()}, {os.cpu_count()} CPUs, load average {load:.1f}")
    print("| scenario | planted | outcome | detected | recovered | steps redone | wall |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(preemption(root), flush=True)
        for shard in ("fsdp", "zero1"):
            print(resize(root, shard), flush=True)


if __name__ == "__main__":
    main()
