"""`thermo supervise` against planted faults, timed: the README's fault table.

Runs each scenario of ``tests/test_supervisor.py`` once, the reference loop at tiny settings
(2 layers, d=32, seq 32, batch 8, checkpoints every 20 steps) under a `Supervisor` in a fresh run
directory, and prints one row per scenario:

  outcome     how the supervised run ended, and what the supervisor did
  detected    fault -> the faulty command stopped and the decision taken: for a crash the next
              poll; for a hang the hang timeout; for a divergence (from its detection step's
              record) the flush that reveals it plus the grace a Guard gets to act itself
  recovered   fault -> the relaunched command trains again (its first step)
  redone      steps trained again: the step in progress at the fault - the checkpoint resumed from

    python benchmarks/faults.py            # ~2 minutes on 2 CPU cores
    python benchmarks/faults.py --only "hung,crash loop"

Timings include process start-up (imports, rendezvous), which dominates at this size; on a
shared machine they move with its load, printed in the header.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import thermo
from thermo._io import RunDirError
from thermo.rundir import RunDir
from thermo.store import Store, StoreError
from thermo.supervisor import Supervisor, SupervisorError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
# The tests' settings, so that the table times exactly what tests/test_supervisor.py asserts.
from tests.test_supervisor import ENV, FAST, TRAIN, LateSupervisor, hang_command  # noqa: E402

# name -> (what is planted, command args or a full command, config overrides)
SCENARIOS = {
    "divergence: guard blind": ("poisoned steps 50-52; only the supervisor's detector sees them",
                                ["--poison-steps", "50-52", "--guard-blind", "--steps", "90"], {}),
    "divergence: seen after the end": ("the same, but the supervisor looks only once the command has ended "
                                       "(a fast run)", ["--poison-steps", "50-52", "--guard-blind", "--steps", "70"],
                                       {}),
    "divergence: guard gives up": ("poisoned steps 50-52, --max-rollbacks 0 (exit 86)",
                                   ["--poison-steps", "50-52", "--max-rollbacks", "0", "--steps", "80"], {}),
    "divergence: guard rolls back": ("poisoned steps 50-52; the Guard repairs it in process",
                                     ["--poison-steps", "50-52", "--steps", "80"], {}),
    "SIGKILL mid-checkpoint": ("SIGKILL half-way through writing checkpoint 40",
                               ["--kill-during-checkpoint", "40", "--fault-once", "--steps", "50"], {}),
    "crash at the same batch": ("hard exit whenever the batch of step 45 is read",
                                ["--crash-on-batch", "45", "--steps", "50"], {}),
    "hung rank (2 ranks)": ("torchrun, FSDP2: rank 1 sleeps at step 12", "hang", {"hang_timeout": 6.0}),
    "crash loop": ("exits with an error at start, every launch", ["--crash-on-start", "--steps", "50"],
                   {"max_restarts": 2}),
    "readers during restarts": ("dashboard + load/detect_run + thermo inspect readers; crash at 35",
                                ["--crash-at", "35", "--fault-once", "--steps", "50"], {}),
    "bad input": ("malformed blacklist.json", "bad", {}),
}


class Readers:
    """A dashboard reader, a load + detect_run loop and `thermo inspect` processes, counting
    reads and errors ("database is locked" would be one)."""

    def __init__(self, run: Path):
        self.run, self.reads, self.errors = run, 0, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._dash, self._load, self._inspect)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def _loop(self, read, every):
        while not self.stop.is_set():
            try:
                if RunDir(self.run).db.exists():
                    read()
                    self.reads += 1
            except StoreError as e:
                if "being created" not in str(e):
                    self.errors.append(str(e))
            except Exception as e:  # noqa: BLE001 - counted, not raised
                self.errors.append(f"{type(e).__name__}: {e}")
            self.stop.wait(every)

    def _dash(self):
        from thermo.dashboard import RunReader

        reader = RunReader(self.run)

        def read():
            reader.poll()
            reader.run()

        self._loop(read, 0.1)

    def _load(self):
        self._loop(lambda: (thermo.load(self.run, effective=False), thermo.detect_run(self.run)), 0.2)

    def _inspect(self):
        def read():
            r = subprocess.run([sys.executable, "-m", "thermo.cli", "inspect", str(self.run)],
                               capture_output=True, text=True, env={**os.environ, **ENV})
            if r.returncode:
                self.errors.append(r.stderr.strip().splitlines()[-1])

        self._loop(read, 1.0)


def run_scenario(name: str, root: Path) -> dict:
    what, args, overrides = SCENARIOS[name]
    run = root / re.sub(r"\W+", "_", name)
    config = dataclasses.replace(FAST, **overrides)
    if args == "bad":
        run.mkdir()
        RunDir(run).blacklist.write_text("{ not json")
        t0 = time.time()
        try:
            Supervisor(run, TRAIN, config, env=ENV).run()
            outcome = "started anyway (wrong)"
        except (SupervisorError, RunDirError) as e:
            outcome = f"{type(e).__name__} in {1e3 * (time.time() - t0):.0f} ms (CLI: exit 2), nothing written"
        return dict(name=name, what=what, outcome=outcome, detected="-", recovered="-", redone="-", wall=0.0)
    cmd = hang_command(run) if args == "hang" else [*TRAIN, *args]
    readers = Readers(run) if name.startswith("readers") else None
    kind = LateSupervisor if "after the end" in name else Supervisor
    t0 = time.time()
    if readers:
        with readers:
            out = kind(run, cmd, config, env=ENV).run()
    else:
        out = kind(run, cmd, config, env=ENV).run()
    wall = time.time() - t0
    return summarize(name, what, run, out, wall, readers)


def summarize(name, what, run, out, wall, readers) -> dict:
    ev = thermo.load(run).events
    sup = ev[ev["data"].map(lambda d: d.get("reason") in ("divergence", "crash", "hang"))]
    endings = " → ".join(la.ending for la in out.launches)
    outcome = f"{out.status} ({endings})"
    if out.blacklisted:
        outcome += f"; {len(out.blacklisted)} samples blacklisted"
    rollbacks = ev[ev["kind"] == "rollback"]
    if len(rollbacks):
        d = rollbacks.iloc[0]["data"]
        outcome += f"; Guard rolled back {d['from_step']} → {d['to_step']} in process"
    if readers is not None:
        outcome += f"; {readers.reads} reads, {len(readers.errors)} errors"
    if out.status == "gave_up":
        outcome += ": " + out.message.split(": ", 1)[1].split(". Last launch")[0]
    detected, recovered, redone = [], [], []
    for la in out.launches:
        if la.ending == "crash":  # seen at the next poll after the exit
            detected.append(f"≤{FAST.poll:g}s")
        elif la.ending != "finished" and la.fault_time is not None and la.end is not None:
            detected.append(f"{la.end - la.fault_time:.1f}s")
    for la, nxt in zip(out.launches, out.launches[1:]):
        if la.fault_time is not None and nxt.first_sign is not None:
            recovered.append(f"{nxt.first_sign - la.fault_time:.1f}s")
    for step, d in zip(sup["step"], sup["data"]):  # step: the one in progress when the fault hit
        if d.get("checkpoint") is not None and not math.isnan(step):
            redone.append(str(int(step) - d["checkpoint"]))
    if len(rollbacks):  # the Guard's own: time from the detection record to the rollback event
        d, t = rollbacks.iloc[0]["data"], rollbacks.iloc[0]["time"]
        with Store(run, readonly=True) as s:
            rec = next((r for r in s.records(effective=False, after_step=d["detection_step"] - 1)
                        if r.step == d["detection_step"]), None)
        if rec is not None and "wall_time" in rec.scalars:
            recovered.append(f"{t - rec.scalars['wall_time']:.1f}s (in process)")
        redone.append(str(d["from_step"] - d["to_step"]))
    return dict(name=name, what=what, outcome=outcome, detected=", ".join(detected) or "-",
                recovered=", ".join(recovered) or "-", redone=", ".join(redone) or "-", wall=wall)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated scenario names (prefixes)")
    args = ap.parse_args()
    names = [n for n in SCENARIOS if not args.only or any(n.startswith(p.strip()) for p in args.only.split(","))]
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"running: {name} ...", file=sys.stderr, flush=True)
            rows.append(run_scenario(name, Path(tmp)))
    load1 = os.getloadavg()[0]
    print(f"\nthermo supervise fault table — {datetime.date.today()} — {platform.node()} "
          f"({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"Python {platform.python_version()}; load average {load0:.1f} → {load1:.1f}")
    print("reference loop, tiny GPT (2 layers, d=32), CPU, OMP_NUM_THREADS=1; poll 0.2 s, verdict grace 1 s, "
          "hang timeout 6 s\n")
    print("| scenario | planted | outcome | detected | recovered | steps redone | wall |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['what']} | {r['outcome']} | {r['detected']} | {r['recovered']} | "
              f"{r['redone']} | {r['wall']:.0f}s |")


if __name__ == "__main__":
    main()
