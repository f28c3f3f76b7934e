"""The headline of a run, in words: is it training, finished or given up; what diverged, where and
since when; and what thermo did about it. Read from the events table only, so the dashboard, the
report and ``thermo inspect`` tell the same story.

Every verdict opens an *incident*; the rollback, blacklist, restart and give-up events that follow
it (until the next verdict) are what thermo did about it. Two verdicts for the same divergence
(the Guard's and the supervisor's) are one incident.
"""

from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from thermo.plots.shared import _data, _int_or_none
from thermo.store import Run

# With no end marker in the events, a run that wrote nothing for this long is not called training.
STALE_S = 300.0

# status -> exit code of `thermo inspect` (documented in its help and the README).
EXIT_CODES = {"finished": 0, "training": 0, "idle": 0, "empty": 0, "gave up": 1, "stopped": 3}


@dataclass
class Incident:
    """One verdict and what thermo did about it."""

    step: int | None  # detection step
    onset: int | None
    kind: str  # nonfinite, overflow, spike, growth
    signal: str | None
    layer: str | None
    cause: str | None  # from the verdict's ``cause`` field when the remedy recorded one
    message: str
    actions: list[str] = field(default_factory=list)

    @property
    def what(self) -> str:
        """``growth of act_max in h.1`` — the verdict in a few words."""
        out = self.kind
        if self.signal:
            out += f" of {self.signal}"
        if self.layer:
            out += f" in {self.layer}"
        return out

    @property
    def line(self) -> str:
        """The whole incident as one line, e.g. ``step 30: growth of act_max in h.1 (onset
        25, cause: data) → rolled back to step 20; blacklisted 80 samples``."""
        where = f"step {self.step}: " if self.step is not None else ""
        extra = []
        if self.onset is not None and self.onset != self.step:
            extra.append(f"onset {self.onset}")
        if self.cause:
            extra.append(f"cause: {self.cause}")
        text = where + self.what + (f" ({', '.join(extra)})" if extra else "")
        return text + " → " + ("; ".join(self.actions) if self.actions else "no action recorded")


@dataclass
class Story:
    """What the headline says (see `run_story`)."""

    status: str  # training, finished, gave up, stopped, idle, empty
    status_line: str  # the status in words, e.g. "gave up at step 70: 3 rollbacks (max 2)"
    incidents: list[Incident]
    other: list[str]  # actions with no verdict before them: "2 restarts (crash)", "3 steps skipped"
    last_step: int | None
    attempts: int

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.status, 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for inc, src in zip(d["incidents"], self.incidents):
            inc["what"], inc["line"] = src.what, src.line
        d["exit_code"] = self.exit_code
        return d


def _cause(d: dict) -> str | None:
    c = d.get("cause")
    if c is None or c == "":
        return None
    if isinstance(c, dict):
        name = c.get("kind") or c.get("name") or c.get("cause")
        detail = c.get("detail") or c.get("reason") or c.get("message")
        return " — ".join(str(x) for x in (name, detail) if x) or None
    return str(c)


def _action(kind: str, d: dict, message: str, step: int | None) -> str | None:
    """What thermo did, in words, for one event; None for events that are not actions."""
    if kind == "rollback":
        to = d.get("to_step")
        verb = "stopped to resume from checkpoint" if d.get("action") == "stop" else "rolled back to step"
        n = d.get("n_blacklisted", len(d.get("blacklisted") or []))
        out = f"{verb} {to}"
        suspects = d.get("suspects")
        if d.get("cause") is not None and suspects is not None and suspects != n:
            out += f"; blacklisted {n} of {suspects} suspect samples"  # the replay's verdict
        elif n:
            out += f"; blacklisted {n} samples"
        if d.get("lr_scale") not in (None, 1, 1.0):
            out += f"; lr × {d['lr_scale']:g}"
        return out
    if kind == "blacklist":
        added = d.get("added") or []
        n = len(added) if isinstance(added, (list, tuple)) else added
        return f"blacklisted {n} samples" if n else None
    if kind == "give_up":
        return f"gave up: {d.get('reason') or message}"
    if kind == "restart":
        why = d.get("reason") or "restart"
        return f"restarted ({why})" + (f" from checkpoint {d['checkpoint']}" if d.get("checkpoint") is not None else "")
    if kind == "skip_step":
        return f"skipped step {step}" + (f" ({d['reason']})" if d.get("reason") else "")
    return None


def _status(run: Run, now: float) -> tuple[str, str]:
    ev = run.events
    sc = run.scalars
    last_step = None
    if not sc.empty:
        last_step = int(sc["step"].max()) if run.attempts.empty else int(_effective_last(run))
    last_attempt_time = float(run.attempts["time"].max()) if len(run.attempts) else 0.0
    # The latest ending event, if nothing resumed the run after it.
    for _, e in ev.iloc[::-1].iterrows():
        kind, d = e["kind"], _data(e)
        if kind == "restart" or (kind == "supervise" and not d.get("status")):
            break  # the run went on after anything older
        if float(e["time"]) < last_attempt_time - 1e-6:
            break
        step = _int_or_none(e.get("step"))
        at = f" at step {step}" if step is not None else ""
        if kind == "give_up":
            return "gave up", f"gave up{at}: {d.get('reason') or e['message']}"
        if kind == "supervise" and d.get("status") == "finished":
            return "finished", f"finished{at}"
        if kind == "supervise" and d.get("status") in ("stopped", "gave_up"):
            status = "gave up" if d["status"] == "gave_up" else "stopped"
            return status, f"{status}{at}: {e['message']}"
        if kind == "stop":
            return "stopped", f"stopped{at} ({d.get('reason') or e['message']})"
        if kind in ("finish", "finished", "end"):
            return "finished", f"finished{at}"
    if last_step is None:
        return "empty", "no steps recorded yet"
    # The recording closed cleanly (the loop ended, not an exception) and nothing started after.
    closed = run.meta.get("closed") if isinstance(run.meta, dict) else None
    if isinstance(closed, dict) and float(closed.get("time", 0.0)) >= last_attempt_time - 1e-6:
        return "finished", f"finished at step {last_step}"
    last_time = _last_write_time(run)
    if last_time is None or now - last_time <= STALE_S:
        return "training", f"training, at step {last_step}"
    ago = now - last_time
    when = f"{ago / 60:.0f} min" if ago < 3600 * 2 else f"{ago / 3600:.1f} h"
    return "idle", f"no new step for {when} (last step {last_step}): finished or stopped"


def _effective_last(run: Run) -> int:
    from thermo.plots.shared import effective_mask

    sc = run.scalars
    return int(sc.loc[effective_mask(sc, run.attempts), "step"].max())


def _last_write_time(run: Run) -> float | None:
    times = []
    if "wall_time" in run.scalars.columns and len(run.scalars):
        w = run.scalars["wall_time"].to_numpy(dtype="float64")
        w = w[pd.notna(w)]
        if len(w):
            times.append(float(w.max()))
    if len(run.events):
        times.append(float(run.events["time"].max()))
    if len(run.attempts):
        times.append(float(run.attempts["time"].max()))
    return max(times) if times else None


def run_story(run: Run, now: float | None = None) -> Story:
    """The run's headline: status, each verdict with what thermo did, other actions.

    Args:
        run: a `thermo.store.Run` (events and attempts are what matter).
        now: the clock to judge "still training" by (default: now).

    Returns:
        `Story`; ``story.incidents[i].line`` is one verdict in words.

    Example:
        >>> story = run_story(read_run("runs/exp1"))
        >>> print(story.status_line); [print(i.line) for i in story.incidents]
    """
    now = time.time() if now is None else now
    status, status_line = _status(run, now)
    incidents: list[Incident] = []
    seen: dict[tuple, Incident] = {}
    other: dict[str, int] = {}
    current: Incident | None = None
    for _, e in run.events.iterrows():
        kind, d, step = e["kind"], _data(e), _int_or_none(e.get("step"))
        if kind == "verdict":
            det = _first_int(d.get("detection_step"), step)
            key = (d.get("kind"), d.get("signal"), d.get("layer"), _int_or_none(d.get("onset_step")), det)
            if key in seen:  # the same divergence seen twice (Guard and supervisor)
                current = seen[key]
                cause = _cause(d)
                current.cause = current.cause or cause
                continue
            current = Incident(step=det, onset=_int_or_none(d.get("onset_step")),
                               kind=str(d.get("kind") or "divergence"), signal=d.get("signal"),
                               layer=d.get("layer"), cause=_cause(d), message=str(e["message"]))
            seen[key] = current
            incidents.append(current)
            continue
        action = _action(kind, d, str(e["message"]), step)
        if action is None:
            continue
        if current is not None and kind == "rollback" and not current.cause:
            # The replay (thermo.guard.replay) records its finding on the rollback.
            replay = d.get("replay") if isinstance(d.get("replay"), dict) else {}
            cause = _cause({"cause": d.get("cause")})
            if cause and replay.get("summary"):
                cause += f" — {replay['summary']}"
            current.cause = cause
        if current is not None and kind in ("rollback", "blacklist", "give_up"):
            if kind == "blacklist" and any("blacklisted" in a for a in current.actions):
                continue  # the rollback already said how many samples it skipped
            if action not in current.actions:
                current.actions.append(action)
            if kind == "give_up":
                current = None
        else:
            label = {"restart": f"restart ({d.get('reason') or 'restart'})",
                     "skip_step": f"step skipped ({d.get('reason') or 'skip'})"}.get(kind, action)
            other[label] = other.get(label, 0) + 1
            if kind == "restart":
                current = None  # a restart's own repairs are not the previous verdict's
    others = [f"{n} × {label}" if n > 1 else label for label, n in other.items()]
    last = None
    if not run.scalars.empty:
        last = _effective_last(run)
    return Story(status=status, status_line=status_line, incidents=incidents, other=others,
                 last_step=last, attempts=len(run.attempts) or 1)


def _first_int(*values) -> int | None:
    for v in values:
        i = _int_or_none(v)
        if i is not None:
            return i
    return None



STATUS_COLORS = {"training": "#2ca02c", "finished": "#1f77b4", "gave up": "#d62728",
                 "stopped": "#7f7f7f", "idle": "#7f7f7f", "empty": "#7f7f7f"}


def headline_html(story: Story) -> str:
    """The headline as HTML (the report's; the dashboard builds the same elements in Dash):
    ``#thermo-run-status`` holds the status, ``#thermo-incidents`` one ``li`` per verdict."""
    color = STATUS_COLORS.get(story.status, "#7f7f7f")
    items = "".join(f'<li class="incident">{html.escape(i.line)}</li>' for i in story.incidents)
    items += "".join(f'<li class="other">{html.escape(o)}</li>' for o in story.other)
    verdicts = (f"{len(story.incidents)} verdict{'s' * (len(story.incidents) != 1)}"
                if story.incidents else "no verdicts")
    return (
        f'<div id="thermo-headline" class="headline">'
        f'<span id="thermo-run-status" class="status" style="background:{color}">'
        f"{html.escape(story.status)}</span> "
        f'<span id="thermo-status-line">{html.escape(story.status_line)}</span>'
        f' <span class="verdict-count">· {verdicts}</span>'
        f'<ul id="thermo-incidents">{items}</ul></div>'
    )
