"""`thermo supervise`: the rollback-and-skip daemon around a training command.

The Guard repairs a run from inside the process; the supervisor covers what the process cannot
survive: a crash (a kernel fault, an OOM, a lost node), a hang (a rank stuck in a collective), or
a loop without a Guard at all. It starts the command in a process group of its own with
``THERMO_RUN_DIR`` set, streams its output, and watches three things:

============== ====================================================================================
signal         source
============== ====================================================================================
exit code      0: done. `EXIT_DIVERGED` (or a ``give_up`` event: torchrun turns every failure into
               exit 1): the Guard gave up. Anything else: a crash.
heartbeat      ``RUN/heartbeat.json`` (the Guard writes it at every step), or new rows in the
               store: no sign of life for ``hang_timeout`` seconds is a hang.
metrics store  the same `Detector` the Guard runs, fed with the store's records as they arrive
               (replayed per attempt, like `detect_run`), so a loop that only logs through a
               Thermometer is protected too.
============== ====================================================================================

Decisions, each recorded as an event in the store (``verdict``, ``blacklist``, ``restart``,
``give_up``, plus ``supervise`` when it starts and ends and ``stop`` on SIGINT/SIGTERM):

* divergence: give a Guard ``verdict_grace`` seconds to roll back in process; if it does not (or it
  gave up), terminate the process tree (SIGTERM, SIGKILL after ``grace``), mark the checkpoints
  after the rollback target bad, blacklist the sample ids of steps ``[onset - skip_before,
  detection + skip_after]`` (the store's ledger, plus the heartbeat's step in progress) and restart:
  the command resumes from the newest good checkpoint.
* crash: restart (the Guard resumes from the newest intact checkpoint). A second crash in a row at
  the same step blacklists that step's batch as poison.
* hang: terminate and restart.
* give up (exit 1) after ``max_restarts`` restarts, or after ``max_stalled`` launches in a row that
  got no further than the furthest step reached before.

Example::

    $ thermo supervise runs/a --hang-timeout 600 -- torchrun --nproc_per_node=8 -m thermo.train_gpt
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from thermo.detector import Detector, DetectorConfig, Verdict
from thermo.guard import EXIT_DIVERGED, HEARTBEAT_NAME
from thermo.store import StepRecord, Store

LOCK_NAME = ".supervise.lock"


class SupervisorError(RuntimeError):
    """A bad command, run directory or state: nothing was started or written."""


@dataclass(frozen=True)
class SupervisorConfig:
    """How the supervisor watches, judges and restarts.

    Attributes:
        max_restarts: give up after this many restarts.
        max_stalled: give up after this many launches in a row that got no further than the
            furthest step reached before (a crash loop, a divergence that always comes back).
        hang_timeout: seconds without a heartbeat or a new record before a running command is
            declared hung. Must cover the longest step plus a checkpoint save.
        startup_timeout: seconds a launch may take to its first sign of life (imports, rendezvous,
            restoring a checkpoint); 0 = no limit.
        grace: seconds between SIGTERM and SIGKILL when stopping the command.
        poll: seconds between looks at the heartbeat, the store and the process.
        detect: run the detector over the store (False: exit codes and hangs only).
        detector: the detector's configuration (defaults if None); match the trainer's.
        verdict_grace: seconds a Guard gets to act on a verdict itself (roll back in process)
            before the supervisor acts. A command that writes no heartbeat has no Guard and gets
            none.
        rollback_margin, skip_before, skip_after: as in `thermo.guard.GuardConfig`: restart from a
            checkpoint at least `rollback_margin` steps before the onset; blacklist the batches
            of steps ``[onset - skip_before, detection + skip_after]`` that were read.
        restart_delay: seconds to wait before a restart (lets ports and GPU memory free up).
        status_every: seconds between status lines when stderr is not a terminal (a terminal gets
            one line refreshed in place); 0 = no status line.
    """

    max_restarts: int = 10
    max_stalled: int = 3
    hang_timeout: float = 600.0
    startup_timeout: float = 1800.0
    grace: float = 30.0
    poll: float = 1.0
    detect: bool = True
    detector: DetectorConfig | None = None
    verdict_grace: float = 10.0
    rollback_margin: int = 10
    skip_before: int = 20
    skip_after: int = 10
    restart_delay: float = 1.0
    status_every: float = 60.0

    def __post_init__(self):
        for name in ("max_restarts", "rollback_margin", "skip_before", "skip_after"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"SupervisorConfig.{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.max_stalled, int) or self.max_stalled < 1:
            raise ValueError(f"SupervisorConfig.max_stalled must be an int >= 1, got {self.max_stalled!r}")
        for name in ("hang_timeout", "poll"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SupervisorConfig.{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for name in ("startup_timeout", "grace", "verdict_grace", "restart_delay", "status_every"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SupervisorConfig.{name} must be >= 0 seconds, got {getattr(self, name)!r}")
        if self.detector is not None and not isinstance(self.detector, DetectorConfig):
            raise ValueError(f"SupervisorConfig.detector must be a DetectorConfig or None, got {self.detector!r}")


@dataclass
class Launch:
    """One run of the command, as the supervisor saw it (times are Unix seconds)."""

    number: int
    start: float
    pid: int = 0
    first_sign: float | None = None  # first heartbeat or record of this launch
    step: int | None = None  # furthest step reached (heartbeat or record)
    current: int | None = None  # the step in progress at the end (heartbeat, else last record)
    ids: list[int] = field(default_factory=list)  # its sample ids (heartbeat)
    guard: bool = False  # wrote a heartbeat: a Guard loop, which can act on a verdict itself
    records: int = 0  # records this launch wrote that the detector read
    end: float | None = None
    ending: str = ""  # finished | divergence | crash | hang | stopped | relaunch
    exit_code: int | None = None
    fault_time: float | None = None  # when the fault happened, as closely as can be told
    verdict: Verdict | None = None
    why: str = ""  # the ending in words


@dataclass
class Outcome:
    """What `Supervisor.run` ended with; `exit_code` is what ``thermo supervise`` exits with."""

    status: str  # finished | gave_up | stopped
    exit_code: int
    message: str
    launches: list[Launch]
    blacklisted: list[int]


class _StoreFeed:
    """Feeds the store's records to a Detector as they arrive, each attempt from its start step
    (rolled-back rows as the trainer saw them), the way `detect_run` replays a finished run."""

    def __init__(self, store: Store, config: DetectorConfig | None):
        self.store, self.det = store, Detector(config)
        self.attempt: int | None = None
        self.last = -1  # last step fed of `self.attempt`
        self.latest: StepRecord | None = None
        self.verdicts: list[tuple[int, Verdict]] = []  # (attempt, verdict), for the caller to take
        c = self.det.config
        # A resumed run directory: rebuild the detector's history from the recent past only.
        last = store.last_step()
        self._floor = -1 if last is None else last - 2 * max(
            c.spike_window, c.growth_window + c.growth_recent, c.onset_lookback)
        self.poll(judge=False)

    def poll(self, judge: bool = True) -> int:
        """Read and judge the new records; returns how many were fed."""
        df = self.store.attempts()
        atts = [(int(a), int(s)) for a, s in zip(df["attempt"], df["start_step"])
                if self.attempt is None or a >= self.attempt]
        if not atts:
            return 0
        if self.attempt is None:
            self._enter(*atts[0])
        after = max(self._floor, min([self.last] + [s for a, s in atts if a > self.attempt]))
        self._floor = -(2**62)
        by_attempt: dict[int, list[StepRecord]] = {}
        for r in self.store.records(effective=False, after_step=after):
            by_attempt.setdefault(r.attempt, []).append(r)
        fed = 0
        for a, s in atts:
            if a > self.attempt:
                self._enter(a, s)
            for r in sorted(by_attempt.get(a, ()), key=lambda r: r.step):
                if r.step <= self.last:
                    continue
                # Store.records reads scalars, then layers: rows of a flush committed in between
                # come back with layers only. Stop there; the next poll reads them whole.
                if not r.scalars:
                    return fed
                verdict = self.det.update([r])
                self.last, self.latest, fed = r.step, r, fed + 1
                if verdict is not None and judge:
                    self.verdicts.append((a, verdict))
        return fed

    def _enter(self, attempt: int, start_step: int) -> None:
        self.attempt, self.last = attempt, start_step
        self.det.rewind(start_step)


class Supervisor:
    """Runs a training command and keeps it alive: restart after crashes and hangs, roll back and
    blacklist after divergences, give up clearly.

    Args:
        run_dir: the run directory (created if missing); the command gets it as ``THERMO_RUN_DIR``.
        command: the command line, e.g. ``["torchrun", "--nproc_per_node=8", "train.py"]``.
        config: a `SupervisorConfig`.
        env: extra environment variables for the command.

    Events recorded (store ``events``; ``data`` keys):

    ============= ===================================================================================
    ``supervise``  started / finished: command, launches
    ``verdict``    the supervisor's own detector found a divergence: the `Verdict` fields, source
    ``blacklist``  added, removed, reason, steps, source="supervisor"
    ``restart``    reason (divergence, crash, hang), exit_code, step, launch, checkpoint, bad
    ``give_up``    reason, launches, last_error
    ``stop``       reason (the signal), step
    ============= ===================================================================================

    Example:
        >>> outcome = Supervisor("runs/a", ["python", "-m", "thermo.train_gpt"]).run()
        >>> sys.exit(outcome.exit_code)
    """

    def __init__(self, run_dir: str | os.PathLike, command: list[str], config: SupervisorConfig | None = None,
                 env: dict[str, str] | None = None):
        self.run_dir = Path(run_dir).absolute()
        self.command = [str(c) for c in command]
        self.config = config or SupervisorConfig()
        self.env = dict(env or {})
        self.launches: list[Launch] = []
        self.blacklisted: list[int] = []
        self._stop: int | None = None
        self._proc: subprocess.Popen | None = None
        self._tail: deque[str] = deque(maxlen=40)  # the command's last output lines
        self._out_lock = threading.Lock()
        self._tty = sys.stderr.isatty()
        # A terminal shows the status at once; a log gets its first line after `status_every`.
        self._status_shown = 0.0 if self._tty else time.monotonic()
        self._warned: set[str] = set()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> Outcome:
        """Supervise until the command finishes, the supervisor gives up, or it is stopped.

        Raises:
            SupervisorError, RunDirError: bad command or run directory (nothing started or written).
        """
        check_command(self.command)
        _check_same_run_dir(self.command, self.run_dir)
        check_run_dir(self.run_dir)
        lock = _lock(self.run_dir)
        self.store = Store(self.run_dir)
        handlers = self._install_signals()
        try:
            return self._loop()
        finally:
            if self._proc is not None and self._proc.poll() is None:
                _terminate(self._proc, self._tree, self.config.grace)  # never leave it unsupervised
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.store.close()
            os.close(lock)

    def _loop(self) -> Outcome:
        cfg = self.config
        self.feed = _StoreFeed(self.store, cfg.detector) if cfg.detect else None
        best = self.store.last_step()
        best, stalled, restarts = -1 if best is None else best, 0, 0
        self.store.event("supervise", f"thermo supervise started: {shlex.join(self.command)}",
                         command=self.command, config=_config_json(cfg))
        while True:
            launch = self._launch()
            self._watch(launch)
            self._clear_status()
            if launch.ending == "stopped":
                return self._finish("stopped", 128 + (self._stop or signal.SIGTERM), launch.why)
            if launch.ending == "finished":
                return self._finish("finished", 0, launch.why)
            if launch.step is not None and launch.step > best:
                best, stalled = launch.step, 0
            else:
                stalled += 1
            give_up = self._act(launch)
            if give_up is None and stalled >= cfg.max_stalled:
                give_up = (f"{stalled} launches in a row got no further than step {best}"
                           if best >= 0 else f"{stalled} launches in a row failed before their first step")
            if give_up is None and restarts >= cfg.max_restarts:
                give_up = f"--max-restarts {cfg.max_restarts} reached"
            if give_up is not None:
                return self._give_up(give_up, launch)
            restarts += 1
            self._say(f"{launch.why}; restarting ({restarts}/{cfg.max_restarts})")
            self._event("restart", f"restart {restarts}: {launch.why}", step=launch.current,
                        reason=launch.ending, exit_code=launch.exit_code, launch=launch.number,
                        fault_time=launch.fault_time, **self._restart_info)
            time.sleep(cfg.restart_delay)
            if self._stop is not None:
                return self._finish("stopped", 128 + self._stop, f"stopped by {signal.Signals(self._stop).name}")

    def _launch(self) -> Launch:
        launch = Launch(number=len(self.launches) + 1, start=time.time())
        self._tail.clear()  # errors are this launch's
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, "THERMO_RUN_DIR": str(self.run_dir)}
        # A session of its own: signals to the supervisor's terminal do not reach it, and the
        # whole group can be signalled at once.
        try:
            self._proc = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise SupervisorError(f"cannot start {self.command[0]!r}: {e.strerror or e}") from None
        launch.pid = self._proc.pid
        self._tree: dict[int, int] = _tree(self._proc.pid)  # pid -> start time, for orphans
        self._pumps = [threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                       for src, dst in ((self._proc.stdout, sys.stdout), (self._proc.stderr, sys.stderr))]
        for t in self._pumps:
            t.start()
        self.launches.append(launch)
        return launch

    def _watch(self, launch: Launch) -> None:
        """Follow one launch until it ends or must be ended; sets `launch.ending`."""
        cfg = self.config
        alive_at = time.monotonic()  # last sign of life
        pending: tuple[Verdict, int, float] | None = None  # verdict, its attempt, when seen
        beat_time = None
        while True:
            rc = self._proc.poll()
            progressed = False
            beat = _read_heartbeat(self.run_dir)
            if beat is not None and beat["time"] > launch.start and beat["time"] != beat_time:
                beat_time, progressed, launch.guard = beat["time"], True, True
                launch.current = int(beat.get("step", 0))
                launch.step = max(launch.step or 0, launch.current)
                launch.ids = [int(i) for i in beat.get("ids", [])]
            if self.feed is not None:
                n = self._read(self.feed.poll, 0)
                if n:
                    progressed, launch.records = True, launch.records + n
                    launch.step = max(launch.step or 0, self.feed.last)
                    if not launch.guard:
                        launch.current = self.feed.last
                for attempt, v in self.feed.verdicts:
                    pending = pending or (v, attempt, time.monotonic())
                self.feed.verdicts.clear()
                if pending and self.feed.attempt > pending[1]:
                    pending = None  # the command rolled back by itself (a Guard): nothing to do
            now = time.monotonic()
            if progressed:
                alive_at = now
                launch.first_sign = launch.first_sign or time.time()
            self._tree.update(_tree(self._proc.pid) if rc is None else {})
            if rc is not None:
                self._ended(launch, rc, pending)
                return
            if self._stop is not None:
                name = signal.Signals(self._stop).name
                self._end(launch, "stopped", f"stopped by {name}", time.time())
                self._event("stop", f"thermo supervise stopped by {name}; the command was terminated",
                            step=launch.current, reason=name)
                return
            if pending and (not launch.guard or now - pending[2] >= cfg.verdict_grace) \
                    and not self._read(lambda: self._guard_on_it(pending[0], launch), False):
                v = pending[0]
                self._end(launch, "divergence", f"divergence: {v.message}", launch.start, verdict=v)
                self._event("verdict", f"supervisor: {v.message}", step=v.detection_step,
                            source="supervisor", **v.to_dict())
                return
            limit = cfg.hang_timeout if launch.first_sign else cfg.startup_timeout
            if limit and now - alive_at > limit:
                what = "no heartbeat" if launch.first_sign else "no sign of life since the start"
                self._end(launch, "hang", f"hang: {what} for {now - alive_at:.0f}s (step {launch.step})",
                          time.time() - (now - alive_at))
                return
            self._status(launch)
            time.sleep(cfg.poll)

    def _end(self, launch: Launch, ending: str, why: str, fault_time: float, verdict: Verdict | None = None):
        """Terminate the command's process tree and note how the launch ended."""
        _terminate(self._proc, self._tree, self.config.grace)
        self._join_pumps()
        launch.ending, launch.why, launch.verdict = ending, why, verdict
        launch.exit_code, launch.end = self._proc.returncode, time.time()
        launch.fault_time = fault_time if verdict is None else self._read(
            lambda: self._record_time(verdict, fault_time), fault_time)
        if self.feed is not None:
            self._read(lambda: self.feed.poll(judge=False), 0)  # its last flush, for the ledger

    def _ended(self, launch: Launch, rc: int, pending) -> None:
        """The command exited by itself: finished, diverged (the Guard gave up) or crashed."""
        noticed = time.time()  # within `poll` of the exit
        _terminate(self._proc, self._tree, self.config.grace)  # what it left behind (orphans)
        self._join_pumps()
        launch.exit_code, launch.end, launch.fault_time = rc, time.time(), noticed
        if self.feed is not None:
            self._read(self.feed.poll, 0)
            for attempt, v in self.feed.verdicts:
                pending = pending or (v, attempt, 0.0)
            self.feed.verdicts.clear()
            if pending and self.feed.attempt > pending[1]:
                pending = None  # rolled back by itself before it exited
        guard_v, gave_up = self._read(lambda: self._guard_verdict(launch), (None, False))
        stop = self._read(lambda: self._stopped_to_resume(launch), None) if rc == 0 else None
        if stop is not None:
            # A framework adapter (Hugging Face, Lightning) stopped on a verdict and left the
            # checkpoint to resume from and the blacklist: relaunching is the repair.
            launch.ending = "relaunch"
            launch.why = f"the trainer stopped on a verdict to resume from checkpoint {stop}"
        elif rc == 0:
            launch.ending, launch.why = "finished", "the command finished"
            if pending and self.feed.attempt <= pending[1]:
                v = pending[0]
                launch.why += f", but nobody acted on a divergence at step {v.detection_step}: {v.message}"
                self._event("verdict", f"supervisor (after the end): {v.message}", step=v.detection_step,
                            source="supervisor", **v.to_dict())
        elif rc == EXIT_DIVERGED or gave_up or pending:
            # A Guard that gave up, or a crash while diverged (a NaN that kills a kernel): the
            # same repair either way.
            v = guard_v or (pending[0] if pending else None)
            launch.ending, launch.verdict = "divergence", v
            who = "the Guard gave up" if rc == EXIT_DIVERGED or gave_up else "crashed while diverging"
            launch.why = f"{who} ({_describe_exit(rc)})" + (f": {v.message}" if v else "")
            if v is not None:
                launch.fault_time = self._read(lambda: self._record_time(v, launch.fault_time), launch.fault_time)
        else:
            launch.ending = "crash"
            where = f"at step {launch.current}" if launch.current is not None else "before its first step"
            launch.why = f"crash {where} ({_describe_exit(rc)})"
            err = self._last_error()
            if err:
                launch.why += f": {err}"

    # -- decisions -------------------------------------------------------------------------------

    def _act(self, launch: Launch) -> str | None:
        """Repair the run directory after a failed launch; returns why to give up, or None."""
        self._restart_info = {}
        if launch.ending == "divergence" and launch.verdict is not None:
            why = self._roll_back(launch, launch.verdict)
            if why is not None:
                return why
        elif launch.ending == "crash" and launch.current is not None and len(self.launches) >= 2:
            prev, at = self.launches[-2], launch.current
            if prev.ending == "crash" and prev.current == at and launch.ids:
                self._blacklist(launch.ids, f"the command crashed twice in a row at step {at} with "
                                "this batch: poison", None, [at, at])
                self._restart_info["poison"] = launch.ids
        if self.feed is not None and launch.records and not launch.guard and launch.ending != "relaunch":
            # No Guard: the command restarts its own step count. A new attempt keeps the rows
            # it wrote from being overwritten by the next launch's.
            self.store.begin_attempt(-1, f"restart by thermo supervise: {launch.why}")
        ckpt = _newest_usable(self.run_dir)
        if ckpt is not None:
            self._restart_info.setdefault("checkpoint", ckpt)
        return None

    def _roll_back(self, launch: Launch, v: Verdict) -> str | None:
        cfg = self.config
        ckpts = _checkpoints(self.run_dir)
        target = None
        if ckpts is not None:
            target = (ckpts.newest_good(before_step=v.onset_step - cfg.rollback_margin)
                      or ckpts.newest_good(before_step=v.onset_step))
            if target is None:
                return f"no good checkpoint from before the onset step {v.onset_step}; {launch.why}"
            bad = ckpts.mark_bad(v.onset_step, f"written at or after the onset step {v.onset_step} "
                                 f"(thermo supervise: {v.message})")
            bad += ckpts.mark_bad(target.step + 1, f"superseded: thermo supervise restarts from step {target.step}")
            self._restart_info.update(checkpoint=target.step, bad=sorted(bad))
        first = max(v.onset_step - cfg.skip_before, (target.step + 1) if target else 0)
        last = v.detection_step + cfg.skip_after
        ids = {i for row in self.store.ledger(first, last).values() for i in row}
        if launch.current is not None and first <= launch.current <= last:
            ids.update(launch.ids)  # the step in progress: not in the ledger until its flush
        self._blacklist(sorted(ids), f"divergence: {v.message}", v, [first, last])
        self._restart_info.update(onset_step=v.onset_step, detection_step=v.detection_step)
        return None

    def _blacklist(self, ids: list[int], reason: str, verdict: Verdict | None, steps: list[int]) -> None:
        from thermo.data import Blacklist

        added = Blacklist(self.run_dir).add(ids, reason=reason, verdict=verdict, source="supervisor")
        self.blacklisted += added
        self._restart_info["blacklisted"] = len(added)
        self._event("blacklist", f"supervisor blacklisted {len(added)} samples of steps {steps[0]}..{steps[1]}: "
                    f"{reason}", step=steps[1], added=added, removed=[], reason=reason, steps=steps,
                    source="supervisor")

    def _give_up(self, why: str, launch: Launch) -> Outcome:
        err = self._last_error()
        msg = (f"gave up after {len(self.launches)} launches: {why}. Last launch: {launch.why}"
               + (f" (last error: {err})" if err and err not in launch.why else ""))
        self._event("give_up", f"thermo supervise {msg}", step=launch.step, reason=why,
                    launches=len(self.launches), last_error=err)
        return self._finish("gave_up", 1, msg, event=False)

    def _finish(self, status: str, code: int, why: str, event: bool = True) -> Outcome:
        n = len(self.launches)
        msg = why if status == "gave_up" else f"{status} after {n} launch{'es' * (n != 1)}: {why}"
        if self.blacklisted:
            msg += f"; {len(self.blacklisted)} samples blacklisted"
        if event:
            self._event("supervise", f"thermo supervise {msg}", step=self.launches[-1].step,
                        status=status, launches=n)
        self._say(msg)
        return Outcome(status, code, msg, self.launches, sorted(self.blacklisted))

    # -- helpers -------------------------------------------------------------------------------

    def _guard_on_it(self, v: Verdict, launch: Launch) -> bool:
        """Did the command's Guard record this verdict (it is rolling back; give it time)?"""
        if not launch.guard:
            return False
        ev = self.store.events()
        ev = ev[(ev["kind"] == "verdict") & (ev["time"] >= launch.start)]
        return any(d.get("detection_step") == v.detection_step and d.get("source") != "supervisor"
                   for d in ev["data"])

    def _guard_verdict(self, launch: Launch) -> tuple[Verdict | None, bool]:
        """The Guard's last verdict in this launch, and whether it gave up."""
        ev = self.store.events()
        ev = ev[(ev["time"] >= launch.start) & (ev["kind"].isin(["verdict", "give_up"]))]
        gave_up = bool((ev["kind"] == "give_up").any())
        verdicts = [d for k, d in zip(ev["kind"], ev["data"]) if k == "verdict" and d.get("source") != "supervisor"]
        if not verdicts:
            return None, gave_up
        d = verdicts[-1]
        try:
            return Verdict.from_dict({k: d[k] for k in ("kind", "signal", "layer", "onset_step",
                                                         "detection_step", "evidence", "message")}), gave_up
        except (KeyError, TypeError, ValueError):
            return None, gave_up

    def _stopped_to_resume(self, launch: Launch) -> int | None:
        """The checkpoint a framework adapter stopped this launch to resume from (its
        ``rollback`` event with ``action="stop"``), or None."""
        ev = self.store.events()
        ev = ev[(ev["time"] >= launch.start) & (ev["kind"] == "rollback")]
        stops = [d for d in ev["data"] if d.get("action") == "stop"]
        return int(stops[-1]["to_step"]) if stops else None

    def _record_time(self, v: Verdict, default: float) -> float:
        """When the detection step's record was taken (its ``wall_time``), else `default`."""
        rec = self.feed.latest if self.feed is not None else None
        for r in self.store.records(effective=False, after_step=v.detection_step - 1):
            if r.step == v.detection_step and "wall_time" in r.scalars:
                rec = r
        t = rec.scalars.get("wall_time") if rec is not None and rec.step == v.detection_step else None
        return float(t) if t else default

    def _event(self, kind: str, message: str, /, step: int | None = None, **data) -> None:
        self._read(lambda: self.store.event(kind, message, step=step, **data), None)

    def _read(self, fn, default):
        """Run a store access; a store busy past its timeout costs a warning, not the watch (an
        exception here would leave the command running unsupervised)."""
        try:
            return fn()
        except (sqlite3.Error, pd.errors.DatabaseError) as e:
            if str(e) not in self._warned:
                self._warned.add(str(e))
                self._say(f"warning: metrics store: {e}; carrying on")
            return default

    def _last_error(self) -> str:
        lines = [ln.strip() for ln in list(self._tail) if ln.strip() and not set(ln.strip()) <= set("=-*")]
        for ln in reversed(lines):
            if re.search(r"error|exception|fault|killed|traceback", ln, re.IGNORECASE):
                return ln[:300]
        return lines[-1][:300] if lines else ""

    def _pump(self, src, dst) -> None:
        for raw in iter(src.readline, b""):
            line = raw.decode(errors="replace")
            self._tail.append(line)
            with self._out_lock:
                if self._tty and self._status_shown:
                    print("\r\x1b[K", end="", file=sys.stderr)
                print(line, end="" if line.endswith("\n") else "\n", file=dst, flush=True)
        src.close()

    def _join_pumps(self) -> None:
        for t in self._pumps:
            t.join(timeout=5)

    def _status(self, launch: Launch) -> None:
        now, every = time.monotonic(), self.config.status_every
        if not every or (not self._tty and now - self._status_shown < every):
            return
        rec = self.feed.latest if self.feed is not None else None
        loss = f"  loss {rec.scalars['loss']:.4g}" if rec is not None and "loss" in rec.scalars else ""
        line = (f"thermo supervise: launch {launch.number}  step {launch.step if launch.step is not None else '-'}"
                f"{loss}  restarts {len(self.launches) - 1}/{self.config.max_restarts}  "
                f"blacklisted {len(self.blacklisted)}  up {time.time() - launch.start:.0f}s")
        with self._out_lock:
            print(("\r\x1b[K" + line) if self._tty else line, end="" if self._tty else "\n",
                  file=sys.stderr, flush=True)
        self._status_shown = now

    def _clear_status(self) -> None:
        if self._tty and self._status_shown:
            with self._out_lock:
                print("\r\x1b[K", end="", file=sys.stderr, flush=True)

    def _say(self, msg: str) -> None:
        with self._out_lock:
            print(f"thermo supervise: {msg}", file=sys.stderr, flush=True)

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signals only reach the main thread; a caller in a thread stops us otherwise

        def stop(signum, frame):
            self._stop = signum

        return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask a running `run` (in another thread) to stop the command and return."""
        self._stop = signum


def supervise(run_dir: str | os.PathLike, command: list[str], config: SupervisorConfig | None = None,
              **kw) -> Outcome:
    """Run `command` under a `Supervisor` (see there); returns its `Outcome`."""
    return Supervisor(run_dir, command, config, **kw).run()


# -- checks before anything is started or written --------------------------------------------------


def check_command(command: list[str]) -> None:
    """Raise `SupervisorError` unless `command` names an executable program."""
    if not command:
        raise SupervisorError("no command to supervise: give it after '--', e.g. "
                              "thermo supervise runs/a -- torchrun --nproc_per_node=2 train.py")
    prog = command[0]
    found = shutil.which(prog) if os.sep not in prog else (prog if os.access(prog, os.X_OK)
                                                           and Path(prog).is_file() else None)
    if found is None:
        raise SupervisorError(f"command not found: {prog!r} (not an executable file"
                              f"{'' if os.sep in prog else ' on PATH'}); check the command after '--'")


def _check_same_run_dir(command: list[str], run_dir: Path) -> None:
    """A command that names another run directory (``--run-dir X``) would never be seen."""
    for i, arg in enumerate(command):
        other = command[i + 1] if arg == "--run-dir" and i + 1 < len(command) else \
            arg.partition("=")[2] if arg.startswith("--run-dir=") else None
        if other and Path(other).absolute().resolve() != run_dir.resolve():
            raise SupervisorError(f"the command writes to --run-dir {other} but thermo supervise watches "
                                  f"{run_dir}: give both the same directory (or drop --run-dir: the "
                                  "command gets THERMO_RUN_DIR)")


def check_run_dir(run_dir: Path) -> None:
    """Raise a one-line error if the run directory cannot be used: not a writable folder, or its
    store, manifest or blacklist is broken, foreign or from a newer thermo. Creates the folder
    (and nothing else) only once everything else checked out."""
    from thermo.checkpoints import MANIFEST_NAME
    from thermo.data import Blacklist

    if run_dir.exists() and not run_dir.is_dir():
        raise SupervisorError(f"run directory {run_dir} exists and is not a folder; choose another path")
    if (run_dir / "thermo.db").exists():
        Store(run_dir, readonly=True).close()  # StoreError: foreign, torn or newer
    if (run_dir / MANIFEST_NAME).exists() or (run_dir / "checkpoints").is_dir():
        _checkpoints(run_dir, must=True)  # RunDirError: broken, or folders without a manifest
    if run_dir.is_dir():
        Blacklist.load(run_dir)  # RunDirError: malformed or newer
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise SupervisorError(f"run directory {run_dir} is not writable ({e.strerror or e}); "
                              "choose a writable path") from None


def _checkpoints(run_dir: Path, must: bool = False):
    """The run's `Checkpoints`, or None where there is no manifest (a loop without a Guard)."""
    from thermo.checkpoints import MANIFEST_NAME, Checkpoints

    if not must and not (run_dir / MANIFEST_NAME).exists():
        return None  # never create one: Checkpoints writes an empty manifest where none exists
    return Checkpoints(run_dir)


def _newest_usable(run_dir: Path) -> int | None:
    """The checkpoint a Guard will resume from: the newest intact one not marked bad."""
    ckpts = _checkpoints(run_dir)
    if ckpts is None:
        return None
    for e in sorted(ckpts.entries, key=lambda e: -e.step):
        if e.health != "bad" and ckpts.torn(e) is None:
            return e.step
    return None


def _lock(run_dir: Path) -> int:
    """One supervisor per run directory (the lock goes with the process, however it dies)."""
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SupervisorError(f"another thermo supervise is already watching {run_dir}") from None
    return fd


def _read_heartbeat(run_dir: Path) -> dict | None:
    try:
        beat = json.loads((run_dir / HEARTBEAT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) and isinstance(beat.get("time"), (int, float)) else None


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _config_json(cfg: SupervisorConfig) -> dict:
    return asdict(cfg)


# -- the command's process tree ----------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a pid from a later process reusing it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _tree(pid: int) -> dict[int, int]:
    """`pid` and its live descendants, pid -> start time (Linux /proc; elsewhere `pid` alone)."""
    children: dict[int, list[int]] = {}
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return {pid: 0}
    for name in names:
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        t = _start_time(p)
        if t is not None and p not in out:
            out[p] = t
            todo.extend(children.get(p, ()))
    return out


def _alive(pid: int, start: int) -> bool:
    t = _start_time(pid)
    if t is None and not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    return t == start


def _signal_tree(proc: subprocess.Popen, tree: dict[int, int], sig: int) -> None:
    live = {p for p, t in tree.items() if p != os.getpid() and _alive(p, t)}
    groups = {proc.pid}  # the command's own group (its session leader's pid)
    for p in live:
        try:
            groups.add(os.getpgid(p))
        except OSError:
            pass
    for g in groups - {os.getpgrp()}:  # never our own group
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    for p in live:  # members that left their group
        try:
            os.kill(p, sig)
        except OSError:
            pass


def _terminate(proc: subprocess.Popen, tree: dict[int, int], grace: float) -> None:
    """SIGTERM the command's whole process tree; SIGKILL what is left after `grace` seconds.

    Every process group in the tree is signalled, not only the command's: torchrun starts each
    worker in a session of its own, so a hung worker would outlive a signal to torchrun's group.
    `tree` holds every descendant seen while it ran, so orphans of a dead parent are found too.
    """
    if proc.poll() is None:
        tree.update(_tree(proc.pid))
    if proc.poll() is None or any(_alive(p, t) for p, t in tree.items() if p != proc.pid):
        _signal_tree(proc, tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while True:
        if proc.poll() is None:
            tree.update(_tree(proc.pid))
        left = [p for p, t in tree.items() if p != proc.pid and _alive(p, t)]
        if proc.poll() is not None and not left:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    _signal_tree(proc, tree, signal.SIGKILL)
    proc.wait()
