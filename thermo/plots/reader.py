"""Reading a run directory for display: `RunReader` (incremental, read-only, never blocks the
trainer) and `read_run` (the whole run once). The dashboard, the report and the W&B sink read
through these, none of them needs Dash for it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pandas as pd

from thermo.store import DB_NAME, Run, Store, StoreError, readonly_uri

# A refresh never waits long on a busy file: better one stale frame than a stuck page.
_READ_TIMEOUT_S = 1.0


class RunReader:
    """Reads a run directory's store for display, incrementally and read-only.

    Every `poll` opens one short read transaction and fetches, per attempt, the scalar and
    per-layer rows past the last step already seen, the events past the last id, the attempts and
    the meta. `run` gives everything read so far as a `thermo.store.Run` with every attempt's rows
    (rolled-back ones included), which is what the `thermo.plots` builders take.

    Args:
        run_dir: the run directory; ``thermo.db`` may not exist yet (`poll` returns False until
            the first flush creates it).

    Example:
        >>> reader = RunReader("runs/exp1")
        >>> if reader.poll():
        ...     fig = thermo.plots.loss_figure(reader.run())
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.version = 0  # bumped whenever a poll found something new
        self.error: str | None = None  # why the store cannot be read (yet)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._seen_scalars: dict[int, int] = {}  # attempt -> last step read
        self._seen_layers: dict[int, int] = {}
        self._last_event = 0
        self._scalars: list[pd.DataFrame] = []
        self._layers: list[pd.DataFrame] = []
        self._events: list[pd.DataFrame] = []
        self._attempts = pd.DataFrame(columns=["attempt", "start_step", "time", "reason", "end_step"])
        self._meta: dict[str, Any] = {}
        self._run: Run | None = None

    def _connect(self) -> bool:
        path = self.run_dir / DB_NAME
        if not path.is_file():
            return False
        try:
            # Store's own checks: a foreign or newer file gets its clear error. A store being
            # created fails them for a moment too (tables not there yet), so keep trying.
            Store(self.run_dir, readonly=True).close()
        except StoreError as e:
            self.error = str(e)
            return False
        self.error = None
        conn = sqlite3.connect(readonly_uri(path), uri=True, timeout=_READ_TIMEOUT_S,
                               isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only = 1")
        self._conn = conn
        return True

    def poll(self) -> bool:
        """Read what the run wrote since the last poll. Returns True if anything was new."""
        with self._lock:
            if self._conn is None and not self._connect():
                return False
            try:
                changed = self._read_new()
            except (sqlite3.OperationalError, pd.errors.DatabaseError) as e:
                # Busy for longer than the timeout: keep the last frame, retry, and say why.
                self.error = f"the store could not be read this time ({e}); retrying"
                return False
            self.error = None
            if changed:
                self.version += 1
                self._run = None
            return changed

    def _read_new(self) -> bool:
        conn = self._conn
        conn.execute("BEGIN")  # one snapshot: scalars, layers and events agree with each other
        try:
            attempts = pd.read_sql_query(
                "SELECT attempt, start_step, time, reason FROM attempts ORDER BY attempt", conn)
            meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            new = False
            for a in attempts["attempt"].tolist():
                s = self._tail(
                    "SELECT attempt, step, key, value FROM scalars WHERE attempt = ? AND step > ?",
                    a, self._seen_scalars)
                if s is not None:
                    wide = s.pivot(index=["attempt", "step"], columns="key", values="value")
                    wide.columns.name = None
                    self._scalars.append(wide.reset_index())
                    new = True
                lay = self._tail(
                    "SELECT l.attempt AS attempt, l.step AS step, s.layer AS layer, s.stat AS stat, "
                    "l.value AS value FROM layers l JOIN series s ON s.id = l.series "
                    "WHERE l.attempt = ? AND l.step > ?", a, self._seen_layers)
                if lay is not None:
                    self._layers.append(lay)
                    new = True
            ev = pd.read_sql_query(
                "SELECT id, time, attempt, step, kind, message, data FROM events WHERE id > ? "
                "ORDER BY id", conn, params=(self._last_event,))
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        if len(ev):
            ev["data"] = ev["data"].map(json.loads)
            self._events.append(ev)
            self._last_event = int(ev["id"].max())
            new = True
        # end_step(a) = min(start_step of every later attempt), as Store.attempts computes it.
        attempts["end_step"] = (
            attempts["start_step"][::-1].cummin()[::-1].shift(-1).fillna(2**62).astype("int64"))
        if len(attempts) != len(self._attempts) or meta != self._meta:
            new = True
        self._attempts, self._meta = attempts, meta
        return new

    def _tail(self, sql: str, attempt: int, seen: dict[int, int]) -> pd.DataFrame | None:
        df = pd.read_sql_query(sql, self._conn, params=(attempt, seen.get(attempt, -(2**62))))
        if df.empty:
            return None
        df["value"] = df["value"].astype("float64")  # NULL is how SQLite keeps a NaN
        seen[attempt] = int(df["step"].max())
        return df

    def run(self) -> Run:
        """Everything read so far, every attempt's rows (use `thermo.plots.effective_mask` for
        the effective timeline)."""
        with self._lock:
            if self._run is None:
                self._run = Run(
                    run_dir=self.run_dir,
                    scalars=_concat(self._scalars, ["attempt", "step"]),
                    layers=_concat(self._layers, ["attempt", "step", "layer", "stat", "value"]),
                    events=_concat(self._events, ["id", "time", "attempt", "step", "kind",
                                                  "message", "data"]),
                    attempts=self._attempts.copy(),
                    meta=dict(self._meta),
                )
                # Keep one chunk each, so the next concat costs only the new rows' copy.
                self._scalars = [self._run.scalars] if len(self._run.scalars) else []
                self._layers = [self._run.layers] if len(self._run.layers) else []
                self._events = [self._run.events] if len(self._run.events) else []
            return self._run

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _concat(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame(columns=columns)
    df = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    if "step" in df.columns and "layer" not in df.columns and "kind" not in df.columns:
        df = df.sort_values(["step", "attempt"], ignore_index=True)
    return df


def read_run(run_dir: str | os.PathLike) -> Run:
    """The whole run, every attempt's rows, read once (what the report draws).

    Raises:
        StoreError: when the run directory has no metrics store.
    """
    reader = RunReader(run_dir)
    try:
        if not reader.poll() and reader._conn is None:
            raise StoreError(reader.error or (
                f"no metrics store at {Path(run_dir) / DB_NAME}: is {run_dir} a thermo run "
                "directory? A run writes it once the first steps are flushed."))
        return reader.run()
    finally:
        reader.close()
