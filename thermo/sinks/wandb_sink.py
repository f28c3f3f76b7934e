"""`WandbSink`: thermo's records in Weights & Biases, within a key budget, never stalling training.

A sink's `write` is called in the training process at each flush (rank 0 only), so it must cost
microseconds whatever the far side does. `WandbSink.write` only puts the records on a bounded
queue; a background thread owns everything W&B (``wandb.init`` included, which can wait a
minute and a half on an unreachable server). When the queue is full, or W&B failed, records are
dropped and counted, never waited for.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thermo.sinks.budget import KeyBudget, StepAxis, events_after
from thermo.rundir import RunDir
from thermo.store import StepRecord

# Events worth a W&B alert (email/Slack when the user configured it); the rest only get logged.
_ALERT_KINDS = {"verdict": "WARN", "rollback": "WARN", "restart": "WARN", "give_up": "ERROR"}
# Seconds between looks at the store's events table (cheap, but no need to do it every flush).
_EVENT_POLL_S = 1.0


def _require_wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError("WandbSink needs Weights & Biases: pip install 'thermo[wandb]'") from None
    return wandb


class WandbSink:
    """Log thermo's records to Weights & Biases without ever stalling training.

    Plug it into a `thermo.Thermometer` (``sinks=[WandbSink(...)]``). Nothing happens until the
    first flush reaches it, so building it on every rank is harmless: only rank 0's thermometer
    writes to sinks, and only that rank opens a W&B run. Works with ``WANDB_MODE=offline``.

    Each step logs a budget of keys (`thermo.sinks.KeyBudget`: every scalar, per-block
    aggregates, the hottest layers; at most 100 keys), and the full per-layer table goes to
    ``thermo/layers`` at a flush at most every `table_every_s` seconds. Every thermo chart is
    plotted against ``thermo/step`` (`define_metric`), never W&B's own ``_step``.

    Sharing a run. With a run of yours (`run`, or one already open in the process, e.g. Hugging
    Face's ``report_to="wandb"``), thermo never creates rows of its own: each flush's latest
    values join your next row (``commit=False``), so your ``log(..., step=N)`` rows are never
    refused as "less than the current step", and thermo never finishes your run. A run thermo
    opens itself gets a row per step.

    Args:
        run: an already initialised W&B run to log into; None (default) uses the run already
            open in this process (``wandb.run``) if there is one, else makes one with
            ``wandb.init(**init_kwargs)`` in the background thread.
        run_dir: the run directory. When given, the sink also forwards the store's events
            (verdicts, rollbacks, restarts...) as W&B alerts and markers, and at close logs the
            report's panels (heatmaps, attention lines) as interactive W&B plotly charts.
        budget: the key budget (default `KeyBudget()`); ``KeyBudget(full=True)`` logs every
            per-layer value every step (small models only).
        stats: per-layer statistics to log (default: all recorded); shorthand for
            ``KeyBudget(stats=...)``.
        own_steps: thermo logs its own rows (one per step). Default: only in a run it opened.
        table_every_s: seconds between full per-layer tables (0: every flush).
        max_queue: flushes held while W&B is slow; past that, records are dropped and counted.
        close_timeout: seconds `close` waits for the queue to drain and the run to finish.
        figures: log the panels at close (needs `run_dir`).
        init_kwargs: passed to ``wandb.init`` (project, name, dir, config, mode, settings...).

    Logged keys:

    ===========================  ==========================================================
    ``thermo/step``              x axis of every thermo chart: the training step plus the
                                 steps rolled back so far, so it never goes back
    ``thermo/train_step``        the training step (repeats after a rollback)
    ``thermo/attempt``           the attempt (0, then +1 at each rollback or restart)
    ``thermo/<key>``             every scalar: ``thermo/loss``, ``thermo/grad_norm``...
    ``block_<stat>/<block>``     per-block extreme of `KeyBudget.block_stats`:
                                 ``block_act_max/h.3``, ``block_attn_max/h.3``
    ``<stat>/<layer>``           the hottest layers of each statistic that step:
                                 ``act_max/h.17.mlp.c_fc``, ``attn_max/h.3.attn``...
    ``thermo/layers``            table (step, layer, stat, value): every layer, at flushes
    ``thermo/event/<kind>``      1 at the step of each event (verdict, rollback, ...)
    ``thermo/events``            table of all events (at close)
    ``thermo/panel/<name>``      the report's plotly panels (at close, with `run_dir`)
    ``thermo/dropped_steps``     summary: steps not logged (queue full or W&B failing)
    ===========================  ==========================================================

    Example:
        >>> sink = WandbSink(project="gpt", name="exp1", run_dir="runs/exp1")
        >>> therm = thermo.Thermometer(model, run_dir="runs/exp1", sinks=[sink])
        >>> ...
        >>> therm.close()          # closes the sink too
        >>> sink.dropped           # steps W&B never got
    """

    def __init__(
        self,
        run: Any = None,
        *,
        run_dir: str | os.PathLike | None = None,
        budget: KeyBudget | None = None,
        stats: Sequence[str] | None = None,
        own_steps: bool | None = None,
        table_every_s: float = 60.0,
        max_queue: int = 64,
        close_timeout: float = 30.0,
        figures: bool = True,
        **init_kwargs: Any,
    ):
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"WandbSink max_queue must be an int >= 1, got {max_queue!r}")
        if close_timeout < 0:
            raise ValueError(f"WandbSink close_timeout must be >= 0 seconds, got {close_timeout!r}")
        if table_every_s < 0:
            raise ValueError(f"WandbSink table_every_s must be >= 0 seconds, got {table_every_s!r}")
        self._wandb = _require_wandb()  # fail at construction, not in the background thread
        self._run = run
        self._own_run = run is None  # settled in the worker: a run already open is not ours
        self._own_steps = own_steps
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if budget is None:
            budget = KeyBudget(stats=tuple(stats) if stats is not None else None)
        elif stats is not None:
            raise ValueError("WandbSink: give stats= or budget=, not both (KeyBudget has a stats field)")
        self.budget = budget
        self.table_every_s = table_every_s
        self._next_table = 0.0
        self._axis = StepAxis()
        self.close_timeout = close_timeout
        self.figures = figures
        self._init_kwargs = init_kwargs
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._stop = threading.Event()
        self._failed = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._warned = False
        # Two counters, one per thread that writes it, so neither needs a lock.
        self._dropped_here = 0  # training thread: queue full, or W&B already failed
        self._dropped_worker = 0  # worker: a log call raised, or W&B failed with rows queued
        self.logged = 0  # steps handed to W&B
        self.error: str | None = None  # why W&B failed, if it did
        self._defined: set[str] = set()
        self._last_event_id = 0
        self._events: list[list[Any]] = []
        self._last_step: int | None = None

    @property
    def dropped(self) -> int:
        """Steps that were not logged: queue full (W&B slow), or W&B unreachable/failing."""
        return self._dropped_here + self._dropped_worker

    # -- training-thread side ----------------------------------------------------------------

    def write(self, records: Sequence[StepRecord]) -> None:
        """Queue one flush's records; never blocks (drops and counts when the queue is full)."""
        if self._closed or not records:
            return
        if self._thread is None:
            self._start()
        if self._failed.is_set():
            self._drop(len(records))
            return
        try:
            self._queue.put_nowait(("records", list(records)))
        except queue.Full:
            self._drop(len(records))

    def event(self, kind: str, message: str, step: int | None = None, **data: Any) -> None:
        """Send one event (verdict, rollback...) straight to W&B, without going through a store.
        Never blocks; dropped when the queue is full."""
        if self._closed:
            return
        if self._thread is None:
            self._start()
        try:
            self._queue.put_nowait(("event", {"kind": kind, "message": message, "step": step,
                                              "data": data, "id": None}))
        except queue.Full:
            pass

    def _drop(self, n: int) -> None:
        self._dropped_here += n
        if not self._warned:
            self._warned = True
            why = f"W&B failed ({self.error})" if self.error else "W&B is not keeping up"
            warnings.warn(f"WandbSink: {why}; dropping records (training continues). "
                          "The count is in WandbSink.dropped.", stacklevel=3)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="thermo-wandb", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Log what is queued, finish the run (if the sink made it) and stop the thread; waits
        at most `timeout` seconds (default `close_timeout`), then leaves W&B behind. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(self.close_timeout if timeout is None else timeout)
        if self._thread.is_alive():
            warnings.warn(
                f"WandbSink: W&B still busy after {self.close_timeout if timeout is None else timeout}"
                f" s at close; {self._queue.qsize()} queued flushes are abandoned "
                f"(steps dropped so far: {self.dropped})", stacklevel=2)

    # -- worker thread -------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            if self._run is None and getattr(self._wandb, "run", None) is not None:
                self._run, self._own_run = self._wandb.run, False  # HF report_to="wandb"...
            if self._run is None:
                self._run = self._wandb.init(**self._init_kwargs)
            if self._own_steps is None:
                self._own_steps = self._own_run
            self._run.define_metric("thermo/step")
            self._run.define_metric("thermo/*", step_metric="thermo/step")
        except Exception as e:  # unreachable server, bad key, init timeout...
            self.error = f"{type(e).__name__}: {e}".splitlines()[0]
            self._failed.set()
            self._drain_dropping()
            return
        next_poll = 0.0
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                item = None
            if item is not None:
                self._handle(item)
            if self.run_dir is not None and time.monotonic() >= next_poll:
                self._poll_events()
                next_poll = time.monotonic() + _EVENT_POLL_S
            if item is None and self._stop.is_set():
                break
        self._finish()

    def _drain_dropping(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                kind, payload = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "records":
                self._dropped_worker += len(payload)

    def _handle(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        if kind == "event":
            self._log_event(payload)
            return
        rows = [self._row(rec) for rec in payload]
        if time.monotonic() >= self._next_table and payload:
            self._next_table = time.monotonic() + self.table_every_s
            rows[-1]["thermo/layers"] = self._wandb.Table(
                columns=["step", "layer", "stat", "value"], data=self.budget.table(payload[-1]))
        if not self._own_steps:
            # Someone else's run: never a row of our own (it would push W&B's step past theirs
            # and their next log(step=N) would be refused). The flush's latest values join
            # their next row.
            merged: dict[str, Any] = {}
            for row in rows:
                merged.update(row)
            rows = [merged]
        for i, row in enumerate(rows):
            try:
                self._log(row)
                self.logged += len(payload) if not self._own_steps else 1
            except Exception as e:  # the run died under us: count the rest, keep training
                self.error = f"{type(e).__name__}: {e}".splitlines()[0]
                self._dropped_worker += len(payload) - (i if self._own_steps else 0)
                return

    def _log(self, row: dict[str, Any], marker: bool = False) -> None:
        """One row: our own (own_steps), or joining the user's next row. A marker (an event, the
        tables and panels at close) in the user's row keeps the step the flush put there: one
        row has one thermo/step, and it belongs to the values."""
        if self._own_steps:
            self._run.log(row)
        else:
            if marker:
                row = {k: v for k, v in row.items() if k != "thermo/step"}
            self._run.log(row, commit=False)

    def _row(self, rec: StepRecord) -> dict[str, Any]:
        self._last_step = rec.step
        row: dict[str, Any] = {"thermo/step": self._axis(rec.step), "thermo/train_step": rec.step,
                               "thermo/attempt": rec.attempt}
        budgeted = self.budget.row(rec)
        for key in budgeted:
            section = key.split("/", 1)[0]
            if section != "thermo" and section not in self._defined:
                self._defined.add(section)
                stat = section.removeprefix("block_")
                summary = "min" if stat.endswith("_min") else "max"
                self._run.define_metric(f"{section}/*", step_metric="thermo/step", summary=summary)
        row.update(budgeted)
        return row

    def _poll_events(self) -> None:
        for e in events_after(self.run_dir, self._last_event_id):
            self._last_event_id = e["id"]
            self._log_event(e)

    def _log_event(self, e: dict[str, Any]) -> None:
        from thermo.plots import event_details

        details = event_details(e["kind"], e["data"] or {})
        self._events.append([e["step"], e["kind"], e["message"], details])
        step = e["step"] if e["step"] is not None else self._last_step
        try:
            if step is not None:
                self._log({"thermo/step": self._axis.at(step), f"thermo/event/{e['kind']}": 1}, marker=True)
            level = _ALERT_KINDS.get(e["kind"])
            if level is not None:
                where = f" at step {step}" if step is not None else ""
                self._run.alert(title=f"thermo {e['kind']}{where}",
                                text=f"{e['message']}\n{details}".strip(),
                                level=getattr(self._wandb.AlertLevel, level), wait_duration=0)
        except Exception as err:  # alerts are best effort (offline mode, rate limits)
            self.error = self.error or f"{type(err).__name__}: {err}".splitlines()[0]

    def _finish(self) -> None:
        wandb = self._wandb
        try:
            if self.run_dir is not None:
                self._poll_events()
            if self._events:
                table = wandb.Table(columns=["step", "kind", "message", "details"], data=self._events)
                self._log({"thermo/step": self._axis.at(self._last_step or 0), "thermo/events": table},
                          marker=True)
            if self.figures and self.run_dir is not None and RunDir(self.run_dir).db.is_file():
                self._log_panels()
            self._run.summary["thermo/dropped_steps"] = self.dropped
        except Exception as e:
            self.error = self.error or f"{type(e).__name__}: {e}".splitlines()[0]
        finally:
            if self._own_run:  # never finish a run thermo did not start
                self._run.finish()

    def _log_panels(self) -> None:
        from thermo import plots
        from thermo.plots.reader import read_run

        run = read_run(self.run_dir)
        panels = {"loss": {"type": "loss"}, "attention": {"type": "attention"}}
        for stat in ("act_max", "attn_max"):
            if (run.layers["stat"] == stat).any():
                panels[f"heatmap_{stat}"] = {"type": "heatmap", "stat": stat}
        row: dict[str, Any] = {"thermo/step": self._axis.at(self._last_step or 0)}
        for name, spec in panels.items():
            row[f"thermo/panel/{name}"] = self._wandb.Plotly(plots.build_panel(run, spec))
        self._log(row, marker=True)
