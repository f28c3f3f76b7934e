"""The SQLite run store: round trips, the effective timeline across rollbacks, concurrent
readers, and clear errors for files that are not ours."""

from __future__ import annotations

import math
import multiprocessing as mp
import sqlite3
import time

import pytest

import thermo
from thermo.rundir import RunDir
from thermo.store import StepRecord, Store, StoreError


def rec(step, attempt=0, loss=1.0, **layers):
    return StepRecord(step=step, attempt=attempt, scalars={"loss": loss},
                      layers={(k.replace("__", "."), "act_max"): v for k, v in layers.items()})


def test_round_trip_keeps_nan_and_inf(tmp_path):
    with Store(tmp_path) as s:
        s.write([rec(0, loss=2.5, h__0=1.0), rec(1, loss=math.nan, h__0=math.inf),
                 rec(2, loss=-math.inf, h__0=math.nan)])
    run = thermo.load(tmp_path)
    loss = list(run.scalars["loss"])
    assert loss[0] == 2.5 and math.isnan(loss[1]) and loss[2] == -math.inf
    vals = list(run.layers.sort_values("step")["value"])
    assert vals[0] == 1.0 and vals[1] == math.inf and math.isnan(vals[2])
    with Store(tmp_path, readonly=True) as s:
        back = list(s.records())
    assert [r.step for r in back] == [0, 1, 2]
    assert math.isnan(back[1].scalars["loss"]) and back[1].layers[("h.0", "act_max")] == math.inf


def test_effective_timeline_after_a_rollback(tmp_path):
    with Store(tmp_path) as s:
        s.write([rec(i, loss=float(i)) for i in range(10)])  # attempt 0 ran to step 9
        a = s.begin_attempt(start_step=5, reason="rollback")  # restored step 5; 6.. are redone
        assert a == 1 and s.current_attempt() == 1
        s.write([rec(i, attempt=1, loss=100.0 + i) for i in (6, 7)])  # attempt 1 reached step 7
    run = thermo.load(tmp_path)
    got = dict(zip(run.scalars["step"], run.scalars["loss"]))
    # Steps 8 and 9 of attempt 0 were rolled back: not on the effective timeline.
    assert got == {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 6: 106.0, 7: 107.0}
    everything = thermo.load(tmp_path, effective=False).scalars
    assert len(everything) == 12
    att = run.attempts.set_index("attempt")
    assert att.loc[0, "end_step"] == 5 and att.loc[1, "start_step"] == 5


def test_events_ledger_and_meta(tmp_path):
    with Store(tmp_path) as s:
        s.event("verdict", "grad_norm spike", step=12, onset_step=9, layer=None)
        s.write_ledger(0, [(0, [3, 1, 2]), (1, [7, 8, 9])])
        s.set_meta("layers", [{"name": "h.0"}])
        assert s.ledger(0, 0) == {0: [3, 1, 2]}
    run = thermo.load(tmp_path)
    ev = run.events.iloc[0]
    assert ev["kind"] == "verdict" and ev["step"] == 12 and ev["data"] == {"onset_step": 9, "layer": None}
    assert run.meta["layers"] == [{"name": "h.0"}] and run.meta["thermo_version"] == thermo.__version__


def _writer(path, n, ready):
    with Store(path) as s:
        ready.set()
        for i in range(n):
            s.write([StepRecord(step=i, scalars={"loss": float(i)}, layers={("h.0", "act_max"): 1.0})])


def test_readers_never_fail_while_a_writer_writes(tmp_path):
    Store(tmp_path).close()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_writer, args=(str(tmp_path), 400, ready))
    proc.start()
    ready.wait(30)
    seen = []
    deadline = time.time() + 60
    while proc.is_alive() and time.time() < deadline:
        with Store(tmp_path, readonly=True) as r:  # what the dashboard and `thermo inspect` do
            steps = r.scalars()["step"] if r.last_step() is not None else []
            seen.append(len(steps))
            assert list(steps) == list(range(len(steps)))  # a prefix, never a torn flush
    proc.join(30)
    assert proc.exitcode == 0
    assert seen and max(seen) <= 400
    assert len(thermo.load(tmp_path).scalars) == 400
    with sqlite3.connect(tmp_path / "thermo.db") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_not_a_database(tmp_path):
    (tmp_path / "thermo.db").write_bytes(b"this is a text file, not SQLite\n" * 100)
    with pytest.raises(StoreError, match="is not a thermo metrics store.*Move that file away"):
        Store(tmp_path)
    with pytest.raises(StoreError, match="not a thermo metrics store"):
        thermo.load(tmp_path)
    assert (tmp_path / "thermo.db").read_bytes().startswith(b"this is a text file")  # untouched


def test_foreign_sqlite_file(tmp_path):
    with sqlite3.connect(tmp_path / "thermo.db") as c:
        c.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="SQLite file of another program"):
        Store(tmp_path)


def test_store_from_a_newer_thermo(tmp_path):
    Store(tmp_path).close()
    with sqlite3.connect(tmp_path / "thermo.db") as c:
        c.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer thermo .*Upgrade thermo"):
        thermo.load(tmp_path)


def test_missing_store_and_unwritable_dir(tmp_path):
    with pytest.raises(StoreError, match="no metrics store"):
        thermo.load(tmp_path / "nope")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create run directory"):
        Store(blocker / "run")


# -- names, mounts, relaunches (issue 12) -----------------------------------------------------


def test_a_run_directory_named_with_hash_question_mark_and_percent_works(tmp_path):
    run = tmp_path / "exp#1?lr=3e-4%20 x"
    with Store(run) as s:
        s.write([rec(1, loss=2.0), rec(2, loss=1.5)])
    before = sorted(p.name for p in tmp_path.iterdir())
    with Store(run, readonly=True) as r:
        assert [x.step for x in r.records()] == [1, 2]
    assert list(thermo.load(run).scalars["loss"]) == [2.0, 1.5]
    thermo.detect_run(run)  # the offline detector opens the store the same way
    # No stray files beside the run directory (an unescaped URI opened "exp" and "exp#1").
    assert sorted(p.name for p in tmp_path.iterdir()) == before == [run.name]


_RO_MOUNT = """
import sys, thermo
run = thermo.load(sys.argv[1])
print(list(run.scalars["loss"]))
"""


def test_a_cleanly_closed_store_on_a_read_only_mount_opens_read_only(tmp_path):
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode:
        pytest.skip("needs unshare -rm (a user namespace) to make a read-only bind mount")
    run = tmp_path / "run"
    with Store(run) as s:
        s.write([rec(1, loss=2.0), rec(2, loss=1.5)])
    files = sorted(p.name for p in run.iterdir())
    assert files == [".writer.lock", "thermo.db"]  # closed cleanly: no -wal/-shm
    mount = f"mount --bind {tmp_path} {tmp_path} && mount -o remount,bind,ro {tmp_path}"
    res = subprocess.run(["unshare", "-rm", "sh", "-c", f'{mount} && touch {run}/x 2>/dev/null; '
                          f'"$0" -c "$1" {run}', sys.executable, _RO_MOUNT],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[2.0, 1.5]"
    assert sorted(p.name for p in run.iterdir()) == files


def test_a_relaunch_that_cannot_resume_starts_a_new_attempt_and_overwrites_no_row(tmp_path):
    with Store(tmp_path) as s:  # the first launch: steps 1..60 of attempt 0
        s.write([rec(i, loss=float(i)) for i in range(1, 61)])
        s.write_ledger(0, [(i, [i]) for i in range(1, 61)])
    with Store(tmp_path) as s:  # a relaunch from scratch: it believes it writes attempt 0 again
        assert s.current_attempt() == 0
        s.write([rec(i, loss=100.0 + i) for i in range(1, 31)])
        s.write_ledger(0, [(i, [1000 + i]) for i in range(1, 31)])
    everything = thermo.load(tmp_path, effective=False).scalars
    first = everything[everything["attempt"] == 0]
    assert list(first["loss"]) == [float(i) for i in range(1, 61)]  # all kept, none replaced
    run = thermo.load(tmp_path)
    assert list(run.scalars["attempt"].unique()) == [1]
    assert list(run.scalars["loss"]) == [100.0 + i for i in range(1, 31)]
    assert run.attempts.iloc[-1]["start_step"] == 0
    (ev,) = run.events[run.events["kind"] == "restart"]["data"]
    assert ev["reason"] == "fresh" and ev["replaces"] == 0
    with Store(tmp_path, readonly=True) as r:
        assert r.ledger(1, 30) == {i: [1000 + i] for i in range(1, 31)}
        assert r.ledger(1, 60, effective=False)[60] == [60]


def test_the_same_steps_written_twice_in_one_attempt_start_a_new_attempt(tmp_path):
    with Store(tmp_path) as s:
        s.write([rec(1, loss=1.0, h__0=1.0), rec(2, loss=2.0, h__0=2.0)])
        s.write([rec(2, loss=20.0, h__0=20.0), rec(3, loss=30.0, h__0=30.0)])
        s.write([rec(4, loss=40.0, h__0=40.0)])  # the next flush follows on in the new attempt
    everything = thermo.load(tmp_path, effective=False)
    assert sorted(zip(everything.scalars["attempt"], everything.scalars["step"], everything.scalars["loss"])) == [
        (0, 1, 1.0), (0, 2, 2.0), (1, 2, 20.0), (1, 3, 30.0), (1, 4, 40.0)]
    assert len(everything.layers) == 5  # the rolled-back transaction's series id was not reused
    assert list(thermo.load(tmp_path).scalars["loss"]) == [1.0, 20.0, 30.0, 40.0]


def test_the_thermometer_snippet_run_twice_on_one_directory_keeps_both_runs(tmp_path):
    import torch

    def snippet(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with thermo.Thermometer(model, tmp_path, flush_every=5, attention=False) as therm:
            for _ in range(20):
                loss = model(torch.randn(16, 4)).pow(2).mean()
                loss.backward()
                therm.step(loss)
                opt.step()
                opt.zero_grad()
        return therm

    snippet(0)
    first = thermo.load(tmp_path).scalars[["step", "loss"]].copy()
    snippet(1)
    everything = thermo.load(tmp_path, effective=False).scalars
    kept = everything[everything["attempt"] == 0][["step", "loss"]].reset_index(drop=True)
    assert kept.equals(first.reset_index(drop=True))  # the first run's rows, untouched
    assert sorted(everything["attempt"].unique()) == [0, 1]
    second = thermo.load(tmp_path).scalars
    assert list(second["attempt"].unique()) == [1] and len(second) == 20


def test_a_corrupt_store_page_is_one_clear_error_not_a_traceback(tmp_path):
    with Store(tmp_path) as s:
        for k in range(40):
            s.write([rec(i, loss=1.0, **{f"h__{j}": 1.0 for j in range(20)}) for i in range(20 * k, 20 * k + 20)])
    db = RunDir(tmp_path).db
    with open(db, "r+b") as f:  # a page in the middle of the tables turns to garbage
        f.seek(db.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    damaged = db.read_bytes()
    with pytest.raises(StoreError, match=r"thermo.db is damaged \(database disk image is malformed\)"
                                         r".*\.recover") as err:
        thermo.load(tmp_path)
    assert "\n" not in str(err.value)
    with Store(tmp_path, readonly=True) as r, pytest.raises(StoreError, match="is damaged"):
        list(r.records())
    # The dashboard's reader says it in one line and keeps polling; the report's read raises it.
    reader = RunDir(tmp_path).reader()
    assert reader.poll() is False and "is damaged" in reader.error and "\n" not in reader.error
    reader.close()
    with pytest.raises(StoreError, match="is damaged"):
        RunDir(tmp_path).read()
    assert db.read_bytes() == damaged  # nothing lost or changed by looking


_HOLD_WRITER = """
import sys, time
from thermo.store import Store
s = Store(sys.argv[1])
print("writing", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_with_one_line_and_a_dead_ones_lock_is_not_stale(tmp_path):
    import subprocess
    import sys

    from thermo._io import RunDirError

    first = subprocess.Popen([sys.executable, "-c", _HOLD_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "writing"
        with pytest.raises(RunDirError, match=rf"another process is writing to {tmp_path}: a trainer pid "
                                              rf"{first.pid} on host .*give this run its own run directory") as e:
            Store(tmp_path)
        assert "\n" not in str(e.value)
        with Store(tmp_path, readonly=True) as r:  # readers are never refused
            r.events()
        with Store(tmp_path, lock=False) as events_only:  # thermo blacklist's events
            events_only.event("blacklist", "by hand")
    finally:
        first.kill()
        first.wait()
    with Store(tmp_path) as s, Store(tmp_path) as same_process:  # the dead writer's lock went with it
        s.write([rec(1)])
        same_process.event("note", "one process, one writer")
    assert len(thermo.load(tmp_path).events) == 2


def test_an_incremental_read_that_fails_half_way_loses_no_row(tmp_path, monkeypatch):
    from thermo.store import Cursor

    with Store(tmp_path) as s:
        s.write([rec(i, loss=1.0, h__0=2.0) for i in range(5)])
    with Store(tmp_path, readonly=True) as r:
        cursor = Cursor()
        real = r._events
        monkeypatch.setattr(r, "_events", lambda *a: (_ for _ in ()).throw(sqlite3.OperationalError("busy")))
        with pytest.raises(sqlite3.OperationalError):
            r.news(cursor)  # scalars and layers were read, then the events failed
        assert cursor == Cursor()
        monkeypatch.setattr(r, "_events", real)
        news = r.news(cursor)
        assert news.scalars[0]["step"].tolist() == [0, 1, 2, 3, 4] and len(news.layers[0]) == 5
