"""The SQLite run store: round trips, the effective timeline across rollbacks, concurrent
readers, and clear errors for files that are not ours."""

from __future__ import annotations

import math
import multiprocessing as mp
import sqlite3
import time

import pytest

import thermo
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
