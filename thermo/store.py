"""The run directory's metrics store: one SQLite file in WAL mode, and its pandas readers.

Schema (``RUN/thermo.db``):

========== ==================================================================================
table      columns
========== ==================================================================================
meta       key, value (JSON): schema version, thermo version, the run's configuration
attempts   attempt, start_step, time, reason: attempt 0 is the first launch; every rollback
           or restart opens a new attempt that resumes after ``start_step``
scalars    attempt, step, key, value: loss, grad_norm, ... one row per step and key
series     id, layer, stat: the per-layer statistics recorded (``act_max`` of ``h.3.mlp``...)
layers     attempt, step, series, value: per-layer values in long form
events     id, time, attempt, step, kind, message, data (JSON): verdicts, rollbacks, restarts
ledger     attempt, step, ids (JSON list): the sample ids each step trained on (global batch)
========== ==================================================================================

The view ``layer_stats`` joins ``layers`` and ``series`` into (attempt, step, layer, stat, value).
SQLite cannot store NaN (it turns it into NULL); thermo never writes a missing value, so a NULL
value always means NaN and the readers give NaN back.

One process writes metrics (rank 0 of the trainer); others (the supervisor, `thermo blacklist`)
may add events; any number of readers (dashboard, report, `thermo inspect`) query while it writes.

No stored row is ever overwritten. A writer owns the attempts it opened (`begin_attempt`) and an
empty one it found; rows for an attempt an earlier launch already wrote (a relaunch that could
not resume from a checkpoint, the same script run twice on one directory) go to a new attempt
that restarts before their first step, recorded as a ``restart`` event with reason ``fresh``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from thermo._io import RunDirError, WriterLock
from thermo.rundir import RunDir

SCHEMA_VERSION = 1
# PRAGMA application_id marks the file as ours ("THMO"), so a foreign SQLite file is refused.
APPLICATION_ID = 0x54484D4F
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    attempt INTEGER PRIMARY KEY, start_step INTEGER NOT NULL, time REAL NOT NULL,
    reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scalars (
    attempt INTEGER NOT NULL, step INTEGER NOT NULL, key TEXT NOT NULL, value REAL,
    PRIMARY KEY (attempt, step, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, layer TEXT NOT NULL, stat TEXT NOT NULL, UNIQUE (layer, stat));
CREATE TABLE IF NOT EXISTS layers (
    attempt INTEGER NOT NULL, step INTEGER NOT NULL, series INTEGER NOT NULL, value REAL,
    PRIMARY KEY (attempt, step, series)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, attempt INTEGER NOT NULL,
    step INTEGER, kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (
    attempt INTEGER NOT NULL, step INTEGER NOT NULL, ids TEXT NOT NULL,
    PRIMARY KEY (attempt, step)) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS layer_stats AS
    SELECT l.attempt AS attempt, l.step AS step, s.layer AS layer, s.stat AS stat,
           l.value AS value
    FROM layers l JOIN series s ON s.id = l.series;
"""


_OUR_TABLES = {"meta", "attempts", "scalars", "series", "layers", "events", "ledger", "layer_stats",
               "sqlite_sequence", "sqlite_autoindex_meta_1", "sqlite_autoindex_series_1"}


class StoreError(RunDirError):
    """The metrics store cannot be opened or is not a thermo store."""


def _reading(method):
    """A damaged store (a corrupt page) is one `StoreError` naming the file and the way out,
    not a traceback from deep inside SQLite or pandas. A busy store is left to the caller."""

    @functools.wraps(method)
    def read(self, *args, **kw):
        try:
            return method(self, *args, **kw)
        except (sqlite3.DatabaseError, pd.errors.DatabaseError) as e:
            why = str(e).rsplit(": ", 1)[-1] if isinstance(e, pd.errors.DatabaseError) else str(e)
            if "locked" in why or "busy" in why:
                raise
            raise StoreError(
                f"the metrics store {self.path} is damaged ({why}). Nothing was changed; save what "
                f"it holds with: sqlite3 {self.path} .recover | sqlite3 recovered.db, then move the "
                "damaged file away"
            ) from None

    return read


@dataclass
class StepRecord:
    """Everything recorded for one training step, as the host sees it after a flush.

    The unit the thermometer writes, the detector reads (live and offline, from `Store.records`)
    and the sinks log.
    """

    step: int
    attempt: int = 0
    scalars: dict[str, float] = field(default_factory=dict)
    # (layer, stat) -> value, e.g. ("h.3.attn", "attn_max") -> 12.5
    layers: dict[tuple[str, str], float] = field(default_factory=dict)


def readonly_uri(path: str | os.PathLike) -> str:
    """The SQLite URI that opens `path` read-only (``sqlite3.connect(uri, uri=True)``). The path
    is percent-encoded: ``?``, ``#`` and ``%`` in a folder name are URI syntax, and unescaped they
    open another file (and create empty ones beside it)."""
    return f"file:{urllib.parse.quote(str(Path(path).absolute()))}?mode=ro"


def _db_value(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _py_value(v: float | None) -> float:
    return math.nan if v is None else float(v)


class Store:
    """The SQLite metrics store of one run directory.

    Args:
        run_dir: the run directory; ``thermo.db`` lives in it.
        readonly: open for reading only (the file must exist). Readers never block the writer.
        lock: a writer takes the run directory's `WriterLock` (one writer per run directory;
            a second is refused with `RunDirError`). False for processes that only add events
            beside the writer (``thermo blacklist``, the supervisor, which holds the lock itself).
        timeout: seconds to wait for a busy file (a display prefers a stale frame to a wait).
        shared: a connection other threads may use (a web server's), under the caller's lock.

    Example:
        >>> store = Store("runs/exp1")
        >>> store.write([StepRecord(step=0, scalars={"loss": 2.3})])
        >>> store.scalars()
    """

    def __init__(self, run_dir: str | os.PathLike, readonly: bool = False, *, lock: bool = True,
                 timeout: float = BUSY_TIMEOUT_MS / 1e3, shared: bool = False):
        self.run_dir = Path(run_dir)
        self.path = RunDir(run_dir).db
        self.readonly = readonly
        self._timeout, self._shared = timeout, shared
        self._series: dict[tuple[str, str], int] = {}
        self._owned: set[int] = set()  # attempts this writer opened or found empty
        self._moved: dict[int, int] = {}  # an earlier launch's attempt -> the one written instead
        self._lock: WriterLock | None = None
        self._conn = None
        if not readonly:
            self._mkdir()
            if lock:
                self._lock = WriterLock(self.run_dir, "a trainer").acquire()
        try:
            self._conn = self._connect()
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            if not self.path.is_file():
                raise StoreError(
                    f"no metrics store at {self.path}: is {self.run_dir} a thermo run directory? "
                    "A run writes it once the first steps are flushed."
                )
            uri = readonly_uri(self.path)
            try:
                conn = self._open(lambda: self._sqlite(uri, uri=True))
            except StoreError as first:
                conn = self._open_immutable(uri, first)
        else:
            conn = self._open(lambda: self._sqlite(self.path))
        self._check_and_init(conn)
        return conn

    def _sqlite(self, target, uri: bool = False) -> sqlite3.Connection:
        return sqlite3.connect(target, uri=uri, timeout=self._timeout, check_same_thread=not self._shared)

    def _open(self, connect) -> sqlite3.Connection:
        try:
            conn = connect()
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            # Reading the header here turns "not a database" into our error, not a later one.
            conn.execute("PRAGMA application_id").fetchone()
            return conn
        except sqlite3.DatabaseError as e:
            raise StoreError(self._foreign_message(str(e))) from None

    def _mkdir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create run directory {self.run_dir}: {e.strerror}. Choose a writable path."
            ) from None

    def _open_immutable(self, uri: str, first: StoreError) -> sqlite3.Connection:
        """A cleanly closed store on a read-only mount: a WAL reader needs to create ``-shm``
        beside it and cannot. Without a ``-wal`` file everything is in the main file and, as
        the folder is not writable, no writer can change it: read it as immutable."""
        wal = self.path.with_name(self.path.name + "-wal")
        if os.access(self.run_dir, os.W_OK) or wal.exists():
            if wal.exists() and not os.access(self.run_dir, os.W_OK):
                raise StoreError(
                    f"cannot read {self.path}: its folder is read-only and it has unfinished writes in "
                    f"{wal.name} (the writer did not close it). Copy the run directory to a writable "
                    "place and read it there."
                )
            raise first
        return self._open(lambda: self._sqlite(uri + "&immutable=1", uri=True))

    def _foreign_message(self, why: str) -> str:
        return (
            f"{self.path} is not a thermo metrics store ({why}). "
            "Move that file away, or point thermo at another run directory."
        )

    def _check_and_init(self, conn: sqlite3.Connection) -> None:
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            # A file we are creating (possibly another process, this instant) has no id yet and
            # holds nothing but our tables: the id is written last, once the tables exist.
            if app_id == 0 and tables <= _OUR_TABLES:
                if self.readonly:
                    raise StoreError(
                        f"the metrics store {self.path} is still being created; try again in a moment"
                    )
                conn.execute("PRAGMA journal_mode = WAL")  # readers never block the trainer
                from thermo import __version__

                with conn:
                    conn.executescript(_SCHEMA)
                    conn.execute(
                        "INSERT OR IGNORE INTO meta VALUES ('thermo_version', ?), ('created', ?)",
                        (json.dumps(__version__), json.dumps(time.time())),
                    )
                    conn.execute(
                        "INSERT OR IGNORE INTO attempts VALUES (0, -1, ?, 'start')", (time.time(),)
                    )
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            elif app_id != APPLICATION_ID:
                raise StoreError(self._foreign_message("it is an SQLite file of another program"))
            elif version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer thermo (store schema {version}, this "
                    f"thermo reads up to {SCHEMA_VERSION}). Upgrade thermo to read it."
                )
            if not self.readonly:
                conn.execute("PRAGMA synchronous = NORMAL")
            self._series = {
                (layer, stat): i for i, layer, stat in conn.execute("SELECT id, layer, stat FROM series")
            }
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(self._foreign_message(str(e))) from None
        except StoreError:
            conn.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __del__(self) -> None:
        # A writer dropped without close() (a constructor that raised after opening it) must not
        # keep the run directory's writer lock for the rest of a long-lived process. The SQLite
        # connection is left to its own finaliser, as before.
        lock = getattr(self, "_lock", None)
        if lock is not None:
            try:
                lock.release()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------

    def _series_id(self, key: tuple[str, str]) -> int:
        sid = self._series.get(key)
        if sid is None:
            self._conn.execute("INSERT OR IGNORE INTO series (layer, stat) VALUES (?, ?)", key)
            sid = self._conn.execute(
                "SELECT id FROM series WHERE layer = ? AND stat = ?", key
            ).fetchone()[0]
            self._series[key] = sid
        return sid

    def write(self, records: Sequence[StepRecord]) -> None:
        """Write the records of one flush in one transaction (all of them or none).

        Never overwrites a stored row: records for an attempt an earlier launch wrote, or for
        steps this attempt already holds, go to a new attempt (see the module docstring)."""
        by_attempt: dict[int, list[StepRecord]] = {}
        for r in records:
            by_attempt.setdefault(r.attempt, []).append(r)
        for attempt, recs in by_attempt.items():
            first = min(r.step for r in recs)
            self._insert(attempt, first, lambda a, recs=recs: self._write_records(a, recs))

    def _write_records(self, attempt: int, records: list[StepRecord]) -> None:
        self._conn.executemany(
            "INSERT INTO scalars VALUES (?, ?, ?, ?)",
            [(attempt, r.step, k, _db_value(v)) for r in records for k, v in r.scalars.items()],
        )
        self._conn.executemany(
            "INSERT INTO layers VALUES (?, ?, ?, ?)",
            [(attempt, r.step, self._series_id(k), _db_value(v)) for r in records for k, v in r.layers.items()],
        )

    def _insert(self, attempt: int, first_step: int, insert) -> None:
        """Run `insert(attempt)` in one transaction into the attempt this writer may write for
        `attempt`; on a row already stored, move to a new attempt and insert there instead."""
        target = self._own(attempt, first_step)
        try:
            self._transaction(lambda: insert(target))
        except sqlite3.IntegrityError:
            # The same steps again within one attempt (a loop that restarted its step count
            # without a rollback): the stored rows stay, these start a new attempt.
            target = self._fresh(attempt, first_step, "steps already recorded were recorded again")
            self._transaction(lambda: insert(target))

    def _transaction(self, fn) -> None:
        try:
            with self._conn:
                fn()
        except BaseException:
            # Series ids inserted by the rolled-back transaction are gone: forget them too.
            self._series = {(layer, stat): i for i, layer, stat
                            in self._conn.execute("SELECT id, layer, stat FROM series")}
            raise

    def _own(self, attempt: int, first_step: int) -> int:
        if attempt in self._moved:
            return self._moved[attempt]
        if attempt not in self._owned:
            if self._has_rows(attempt):
                return self._fresh(attempt, first_step, "a launch that did not resume from a checkpoint")
            self._owned.add(attempt)
        return attempt

    def _has_rows(self, attempt: int) -> bool:
        return any(
            self._conn.execute(f"SELECT 1 FROM {t} WHERE attempt = ? LIMIT 1", (attempt,)).fetchone()
            for t in ("scalars", "layers", "ledger")
        )

    def _fresh(self, attempt: int, first_step: int, why: str) -> int:
        new = self.begin_attempt(first_step - 1, f"fresh: {why}")
        self._moved[attempt] = new
        self.event("restart", f"{why}: its steps from {first_step} on are recorded as attempt {new}; "
                   f"attempt {attempt}'s rows are kept", step=first_step - 1, attempt=new,
                   reason="fresh", replaces=attempt)
        return new

    def write_ledger(self, attempt: int, steps: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Record which sample ids each step trained on: (step, ids) pairs, one transaction."""
        if not steps:
            return
        rows = [(step, json.dumps([int(i) for i in ids])) for step, ids in steps]
        self._insert(attempt, min(step for step, _ in steps), lambda a: self._conn.executemany(
            "INSERT INTO ledger VALUES (?, ?, ?)", [(a, step, ids) for step, ids in rows]))

    @_reading
    def ledger(self, first_step: int = 0, last_step: int = 2**62, effective: bool = True) -> dict[int, list[int]]:
        """step -> sample ids trained on, for steps in [first_step, last_step]."""
        where = f"AND {self._effective_clause('ledger')}" if effective else ""
        rows = self._conn.execute(
            f"SELECT step, ids FROM ledger WHERE step BETWEEN ? AND ? {where} ORDER BY attempt",
            (first_step, last_step),
        )
        return {step: json.loads(ids) for step, ids in rows}

    def event(
        self,
        kind: str,
        message: str,
        /,
        step: int | None = None,
        attempt: int | None = None,
        **data: Any,
    ) -> None:
        """Record an event (verdict, rollback, restart, blacklist edit...).

        `kind` and `message` are positional-only so that `data` may carry keys of those names
        (a verdict's own ``kind``)."""
        if attempt is None:
            attempt = self.current_attempt()
        with self._conn:
            self._conn.execute(
                "INSERT INTO events (time, attempt, step, kind, message, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), attempt, step, kind, message, json.dumps(data, default=str)),
            )

    def begin_attempt(self, start_step: int, reason: str) -> int:
        """Open a new attempt that resumes training after `start_step`; returns its number."""
        with self._conn:
            (last,) = self._conn.execute("SELECT MAX(attempt) FROM attempts").fetchone()
            attempt = 0 if last is None else last + 1
            self._conn.execute(
                "INSERT INTO attempts VALUES (?, ?, ?, ?)",
                (attempt, start_step, time.time(), reason),
            )
        self._owned.add(attempt)
        return attempt

    @_reading
    def current_attempt(self) -> int:
        (last,) = self._conn.execute("SELECT MAX(attempt) FROM attempts").fetchone()
        return 0 if last is None else int(last)

    def set_meta(self, key: str, value: Any) -> None:
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=str))
            )

    # -- reading -------------------------------------------------------------------------

    @_reading
    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}

    @_reading
    def attempts(self) -> pd.DataFrame:
        """One row per attempt with ``start_step`` and ``end_step``: the last step it owns.

        Attempt *a* owns its rows up to the start step of the first later attempt that restarted
        at or before them; rows past that were rolled back and are not on the effective timeline.
        """
        df = pd.read_sql_query(
            "SELECT attempt, start_step, time, reason FROM attempts ORDER BY attempt", self._conn
        )
        # end_step(a) = min(start_step of every later attempt); the last attempt owns everything.
        later_min = df["start_step"][::-1].cummin()[::-1].shift(-1)
        df["end_step"] = later_min.fillna(2**62).astype("int64")
        return df

    @_reading
    def news(self, cursor: Cursor) -> News:
        """What the run wrote past `cursor`, read in one snapshot (a flush is in all of it or in
        none), and `cursor` moved past it: per attempt the scalar and per-layer rows after the
        last step read, the events after the last id, and the attempts and meta as they are now.
        What the dashboard and the report's reader poll. A read that fails leaves `cursor` as it
        was (the next one reads those rows again)."""
        ahead = Cursor(dict(cursor.scalars), dict(cursor.layers), cursor.event)
        with self.snapshot():
            attempts = self.attempts()
            meta = self.meta()
            scalars, layers = [], []
            for a in attempts["attempt"].tolist():
                s = self._tail("SELECT attempt, step, key, value FROM scalars WHERE attempt = ? AND step > ?",
                               a, ahead.scalars)
                if s is not None:
                    wide = s.pivot(index=["attempt", "step"], columns="key", values="value")
                    wide.columns.name = None
                    scalars.append(wide.reset_index())
                lay = self._tail("SELECT attempt, step, layer, stat, value FROM layer_stats "
                                 "WHERE attempt = ? AND step > ?", a, ahead.layers)
                if lay is not None:
                    layers.append(lay)
            events = self._events("WHERE id > ?", (ahead.event,))
        if len(events):
            ahead.event = int(events["id"].max())
        cursor.scalars, cursor.layers, cursor.event = ahead.scalars, ahead.layers, ahead.event
        return News(attempts=attempts, meta=meta, scalars=scalars, layers=layers, events=events)

    def _tail(self, sql: str, attempt: int, seen: dict[int, int]) -> pd.DataFrame | None:
        df = pd.read_sql_query(sql, self._conn, params=(attempt, seen.get(attempt, -(2**62))))
        if df.empty:
            return None
        df["value"] = df["value"].astype("float64")  # NULL (NaN in SQLite) -> NaN
        seen[attempt] = int(df["step"].max())
        return df

    def _effective_clause(self, table: str) -> str:
        return (
            f"{table}.step <= (SELECT COALESCE(MIN(a.start_step), {2**62}) FROM attempts a "
            f"WHERE a.attempt > {table}.attempt)"
        )

    @_reading
    def scalars(self, effective: bool = True) -> pd.DataFrame:
        """Scalars as a wide frame: one row per (attempt, step), one column per key.

        Args:
            effective: only the rows on the effective timeline (what a run that never rolled back
                would show); False gives every attempt's rows, rolled-back ones included.
        """
        where = f"WHERE {self._effective_clause('scalars')}" if effective else ""
        long = pd.read_sql_query(
            f"SELECT attempt, step, key, value FROM scalars {where}", self._conn
        )
        if long.empty:
            return pd.DataFrame(columns=["attempt", "step"])
        long["value"] = long["value"].astype("float64")  # NULL (NaN in SQLite) -> NaN
        wide = long.pivot(index=["attempt", "step"], columns="key", values="value")
        wide.columns.name = None
        return wide.reset_index().sort_values(["step", "attempt"], ignore_index=True)

    @_reading
    def layer_stats(self, effective: bool = True, stats: Iterable[str] | None = None) -> pd.DataFrame:
        """Per-layer statistics in long form: attempt, step, layer, stat, value."""
        clauses = [self._effective_clause("layer_stats")] if effective else []
        params: list[str] = []
        if stats is not None:
            stats = list(stats)
            clauses.append(f"stat IN ({','.join('?' * len(stats))})")
            params.extend(stats)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        df = pd.read_sql_query(
            f"SELECT attempt, step, layer, stat, value FROM layer_stats {where} ORDER BY step, attempt",
            self._conn,
            params=params,
        )
        df["value"] = df["value"].astype("float64")
        return df

    @_reading
    def events(self, after_id: int = 0) -> pd.DataFrame:
        """The events (id, time, attempt, step, kind, message, data) with an id above `after_id`."""
        return self._events("WHERE id > ?", (after_id,))

    def _events(self, where: str = "", params: tuple = ()) -> pd.DataFrame:
        df = pd.read_sql_query(
            f"SELECT id, time, attempt, step, kind, message, data FROM events {where} ORDER BY id",
            self._conn, params=params,
        )
        df["data"] = df["data"].map(json.loads)
        return df

    @contextlib.contextmanager
    def snapshot(self):
        """Read several tables as of one moment: a writer's flush is either in all or in none."""
        if self._conn.in_transaction:
            yield
            return
        self._conn.execute("BEGIN")  # a WAL read transaction: one consistent snapshot
        try:
            yield
        finally:
            if self._conn.in_transaction:  # SQLite ends it by itself on some errors (a corrupt page)
                self._conn.execute("COMMIT")

    @_reading
    def records(self, effective: bool = True, after_step: int = -1) -> Iterator[StepRecord]:
        """The stored steps as `StepRecord`s in step order: what the detector replays offline."""
        with self.snapshot():
            return iter(self._records(effective, after_step))

    def _records(self, effective: bool, after_step: int) -> list[StepRecord]:
        where_s = f"scalars.step > ? AND {self._effective_clause('scalars')}" if effective else "scalars.step > ?"
        where_l = (f"step > ? AND {self._effective_clause('layer_stats')}" if effective
                   else "step > ?")
        by_key: dict[tuple[int, int], StepRecord] = {}
        for attempt, step, key, value in self._conn.execute(
            f"SELECT attempt, step, key, value FROM scalars WHERE {where_s}", (after_step,)
        ):
            rec = by_key.setdefault((step, attempt), StepRecord(step=step, attempt=attempt))
            rec.scalars[key] = _py_value(value)
        for attempt, step, layer, stat, value in self._conn.execute(
            f"SELECT attempt, step, layer, stat, value FROM layer_stats WHERE {where_l}",
            (after_step,),
        ):
            rec = by_key.setdefault((step, attempt), StepRecord(step=step, attempt=attempt))
            rec.layers[(layer, stat)] = _py_value(value)
        return [by_key[key] for key in sorted(by_key)]

    @_reading
    def last_step(self) -> int | None:
        (step,) = self._conn.execute("SELECT MAX(step) FROM scalars").fetchone()
        return step


@dataclass
class Cursor:
    """How far an incremental reader got (`Store.news`): per attempt the last step read of the
    scalars and of the per-layer rows, and the last event id."""

    scalars: dict[int, int] = field(default_factory=dict)
    layers: dict[int, int] = field(default_factory=dict)
    event: int = 0


@dataclass
class News:
    """What `Store.news` found: new rows, and the attempts and meta as they are now."""

    attempts: pd.DataFrame
    meta: dict[str, Any]
    scalars: list[pd.DataFrame]  # wide (attempt, step, key...), one frame per attempt with rows
    layers: list[pd.DataFrame]  # long (attempt, step, layer, stat, value)
    events: pd.DataFrame


@dataclass
class Run:
    """A stored run as pandas DataFrames (see `load`)."""

    run_dir: Path
    scalars: pd.DataFrame
    layers: pd.DataFrame
    events: pd.DataFrame
    attempts: pd.DataFrame
    meta: dict[str, Any]


def load(run_dir: str | os.PathLike, effective: bool = True) -> Run:
    """Read a run directory's metrics into pandas.

    Args:
        run_dir: the run directory (holds ``thermo.db``).
        effective: keep only the effective timeline (rows later rolled back are dropped); False
            keeps every attempt's rows.

    Returns:
        `Run` with ``scalars`` (wide: attempt, step, loss, grad_norm, ...), ``layers`` (long:
        attempt, step, layer, stat, value), ``events``, ``attempts`` and ``meta``.

    Example:
        >>> run = thermo.load("runs/exp1")
        >>> run.scalars.plot(x="step", y="loss")
    """
    with Store(run_dir, readonly=True) as store, store.snapshot():
        return Run(
            run_dir=Path(run_dir),
            scalars=store.scalars(effective),
            layers=store.layer_stats(effective),
            events=store.events(),
            attempts=store.attempts(),
            meta=store.meta(),
        )
