"""Reading a run directory for display: `RunReader` (incremental, read-only, never blocks the
trainer) and `read_run` (the whole run once). The dashboard, the report and the W&B sink read
through these, none of them needs Dash for it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pandas as pd

from thermo.store import Cursor, Run, Store, StoreError

# A refresh never waits long on a busy file: better one stale frame than a stuck page.
_READ_TIMEOUT_S = 1.0


class RunReader:
    """Reads a run directory's store for display, incrementally and read-only.

    Every `poll` asks the store for what was written since the last one (`Store.news`: per
    attempt the scalar and per-layer rows past the last step seen, the events past the last id,
    the attempts and the meta, in one short read transaction). `run` gives everything read so
    far as a `thermo.store.Run` with every attempt's rows (rolled-back ones included), which is
    what the `thermo.plots` builders take.

    Args:
        run_dir: the run directory; ``thermo.db`` may not exist yet (`poll` returns False until
            the first flush creates it, with the reason in `error`).

    Example:
        >>> reader = RunReader("runs/exp1")
        >>> if reader.poll():
        ...     fig = thermo.plots.loss_figure(reader.run())
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.version = 0  # bumped whenever a poll found something new
        self.error: str | None = None  # why the store cannot be read (yet)
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._cursor = Cursor()
        self._scalars: list[pd.DataFrame] = []
        self._layers: list[pd.DataFrame] = []
        self._events: list[pd.DataFrame] = []
        self._attempts = pd.DataFrame(columns=["attempt", "start_step", "time", "reason", "end_step"])
        self._meta: dict[str, Any] = {}
        self._run: Run | None = None

    @property
    def connected(self) -> bool:
        """Whether the store has been opened (the run has flushed its first steps)."""
        return self._store is not None

    def _connect(self) -> bool:
        try:
            # A missing, foreign or newer file gets the Store's clear error. A store being
            # created fails the checks for a moment too (tables not there yet), so keep trying.
            self._store = Store(self.run_dir, readonly=True, timeout=_READ_TIMEOUT_S, shared=True)
        except StoreError as e:
            self.error = str(e)
            return False
        self.error = None
        return True

    def poll(self) -> bool:
        """Read what the run wrote since the last poll. Returns True if anything was new; when
        the store cannot be read (not there yet, busy, damaged) returns False and says why in
        `error`, keeping what was read before."""
        with self._lock:
            if self._store is None and not self._connect():
                return False
            try:
                news = self._store.news(self._cursor)
            except StoreError as e:  # damaged: one line, the frame read so far stays
                self.error = str(e)
                return False
            except (sqlite3.OperationalError, pd.errors.DatabaseError) as e:
                # Busy for longer than the timeout: keep the last frame, retry, and say why.
                self.error = f"the store could not be read this time ({e}); retrying"
                return False
            self.error = None
            new = bool(news.scalars or news.layers or len(news.events))
            self._scalars += news.scalars
            self._layers += news.layers
            if len(news.events):
                self._events.append(news.events)
            if len(news.attempts) != len(self._attempts) or news.meta != self._meta:
                new = True
            self._attempts, self._meta = news.attempts, news.meta
            if new:
                self.version += 1
                self._run = None
            return new

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
            if self._store is not None:
                self._store.close()
                self._store = None


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
        if not reader.poll() and reader.error is not None:
            raise StoreError(reader.error)
        return reader.run()
    finally:
        reader.close()
