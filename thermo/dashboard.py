"""The live dashboard: a Dash app on 127.0.0.1 that redraws a run's panels while it trains.

It only reads the run directory: one read-only SQLite connection (WAL, so the trainer is never
blocked), short read transactions, and an incremental `RunReader` that asks only for rows newer
than the last it saw (per attempt), so a refresh costs what the run wrote since the last one.
Panels come from `thermo.plots` (the same figures as the report); which panels, in which order,
comes from a layout file (``dashboards/*.json``, see `thermo.plots.load_layout`).

Example:
    $ thermo dashboard runs/exp1 --port 8050 --layout dashboards/attention.json
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from thermo import plots
from thermo.store import DB_NAME, Run, Store, StoreError

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
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_READ_TIMEOUT_S,
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


def _require_dash():
    try:
        import dash
    except ImportError:
        raise ImportError(
            "the live dashboard needs Dash: pip install 'thermo[dashboard]'") from None
    return dash


def create_app(run_dir: str | os.PathLike, layout: dict | str | os.PathLike | None = None):
    """The Dash app for one run directory (serve it with `serve`, or ``app.run(...)``).

    The page shows a status line (last step, its loss and grad norm, attempt, events) and one
    graph per layout panel. Every ``refresh_s`` seconds it polls the store; figures are rebuilt
    and sent only when something new was written, and zoom and scale survive a refresh.

    Args:
        run_dir: the run directory (it may not hold ``thermo.db`` yet).
        layout: a layout dict, a layout file path, or None for `thermo.plots.DEFAULT_LAYOUT`.

    Returns:
        ``dash.Dash``.

    Example:
        >>> app = create_app("runs/exp1", "dashboards/attention.json")
        >>> app.run(host="127.0.0.1", port=8050)
    """
    dash = _require_dash()
    from dash import Input, Output, State, dcc, html

    if isinstance(layout, dict):
        layout = plots.check_layout(layout)
    else:
        layout = plots.load_layout(layout)
    reader = RunReader(run_dir)
    panels = layout["panels"]
    app = dash.Dash(__name__, title=f"{layout['title']}: {Path(run_dir).name}",
                    update_title=None, serve_locally=True)
    status_ids = ["last-step", "loss", "grad-norm", "attempt", "events", "updated"]
    app.layout = html.Div(style={"fontFamily": "sans-serif", "margin": "0 16px"}, children=[
        html.H2(f"{layout['title']} · {run_dir}", style={"marginBottom": "4px"}),
        html.Div(id="thermo-status", style={"fontSize": "15px", "marginBottom": "8px"}, children=[
            html.Span([f"{label} ", html.B("–", id=f"thermo-{key}")], style={"marginRight": "18px"})
            for key, label in zip(status_ids, ["step", "loss", "grad norm", "attempt", "events",
                                               "updated"])
        ]),
        *[html.Section(id=f"panel-{i}-{p['type']}", className="thermo-panel", children=[
            dcc.Graph(id=f"graph-{i}", config={"displaylogo": False},
                      figure=_placeholder(plots.panel_title(p)))])
          for i, p in enumerate(panels)],
        dcc.Interval(id="thermo-tick", interval=int(layout["refresh_s"] * 1000)),
        dcc.Store(id="thermo-version", data=-1),
    ])

    @app.callback(
        [Output(f"graph-{i}", "figure") for i in range(len(panels))]
        + [Output(f"thermo-{k}", "children") for k in status_ids]
        + [Output("thermo-version", "data")],
        Input("thermo-tick", "n_intervals"),
        State("thermo-version", "data"),
    )
    def refresh(_n, shown_version):
        reader.poll()
        now = time.strftime("%H:%M:%S")
        keep = [dash.no_update] * len(panels)
        if reader._conn is None:
            waiting = f"{now} (waiting: {reader.error or f'no {Path(run_dir) / DB_NAME} yet'})"
            return keep + [dash.no_update] * (len(status_ids) - 1) + [waiting, dash.no_update]
        if reader.version == shown_version:
            return keep + [dash.no_update] * (len(status_ids) - 1) + [now, dash.no_update]
        run = reader.run()
        figs = []
        for i, p in enumerate(panels):
            fig = plots.build_panel(run, p)
            fig.update_layout(uirevision=f"panel-{i}")  # keep zoom/scale across refreshes
            figs.append(fig)
        s = plots.run_summary(run)
        status = [plots.fmt(s["last_step"]), plots.fmt(s["loss"]), plots.fmt(s["grad_norm"]),
                  str(s["attempt"]), str(s["events"]), now]
        return figs + status + [reader.version]

    app.thermo_reader = reader  # for tests and embedding: the app's reader
    return app


def _placeholder(title: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=f"{title} (loading)", height=220)
    return fig


def serve(
    run_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8050,
    layout: dict | str | os.PathLike | None = None,
) -> None:
    """Serve the live dashboard of `run_dir` until interrupted (see `create_app`).

    Args:
        run_dir: the run directory.
        host: interface to listen on; the default keeps it on this machine (open it remotely
            through an SSH tunnel rather than binding 0.0.0.0).
        port: TCP port.
        layout: a layout dict, file path, or None for the default.

    Example:
        >>> serve("runs/exp1", port=8050)
    """
    import logging

    app = create_app(run_dir, layout)
    # One access-log line per refresh of every open page would bury the useful output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app.run(host=host, port=port, debug=False)
