"""Faults on two simulated nodes, timed: the multi-node rows of the README's fault table.

Runs the three jobs of ``tests/test_multinode.py`` once each (two torchrun agents on localhost,
c10d rendezvous, gloo, FSDP2, one worker each, every agent under its own `thermo supervise`; the
reference loop at tiny settings, checkpoints every 10 steps) and prints one row per fault:

  detected    fault -> the decision: the leader's ``restart`` event (after every node stopped and
              the run directory was repaired), for torchrun's own restart the workers' resume,
              for a lost leader its successor's start
  recovered   fault -> the first step trained again (its record)
  redone      the step in progress at the fault - the checkpoint resumed from

    python benchmarks/faults_multinode.py      # ~3-4 minutes on 2 CPU cores
    python benchmarks/faults_multinode.py --only elastic

Timings are mostly process start-up (imports, rendezvous) at this size and move with the
machine's load, printed in the header.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import thermo  # noqa: E402
from thermo.store import Store  # noqa: E402
from tests.test_multinode import Job  # noqa: E402


def _events(run: Path, kind: str) -> list[tuple[float, float, dict]]:
    ev = thermo.load(run).events
    ev = ev[ev["kind"] == kind]
    return list(zip(ev["time"], ev["step"], ev["data"]))


def _first_record_after(run: Path, t: float) -> float | None:
    with Store(run, readonly=True) as s:
        df = s.scalars(effective=False)
    later = df[df["wall_time"] > t]["wall_time"]
    return float(later.min()) if len(later) else None


def _row(name, planted, outcome, fault, decided, recovered, redone, wall) -> dict:
    f = (lambda t: "-" if t is None else f"{t - fault:.1f}s")
    return dict(name=name, planted=planted, outcome=outcome, detected=f(decided), recovered=f(recovered),
                redone=redone, wall=wall)


def crash_and_divergence(root: Path) -> list[dict]:
    t0 = time.time()
    with Job(root, "--steps", "45", "--poison-steps", "30-32", "--guard-blind", max_restarts=1,
             env={"THERMO_TEST_CRASH": "15:1"}) as job:
        codes = job.wait()
    wall = time.time() - t0
    run, starts = job.run, job.starts()
    out = f"exit {codes['a']}/{codes['b']}; starts resumed from {[s[0]['resumed_from'] for s in starts]}"
    crashed = os.stat(str(job.log) + ".crashed").st_mtime
    resumed = [(t, d) for t, _, d in _events(run, "restart") if d["reason"] == "resume"]
    torchrun = next(t for t, d in resumed if t > crashed)
    rows = [_row("2 nodes: rank crash", "rank 1 exits hard at step 15; torchrun --max-restarts=1",
                 f"torchrun restarted both nodes; {out}", crashed, torchrun, _first_record_after(run, crashed),
                 15 - 10, wall)]
    t, step, d = next(e for e in _events(run, "restart") if e[2]["reason"] == "divergence")
    n = len(next(iter(_events(run, "blacklist")))[2]["added"])
    rows.append(_row("2 nodes: divergence, guard blind", "poisoned steps 30-32; only the supervisors' detector "
                     "sees them", f"leader rolled back to {d['checkpoint']}, {n} samples blacklisted",
                     d["fault_time"], t, _first_record_after(run, t), int(step) - d["checkpoint"], wall))
    return rows


def hang_and_dead_agent(root: Path) -> list[dict]:
    t0 = time.time()
    with Job(root, "--steps", "30", "--hang-at", "12", "--hang-rank", "1", "--fault-once", hang_timeout=6.0) as job:
        job.wait_for(lambda: len(job.starts()) >= 2 and job.step() >= 22)
        killed_at, killed_step = time.time(), job.step()
        job.kill("b", supervisor=False)
        codes = job.wait()
    wall = time.time() - t0
    run = job.run
    sup = [e for e in _events(run, "restart") if e[2]["reason"] in ("hang", "crash")]
    (th, sh, dh), (tc, _, dc) = sup[-2], sup[-1]
    out = f"exit {codes['a']}/{codes['b']}"
    return [
        _row("2 nodes: hung rank", "rank 1 (node b) sleeps at step 12; --hang-timeout 6",
             f"leader stopped both nodes; {out}", dh["fault_time"], th, _first_record_after(run, th),
             int(sh) - dh["checkpoint"], wall),
        _row("2 nodes: an agent dies", "node b's torchrun agent and its worker SIGKILLed at step "
             f"{killed_step}", f"both restarted from {dc['checkpoint']}; {out}", killed_at, tc,
             _first_record_after(run, tc), killed_step - dc["checkpoint"], wall),
    ]


def lost_leader_elastic(root: Path) -> list[dict]:
    t0 = time.time()
    with Job(root, "--steps", "30", nnodes="1:2", max_restarts=1,
             rdzv_conf="last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3") as job:
        job.wait_for(lambda: any(len(s) == 2 for s in job.starts()) and job.step() >= 12)
        killed_at, killed_step = time.time(), job.step()
        job.kill("a")
        job.procs["a"].wait()
        codes = job.wait()
    wall = time.time() - t0
    run, last = job.run, job.starts()[-1]
    took_over = [t for t, _, d in _events(run, "supervise") if "nodes" in d][-1]
    return [_row("2 nodes, --nnodes=1:2: the leader's node lost", "node a, the leader's (supervisor, agent, "
                 f"worker), SIGKILLed at step {killed_step}", f"node b took over and went on alone "
                 f"(world {last[0]['world']}); exit {codes['b']}", killed_at, took_over,
                 _first_record_after(run, killed_at), killed_step - last[0]["resumed_from"], wall)]


JOBS = {"crash": crash_and_divergence, "hang": hang_and_dead_agent, "elastic": lost_leader_elastic}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(JOBS), help=f"comma-separated jobs of {list(JOBS)}")
    names = ap.parse_args().only.split(",")
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}, load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            root = Path(tmp) / name
            root.mkdir()
            rows += JOBS[name](root)
    print("| scenario | planted | outcome | detected | recovered | steps redone | wall (whole job) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['planted']} | {r['outcome']} | {r['detected']} | {r['recovered']} | "
              f"{r['redone']} | {r['wall']:.0f}s |")


if __name__ == "__main__":
    main()
