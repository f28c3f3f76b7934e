"""`thermo supervise` against real faults in real processes: the reference loop (and a
Thermometer-only loop) under the supervisor with planted divergences, crashes, a SIGKILL in the
middle of a checkpoint write, a hung rank, a crash loop, readers hammering the store, and bad
input. Each scenario checks the outcome, the events, and that no row recorded before the fault
was lost."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import thermo
from thermo._io import RunDirError
from thermo.cli import main as cli
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.data import Blacklist, ResumableSampler
from thermo.rundir import RunDir
from thermo.store import Store, StoreError
from thermo.supervisor import Supervisor, SupervisorConfig, SupervisorError, _start_time
from thermo.train_gpt import parse_args, train

FAULTS = Path(__file__).parent / "faults"
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--checkpoint-every", "20", "--good-after", "20", "--flush-every", "10",
        "--attn-every", "5", "--lr", "3e-3", "--warmup", "10", "--quiet"]
TRAIN = [sys.executable, "-m", "thermo.train_gpt", *TINY]
# Quick reactions for tests; generous hang/startup limits, as other work may share the 2 cores.
FAST = SupervisorConfig(poll=0.2, restart_delay=0.0, grace=5.0, hang_timeout=60.0, startup_timeout=120.0,
                        verdict_grace=1.0, status_every=0.0)
ENV = {"OMP_NUM_THREADS": "1"}  # one thread per process: 2 cores, several processes


def supervise(run_dir, *args, steps=60, config=FAST, command=None):
    cmd = command or [*TRAIN, "--steps", str(steps), *args]
    return Supervisor(run_dir, cmd, config, env=ENV).run()


def hang_command(run_dir) -> list[str]:
    """2 ranks under torchrun (FSDP2) where rank 1 sleeps at step 12, once."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            "-m", "thermo.train_gpt", *TINY, "--checkpoint-every", "10", "--good-after", "10",
            "--shard", "fsdp", "--steps", "20", "--hang-at", "12", "--hang-rank", "1", "--fault-once",
            "--run-dir", str(run_dir)]


def events(run_dir, kind=None):
    ev = thermo.load(run_dir).events
    return ev if kind is None else ev[ev["kind"] == kind]


def clean_batch(step: int) -> list[int]:
    """The sample ids a clean run reads at `step` (the sampler is deterministic)."""
    n = len(TokenDataset(stdlib_bytes(300000), 32))
    return ResumableSampler(n, 8).peek(step)[-1]


class RowWatch(threading.Thread):
    """Reads every scalar row while the run goes on (a dashboard-like reader); every row it saw
    must still be in the store at the end, with the same value."""

    def __init__(self, run_dir: Path, every: float = 0.5):
        super().__init__(daemon=True)
        self.run_dir, self.every = run_dir, every
        self.seen: dict[tuple[int, int], float] = {}
        self.errors: list[str] = []
        self.reads = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                with Store(self.run_dir, readonly=True) as s:
                    df = s.scalars(effective=False)
                if "loss" in df:
                    self.seen.update(zip(zip(df["attempt"], df["step"]), df["loss"]))
                self.reads += 1
            except StoreError as e:  # not created yet: fine; anything else is not
                if "no metrics store" not in str(e) and "being created" not in str(e):
                    self.errors.append(str(e))
            except Exception as e:  # noqa: BLE001 - "database is locked" would land here
                self.errors.append(f"{type(e).__name__}: {e}")
            self.done.wait(self.every)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()

    def check(self):
        assert not self.errors, self.errors
        assert self.seen, "the watcher never read a row"
        with Store(self.run_dir, readonly=True) as s:
            df = s.scalars(effective=False)
        final = dict(zip(zip(df["attempt"], df["step"]), df["loss"]))
        lost = [k for k in self.seen if k not in final]
        changed = [k for k, v in self.seen.items() if k in final
                   and not (final[k] == v or (math.isnan(final[k]) and math.isnan(v)))]
        assert not lost and not changed, f"rows lost {lost[:5]}, rows changed {changed[:5]}"


def assert_contiguous(run_dir, last_step):
    """The effective timeline holds every step once, 1..last_step, and the ledger matches it."""
    with Store(run_dir, readonly=True) as s:
        steps = s.scalars()["step"].tolist()
        ledger = s.ledger()
    assert steps == list(range(1, last_step + 1))
    assert sorted(ledger) == list(range(1, last_step + 1))


# -- 1. divergence ---------------------------------------------------------------------------------


class LateSupervisor(Supervisor):
    """Looks at the first launch only once it has ended: the divergence is seen after the end on
    any machine, as a fast (GPU) run makes the real supervisor see it."""

    def _watch(self, launch):
        if launch.number == 1:
            self._proc.wait()
        super()._watch(launch)


def check_supervisor_repair(run: Path, out, steps: int, exit_code: int) -> dict:
    """The supervisor alone saw the poisoned steps 50-52, rolled back before the onset,
    blacklisted them, and the relaunch trained to the end on a contiguous timeline."""
    assert out.status == "finished" and out.exit_code == 0, out.message
    assert [la.ending for la in out.launches] == ["divergence", "finished"]
    assert out.launches[0].exit_code == exit_code
    (verdict,) = events(run, "verdict")["data"]
    assert verdict["source"] == "supervisor" and verdict["onset_step"] <= 52 <= verdict["detection_step"] <= 60
    restart = events(run, "restart")
    sup = restart[restart["data"].map(lambda d: d["reason"] == "divergence")].iloc[0]["data"]
    assert sup["checkpoint"] < verdict["onset_step"] and sup["exit_code"] == exit_code
    resumed = restart[restart["data"].map(lambda d: d["reason"] == "resume")].iloc[0]["data"]
    assert resumed["checkpoint"] == sup["checkpoint"]  # the Guard restarted where told
    poison = set(clean_batch(50) + clean_batch(51) + clean_batch(52))
    (bl,) = events(run, "blacklist")["data"]
    assert poison <= set(bl["added"]) == set(Blacklist.load(run).ids)
    manifest = json.loads((run / "manifest.json").read_text())["checkpoints"]
    assert all(e["health"] != "bad" or e["step"] > sup["checkpoint"] for e in manifest)
    assert set(sup["bad"]) and min(sup["bad"]) > sup["checkpoint"]
    assert_contiguous(run, steps)
    return bl


@pytest.mark.slow
def test_divergence_the_guard_misses_is_rolled_back_and_skipped_by_the_supervisor(tmp_path):
    """The Guard is blind (--guard-blind): only the supervisor's detector, reading the store, can
    see the poisoned steps 50-52. The command is held after step 60 (however fast the machine,
    the supervisor sees the divergence while it runs): it kills, rolls back, blacklists,
    restarts; the run ends where a clean run that never read those batches ends."""
    run = tmp_path / "sup"
    cmd = [sys.executable, str(FAULTS / "hold_until_verdict.py"), "60", "--", *TINY, "--steps", "90",
           "--poison-steps", "50-52", "--guard-blind"]
    with RowWatch(run) as watch:
        out = supervise(run, command=cmd)
    watch.check()
    bl = check_supervisor_repair(run, out, 90, exit_code=-signal.SIGTERM)

    # A clean run that never saw those samples reads the same stream and ends at the same loss.
    clean = tmp_path / "clean"
    clean.mkdir()
    Blacklist(clean).add(bl["added"], reason="what the supervised run skipped")
    train_clean(clean, 90)
    with Store(run, readonly=True) as a, Store(clean, readonly=True) as b:
        assert a.ledger() == b.ledger()
        la, lb = a.scalars()["loss"].tail(10).mean(), b.scalars()["loss"].tail(10).mean()
    assert abs(la - lb) <= 0.02 * lb


def test_a_divergence_seen_only_after_the_command_ended_is_still_repaired(tmp_path):
    """The same blind Guard, but the command finishes (exit 0) before the supervisor reads the
    poisoned steps, as a fast run does: the last look decides like the ones before it."""
    run = tmp_path / "late"
    out = LateSupervisor(run, [*TRAIN, "--steps", "70", "--poison-steps", "50-52", "--guard-blind"],
                         FAST, env=ENV).run()
    check_supervisor_repair(run, out, 70, exit_code=0)
    assert "divergence seen after the command ended" in out.launches[0].why


@pytest.mark.slow
def test_guard_giving_up_hands_the_divergence_to_the_supervisor(tmp_path):
    """--max-rollbacks 0: the Guard records its verdict and exits with EXIT_DIVERGED; the
    supervisor rolls back and blacklists from the Guard's verdict and the run finishes."""
    run = tmp_path / "r"
    with RowWatch(run) as watch:
        out = supervise(run, "--poison-steps", "50-52", "--max-rollbacks", "0", steps=80)
    watch.check()
    assert out.exit_code == 0
    first = out.launches[0]
    assert first.ending == "divergence" and first.exit_code == thermo.EXIT_DIVERGED
    assert "the Guard gave up" in first.why
    v = events(run, "verdict")["data"].tolist()
    assert len(v) == 1 and "source" not in v[0]  # the Guard's verdict; the supervisor adds none
    assert set(clean_batch(51)) <= Blacklist.load(run).ids
    assert_contiguous(run, 80)


# -- 2. SIGKILL in the middle of a checkpoint write ------------------------------------------------


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    run = tmp_path / "r"
    with RowWatch(run) as watch:
        out = supervise(run, "--kill-during-checkpoint", "40", "--fault-once", steps=50)
    watch.check()
    assert out.exit_code == 0 and [la.ending for la in out.launches] == ["crash", "finished"]
    assert "killed by SIGKILL" in out.launches[0].why and out.launches[0].current == 40
    restarts = events(run, "restart")["data"].tolist()
    assert restarts[0]["reason"] == "crash" and restarts[0]["checkpoint"] == 20
    assert restarts[1] == {"reason": "resume", "checkpoint": 20}  # the torn step 40 was never loaded
    ckpts = thermo.Checkpoints(run)
    entry = next(e for e in ckpts.entries if e.step == 40)  # written again, whole, by the restart
    assert ckpts.torn(entry) is None and entry.time > out.launches[0].end
    assert_contiguous(run, 50)


@pytest.mark.slow
def test_random_sigkills_lose_no_row_tear_no_checkpoint_and_resume_the_same_run(tmp_path):
    """SIGKILL the trainer at seeded random moments (around flushes and checkpoint writes) while
    the supervisor restarts it: every row a reader saw stays, every committed checkpoint is
    intact, and the run reads the same data and reaches the same losses as one never killed."""
    import random

    run = tmp_path / "killed"
    rng = random.Random(12)
    targets = sorted(rng.sample([19, 20, 21, 30, 39, 40, 41, 50, 59, 60, 61, 70], 4))
    cfg = dataclasses.replace(FAST, max_restarts=10, max_stalled=6)
    sup = Supervisor(run, [*TRAIN, "--steps", "80"], cfg, env=ENV)
    killed: list[int] = []

    def killer():
        for target in targets:
            while True:
                beat = _read_beat(run)
                if beat is not None and beat >= target and sup._proc is not None and sup._proc.poll() is None:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere in that step: a flush, a save, the update
            proc = sup._proc  # this launch's: the supervisor may start the next one any moment
            try:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(target)
            except ProcessLookupError:
                pass
            while proc.poll() is None:
                time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    with RowWatch(run, every=0.2) as watch:
        t.start()
        out = sup.run()
    t.join(5)
    watch.check()
    assert out.exit_code == 0 and len(killed) == len(targets), (out.message, killed)
    assert [la.ending for la in out.launches] == ["crash"] * len(targets) + ["finished"]
    ckpts = thermo.Checkpoints(run)
    assert ckpts.entries and all(ckpts.torn(e) is None for e in ckpts.entries)
    assert_contiguous(run, 80)

    clean = tmp_path / "clean"
    train_clean(clean, 80)
    with Store(run, readonly=True) as a, Store(clean, readonly=True) as b:
        assert a.ledger() == b.ledger()
        la, lb = a.scalars().set_index("step")["loss"], b.scalars().set_index("step")["loss"]
    assert ((la - lb).abs() <= 1e-5 * lb.abs()).all()


def train_clean(run_dir: Path, steps: int) -> None:
    """The reference run in this process, on one thread as the supervised processes ran."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(parse_args([*TINY, "--steps", str(steps), "--run-dir", str(run_dir)]))
    finally:
        torch.set_num_threads(threads)


def _read_beat(run: Path) -> int | None:
    try:
        return int(json.loads(RunDir(run).heartbeat.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- 3. a crash that repeats at the same batch -------------------------------------------------


def test_a_crash_that_repeats_at_the_same_batch_blacklists_it(tmp_path):
    run = tmp_path / "r"
    with RowWatch(run) as watch:
        out = supervise(run, "--crash-on-batch", "45", steps=50)
    watch.check()
    assert out.exit_code == 0
    assert [(la.ending, la.current) for la in out.launches] == [("crash", 45), ("crash", 45), ("finished", 50)]
    (bl,) = events(run, "blacklist")["data"]
    assert sorted(bl["added"]) == sorted(clean_batch(45)) and bl["source"] == "supervisor"
    assert [d["reason"] for d in events(run, "restart")["data"] if d["reason"] != "resume"] == ["crash"] * 2
    with Store(run, readonly=True) as s:
        assert not set(clean_batch(45)) & {i for ids in s.ledger().values() for i in ids}
    assert_contiguous(run, 50)


# -- 4. a hung rank ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_hung_rank_is_detected_within_the_timeout_and_restarted(tmp_path):
    """2 ranks under torchrun (FSDP2): rank 1 sleeps at step 12, rank 0 blocks in the next
    collective. torchrun starts each worker in a session of its own: all must die, at once: the
    Guard defers SIGTERM to a step boundary (a preemption) that a hung rank never reaches, so
    waiting out the grace period would only add its 30 s."""
    run = tmp_path / "r"
    cmd = hang_command(run)
    cfg = dataclasses.replace(FAST, hang_timeout=6.0, grace=30.0)
    with RowWatch(run) as watch:
        out = supervise(run, command=cmd, config=cfg)
    watch.check()
    assert out.exit_code == 0 and [la.ending for la in out.launches] == ["hang", "finished"]
    hung = out.launches[0]
    assert hung.current == 12 and "no heartbeat" in hung.why
    assert 6.0 <= hung.end - hung.fault_time <= 6.0 + 8.0  # timeout + polling slack, no grace
    assert events(run, "restart")["data"].iloc[0]["reason"] == "hang"
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _runs_in(p, run) and _start_time(int(p))]
    assert leftovers == [], "a process of the hung launch survived"
    assert_contiguous(run, 20)


def _runs_in(pid: str, run: Path) -> bool:
    try:
        return str(run).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# -- 5. a crash loop ---------------------------------------------------------------------------


def test_a_crash_loop_gives_up_after_the_limit_with_an_explanation(tmp_path):
    run = tmp_path / "r"
    res = subprocess.run(
        [sys.executable, "-m", "thermo.cli", "supervise", str(run), "--max-restarts", "1", "--poll", "0.2",
         "--restart-delay", "0", "--quiet", "--", *TRAIN, "--steps", "50", "--crash-on-start"],
        capture_output=True, text=True, env={**os.environ, **ENV}, timeout=120)
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("thermo supervise: gave up after 2 launches: --max-restarts 1 reached")
    assert "crash before its first step (exit code 1)" in last and "--crash-on-start" in last
    ev = events(run)
    assert list(ev["kind"]) == ["supervise", "restart", "give_up"]
    assert all(d["exit_code"] == 1 for d in ev[ev["kind"] == "restart"]["data"])
    assert ev.iloc[-1]["data"]["last_error"] == "train_gpt: fault injection: --crash-on-start"


# -- 6. readers while the trainer writes and the supervisor restarts it ---------------------------


@pytest.mark.slow
def test_readers_during_writes_and_restarts_see_no_lock_and_lose_no_row(tmp_path):
    """The Guard rolls back a poisoned region in process (the supervisor must leave it alone),
    then the trainer crashes and the supervisor restarts it, while a dashboard reader, a
    `thermo.load` + `detect_run` loop and `thermo inspect` processes read the store."""
    from thermo.dashboard import RunReader

    run = tmp_path / "r"
    errors: list[str] = []
    stop = threading.Event()

    def dashboard():
        reader = RunReader(run)
        while not stop.is_set():
            try:
                reader.poll()
                reader.run()
                if reader.error and "no metrics store" not in reader.error:
                    errors.append(reader.error)
            except Exception as e:  # noqa: BLE001
                errors.append(f"dashboard: {type(e).__name__}: {e}")
            stop.wait(0.1)
        reader.close()

    def loader():
        while not stop.is_set():
            try:
                if (run / "thermo.db").exists():
                    thermo.load(run, effective=False)
                    thermo.detect_run(run)
            except StoreError as e:
                if "being created" not in str(e):
                    errors.append(f"load: {e}")
            except Exception as e:  # noqa: BLE001
                errors.append(f"load: {type(e).__name__}: {e}")
            stop.wait(0.2)

    inspects = []

    def inspect():
        while not stop.is_set():
            if (run / "thermo.db").exists():
                r = subprocess.run([sys.executable, "-m", "thermo.cli", "inspect", str(run)],
                                   capture_output=True, text=True, env={**os.environ, **ENV})
                inspects.append(r)
            stop.wait(1.0)

    threads = [threading.Thread(target=f, daemon=True) for f in (dashboard, loader, inspect)]
    for t in threads:
        t.start()
    with RowWatch(run, every=0.2) as watch:
        out = supervise(run, "--poison-steps", "50-52", "--crash-at", "70", "--fault-once", steps=80)
    stop.set()
    for t in threads:
        t.join()
    watch.check()
    assert not errors, errors[:3]
    assert inspects and all(r.returncode == 0 and "locked" not in r.stderr for r in inspects), \
        [r.stderr for r in inspects if r.returncode]
    assert out.exit_code == 0 and [la.ending for la in out.launches] == ["crash", "finished"]
    ev = events(run)
    assert list(ev["kind"]).count("rollback") == 1  # the Guard's, in process
    assert not any(d.get("source") == "supervisor" for d in ev[ev["kind"] == "verdict"]["data"])
    assert [d["reason"] for d in ev[ev["kind"] == "restart"]["data"]] == ["crash", "resume"]
    assert_contiguous(run, 80)


# -- a loop with a Thermometer only --------------------------------------------------------------


def test_a_thermometer_only_loop_is_protected_by_the_store(tmp_path):
    run = tmp_path / "r"
    with RowWatch(run, every=0.2) as watch:
        out = supervise(run, command=[sys.executable, str(FAULTS / "thermometer_only.py"), "--steps", "40"])
    watch.check()
    assert out.exit_code == 0 and [la.ending for la in out.launches] == ["divergence", "finished"]
    (v,) = events(run, "verdict")["data"]
    assert v["source"] == "supervisor" and v["kind"] == "nonfinite" and v["detection_step"] == 25
    assert events(run, "restart")["data"].iloc[0]["reason"] == "divergence"
    with Store(run, readonly=True) as s:
        attempts = s.attempts()
        rows = s.scalars(effective=False)
    # The supervisor opened attempt 1 for the relaunch: the first launch's rows are all kept.
    assert list(attempts["reason"])[-1].startswith("restart by thermo supervise")
    assert (rows["attempt"] == 0).sum() >= 25 and (rows["attempt"] == 1).sum() == 40


@pytest.mark.slow
def test_a_framework_adapter_stopping_to_resume_is_relaunched(tmp_path, recwarn):
    """The Lightning callback stops on a verdict and exits 0: the supervisor relaunches it."""
    pytest.importorskip("lightning")
    run = tmp_path / "r"
    out = supervise(run, command=[sys.executable, str(FAULTS / "lightning_stop.py")])
    assert out.exit_code == 0, out.message
    assert [la.ending for la in out.launches] == ["relaunch", "finished"]
    assert "stopped on a verdict to resume from checkpoint" in out.launches[0].why
    kinds = list(events(run)["kind"])
    assert kinds.count("rollback") == 1 and "restart" in kinds
    assert thermo.load(run).scalars["step"].max() == 100
    # The supervisor judged Lightning's checkpoints as Lightning's, not as torn DCP folders.
    assert not [w for w in recwarn if "unusable" in str(w.message)]
    assert json.loads((run / "manifest.json").read_text())["backend"] == "lightning"


def test_the_supervisor_reads_checkpoints_it_cannot_load(tmp_path):
    """A framework adapter's checkpoints (here a made-up format): the supervisor cannot build
    their backend, so it checks what every backend shares and leaves the rest to the trainer."""
    from thermo.checkpoints import Checkpoints
    from thermo.supervisor.checks import _checkpoints, _newest_usable

    class Framework:
        name = "framework"

        def save(self, path, model, optimizer, scheduler, rng):
            path.mkdir()
            (path / "weights.bin").write_bytes(b"w")

        def load(self, path, model, optimizer, scheduler, rng):
            raise AssertionError("not loaded here")

        def torn(self, path):
            return None

    ckpts = Checkpoints(tmp_path, backend=Framework(), good_after=0)
    model = torch.nn.Linear(2, 2)
    for step in (0, 20, 40):
        ckpts.save(step, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _newest_usable(tmp_path) == 40
    (tmp_path / "checkpoints" / "step_00000040" / "thermo.json").unlink()  # torn, whatever the format
    with pytest.warns(RuntimeWarning, match="step_00000040 is unusable"):
        assert _newest_usable(tmp_path) == 20
    view = _checkpoints(tmp_path)
    view.mark_bad(20, "a verdict's onset")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["backend"] == "framework"  # rewritten by the supervisor, still the writer's
    assert [e["health"] for e in manifest["checkpoints"]] == ["pending", "bad", "bad"]


# -- stopping --------------------------------------------------------------------------------


def test_sigterm_stops_the_command_and_its_detached_workers(tmp_path):
    run, pids = tmp_path / "r", tmp_path / "pids"
    sup = subprocess.Popen(
        [sys.executable, "-m", "thermo.cli", "supervise", str(run), "--poll", "0.1", "--grace", "2", "--quiet",
         "--", sys.executable, str(FAULTS / "process_tree.py"), str(pids)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not pids.exists() and time.time() < deadline:
        time.sleep(0.1)
    child, grandchild = map(int, pids.read_text().split())
    sup.send_signal(signal.SIGTERM)
    out, err = sup.communicate(timeout=30)
    assert sup.returncode == 128 + signal.SIGTERM, err
    assert "process_tree: sleeping" in out
    assert "stopped after 1 launch: stopped by SIGTERM" in err
    assert _start_time(child) is None and _start_time(grandchild) is None
    assert events(run).iloc[-2]["kind"] == "stop"


def test_a_daemon_the_command_double_forked_is_stopped_with_it(tmp_path):
    run, pidfile = tmp_path / "r", tmp_path / "daemon"
    out = supervise(run, command=[sys.executable, str(FAULTS / "double_fork.py"), str(pidfile)])
    assert out.status == "finished"
    daemon = int(pidfile.read_text())
    deadline = time.time() + 10
    while _start_time(daemon) is not None and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert _start_time(daemon) is None, "the double-forked daemon outlived the supervisor"
    finally:
        try:
            os.kill(daemon, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- 7. bad input ------------------------------------------------------------------------------


def _snapshot(path: Path) -> dict:
    if not path.exists():
        return {}
    # A reader of a WAL store creates an empty -wal and touches the -shm index: no data.
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))
            if not p.name.endswith("-shm") and not (p.name.endswith("-wal") and not p.stat().st_size)}


def _broken(kind: str, tmp_path: Path) -> tuple[Path, list[str], str]:
    """A run directory broken as `kind` says, the command, and the expected error's words."""
    run = tmp_path / "r"
    if kind == "unknown command":
        return run, ["no-such-trainer-xyz", "--steps", "1"], "command not found: 'no-such-trainer-xyz'"
    if kind == "another run dir":
        return run, [*TRAIN, "--run-dir", str(tmp_path / "other")], "the command writes to --run-dir"
    if kind == "unwritable run dir":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "r", ["true"], "is not writable"
    run.mkdir()
    if kind == "malformed blacklist":
        (run / "blacklist.json").write_text('{"format": "thermo.blacklist", "version": 1, "entries": [{"id": -3}]}')
        return run, ["true"], "blacklist.json: entry 0 is malformed"
    if kind == "newer store":
        Store(run).close()
        import sqlite3

        c = sqlite3.connect(run / "thermo.db")
        c.execute("PRAGMA user_version = 99")
        c.close()
        return run, ["true"], "written by a newer thermo (store schema 99"
    if kind == "newer manifest":
        (run / "manifest.json").write_text('{"format": "thermo.manifest", "version": 7, "checkpoints": []}')
        return run, ["true"], "has manifest version 7; this thermo reads up to 1"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["unknown command", "another run dir", "unwritable run dir", "malformed blacklist",
                                  "newer store", "newer manifest"])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, kind):
    run, cmd, words = _broken(kind, tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises((SupervisorError, RunDirError), match=words.replace("(", r"\(").replace(".", r"\.")):
        Supervisor(run, cmd, FAST).run()
    res = CliRunner().invoke(cli, ["supervise", str(run), "--", *cmd])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("thermo: error: ") and words in res.output and res.output.count("\n") == 1
    assert _snapshot(tmp_path) == before  # nothing created, nothing changed


_CRAFTED_BEATS = r"""
import json, os, sys, time
path = os.path.join(os.environ["THERMO_RUN_DIR"], "heartbeat.json")
now = time.time() + 1
beats = ['{"time": "soon"}', '{"time": Infinity}', '{"time": NaN}', '[1, 2]', "[" * 100000,
         json.dumps({"time": now, "step": "abc"}), json.dumps({"time": now + 1, "step": 1e308}),
         json.dumps({"time": now + 2, "step": -5}), json.dumps({"time": now + 3, "step": 3, "ids": "abc"}),
         json.dumps({"time": now + 4, "step": 4, "ids": [[1], {"a": 2}, True]}),
         json.dumps({"time": now + 5, "step": 5, "ids": {"1": 2}})]
for b in beats:
    with open(path + ".tmp", "w") as f:
        f.write(b)
    os.replace(path + ".tmp", path)
    time.sleep(0.25)
print("crafted: done", flush=True)
"""


def test_a_crafted_heartbeat_never_crashes_the_supervisor(tmp_path):
    """The heartbeat is written by the command, which may be anything: every field is checked."""
    run = tmp_path / "r"
    out = Supervisor(run, [sys.executable, "-c", _CRAFTED_BEATS], dataclasses.replace(FAST, poll=0.1),
                     env=ENV).run()
    assert out.status == "finished" and out.exit_code == 0, out.message
    (launch,) = out.launches
    assert launch.current == 5 and launch.ids == []  # the last well-formed step; its ids were not


def test_one_supervisor_per_run_dir(tmp_path):
    from thermo.supervisor import _lock

    tmp_path.joinpath("r").mkdir()
    fd = _lock(tmp_path / "r")
    try:
        with pytest.raises(SupervisorError, match="another thermo supervise is already watching"):
            Supervisor(tmp_path / "r", ["true"], FAST).run()
    finally:
        os.close(fd)


def test_a_trainer_orphaned_by_a_killed_supervisor_keeps_a_new_one_out(tmp_path):
    """kill -9 of thermo supervise leaves its command running (it has a session of its own); it
    still holds the run directory's writer lock, so a new supervisor refuses to start a second
    trainer beside it, in one line, until the orphan is gone."""
    run, pids = tmp_path / "r", tmp_path / "pids"
    sup = subprocess.Popen(
        [sys.executable, "-m", "thermo.cli", "supervise", str(run), "--poll", "0.1", "--quiet",
         "--", sys.executable, str(FAULTS / "process_tree.py"), str(pids)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not pids.exists() and time.time() < deadline:
        time.sleep(0.1)
    child, grandchild = map(int, pids.read_text().split())
    try:
        sup.kill()
        sup.wait()
        with pytest.raises(SupervisorError, match=rf"another process is writing to {run}: thermo supervise pid "
                                                  rf"{sup.pid} took the lock at .* and has died, but a process "
                                                  "it started still holds it"):
            Supervisor(run, ["true"], FAST).run()
    finally:
        for pid in (child, grandchild):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.time() + 10
    while _start_time(child) is not None and time.time() < deadline:  # reaped by init
        time.sleep(0.1)
    out = Supervisor(run, ["true"], FAST).run()  # the orphan is gone: so is its lock
    assert out.status == "finished"


def test_supervise_cli_takes_its_defaults_from_supervisor_config(tmp_path, monkeypatch):
    import thermo.supervisor as sup

    seen = {}

    class Fake:
        def __init__(self, run_dir, command, config):
            seen["config"] = config

        def run(self):
            return sup.Outcome("finished", 0, "", [], [])

    monkeypatch.setattr(sup, "Supervisor", Fake)
    r = CliRunner().invoke(cli, ["supervise", str(tmp_path / "r"), "--", "true"])
    assert r.exit_code == 0, r.output
    assert seen["config"] == SupervisorConfig()  # one default, one place
    r = CliRunner().invoke(cli, ["supervise", "--help"])
    assert f"[default: ({SupervisorConfig.hang_timeout})]" in r.output


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="SupervisorConfig.hang_timeout"):
        SupervisorConfig(hang_timeout=0)
    with pytest.raises(ValueError, match="SupervisorConfig.max_stalled"):
        SupervisorConfig(max_stalled=0)
    with pytest.raises(ValueError, match="SupervisorConfig.detector"):
        SupervisorConfig(detector={"dtype": "float16"})


# -- thermo blacklist ----------------------------------------------------------------------------


def test_blacklist_cli_lists_adds_and_removes_with_events(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    Blacklist(run).add([5, 6], reason="loss spike at step 92", source="guard")
    r = CliRunner().invoke(cli, ["blacklist", str(run), "add", "17", "100-103,7", "--reason", "corrupt shard"])
    assert r.exit_code == 0 and r.output.strip() == "added 6 of 6 ids: 7 17 100-103"
    r = CliRunner().invoke(cli, ["blacklist", str(run), "remove", "5", "17", "999"])
    assert r.exit_code == 0 and r.output.strip() == "removed 2 of 3 ids: 5 17"
    r = CliRunner().invoke(cli, ["blacklist", str(run)])
    assert r.exit_code == 0
    assert r.output.splitlines() == ["6 blacklisted samples in " + str(run),
                                     "  [guard] 1: loss spike at step 92", "      6",
                                     "  [user] 5: corrupt shard", "      7 100-103"]
    r = CliRunner().invoke(cli, ["blacklist", str(run), "list", "--json"])
    assert [e["id"] for e in json.loads(r.output)] == [6, 7, 100, 101, 102, 103]
    ev = events(run, "blacklist")["data"].tolist()
    assert ev == [{"added": [7, 17, 100, 101, 102, 103], "removed": [], "reason": "corrupt shard", "source": "user"},
                  {"added": [], "removed": [5, 17], "reason": "removed by hand", "source": "user"}]


def test_blacklist_cli_takes_a_hundred_billion_ids_as_one_range(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    r = CliRunner().invoke(cli, ["blacklist", str(run), "add", "0-100000000000", "--reason", "all of shard 0"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "added 100000000001 of 100000000001 ids: 0-100000000000"
    r = CliRunner().invoke(cli, ["blacklist", str(run)])
    assert r.output.splitlines() == [f"100000000001 blacklisted samples in {run}",
                                     "  [user] 100000000001: all of shard 0", "      0-100000000000"]
    r = CliRunner().invoke(cli, ["blacklist", str(run), "list", "--json"])
    assert [g["ranges"] for g in json.loads(r.output)] == [[[0, 100000000000]]]
    (ev,) = events(run, "blacklist")["data"]
    assert ev["added"] == 100000000001 and ev["added_ranges"] == [[0, 100000000000]]
    assert (run / "blacklist.json").stat().st_size < 1000


@pytest.mark.parametrize("args, words", [
    (["add", "x1"], "'x1' is not a sample id"),
    (["add"], "add needs sample ids"),
    (["list", "3"], "list takes no ids"),
    (["add", "5-3"], "the range '5-3' ends before it starts; write it as 3-5"),
    (["add", "1-2-3"], "'1-2-3' is not a sample id"),
    (["add", "5-"], "'5-' is not a sample id"),
    (["add", "0-99999999999999999999"], "goes past the largest sample id"),
])
def test_blacklist_cli_bad_input(tmp_path, args, words):
    (tmp_path / "r").mkdir()
    r = CliRunner().invoke(cli, ["blacklist", str(tmp_path / "r"), *args])
    assert r.exit_code == 2 and r.output.startswith("thermo: error: ") and words in r.output
    r = CliRunner().invoke(cli, ["blacklist", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "r" / "blacklist.json").write_text("{ not json")
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["blacklist", str(tmp_path / "r"), "add", "1"])
    assert r.exit_code == 2 and "blacklist.json is not valid JSON" in r.output
    assert _snapshot(tmp_path) == before


def test_the_supervisor_repairs_with_the_settings_the_runs_guard_recorded(tmp_path):
    """One default, one place: a verdict the supervisor repairs costs what the Guard's would
    (its rollback margin and skip window). The Guard's detector settings are recorded too."""
    from thermo.detector import DetectorConfig, SpikeRule
    from thermo.guard import Guard, GuardConfig

    det = DetectorConfig(onset_lookback=50, spikes=(SpikeRule("loss", z=4.0),))
    model = torch.nn.Linear(2, 2)
    Guard(model, torch.optim.SGD(model.parameters(), lr=0.1, fused=True), data=ResumableSampler(10, 2),
          fetch=lambda ids: ids, run_dir=tmp_path, config=GuardConfig(rollback_margin=3, skip_before=7),
          detector=det).close()
    with Store(tmp_path, readonly=True) as store:
        meta = store.meta()
        assert SupervisorConfig().guard_settings(meta["guard"]) == {
            "rollback_margin": 3, "skip_before": 7, "skip_after": GuardConfig.skip_after}
        assert SupervisorConfig(skip_before=1).guard_settings(meta["guard"])["skip_before"] == 1  # told: its own
        assert SupervisorConfig().guard_settings(None)["skip_before"] == GuardConfig.skip_before  # no Guard
        assert DetectorConfig.from_dict(meta["detector"]) == det
