"""`Supervisor`: the loop that launches the command, watches it, and repairs and restarts the run."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from thermo._io import WRITER_TOKEN_ENV, RunDirError, WriterLock
from thermo.detector import Verdict
from thermo.guard import EXIT_DIVERGED, EXIT_PREEMPTED, rollback_target, skip_window
from thermo.store import Store, StoreError
from thermo.supervisor.checks import (
    _check_same_run_dir,
    _checkpoints,
    _lock,
    _newest_usable,
    _read_heartbeat,
    check_command,
    check_run_dir,
)
from thermo.supervisor.config import Launch, Outcome, SupervisorConfig, SupervisorError
from thermo.supervisor.feed import _StoreFeed
from thermo.supervisor.nodes import Leader, follow, leader_token, me, torchrun_nodes
from thermo.supervisor.process import _describe_exit, _marked, _terminate, _tree

log = logging.getLogger("thermo")

# Every process of a command carries its supervisor's id: stopping the command stops them all,
# and only them (the commands of two supervisors on one host carry the same writer token).
SUPERVISOR_ID_ENV = "THERMO_SUPERVISOR_ID"


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
    ``supervise``  started / finished: command, launches; several nodes: nodes (min, max, job, leader)
    ``verdict``    the supervisor's own detector found a divergence: the `Verdict` fields, source
    ``blacklist``  added, removed, reason, steps, source="supervisor"
    ``restart``    reason (divergence, crash, hang, preempted), exit_code, step, launch, checkpoint, bad, node
    ``give_up``    reason, launches, last_error
    ``stop``       reason (the signal), step
    ``node``       several nodes: a follower joined or is gone: node, joined
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
        self._id = uuid.uuid4().hex
        self._writer: WriterLock | None = None  # held by a leader (and a single node's supervisor)
        self._token = ""  # the writer token the command gets
        # Several nodes (torchrun --nnodes > 1): one supervisor per node; see `thermo.supervisor.nodes`.
        self.nodes = torchrun_nodes(self.command, {**os.environ, **self.env})
        self._job: Leader | None = None  # several nodes: this supervisor leads them

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> Outcome:
        """Supervise until the command finishes, the supervisor gives up, or it is stopped.

        Raises:
            SupervisorError, RunDirError: bad command or run directory (nothing started or written).
        """
        check_command(self.command)
        _check_same_run_dir(self.command, self.run_dir)
        check_run_dir(self.run_dir)
        # One supervisor per run directory; a job on several nodes has one per node, and the
        # writer lock tells the leader from the followers.
        lock = _lock(self.run_dir) if self.nodes is None else None
        try:
            # The run directory's one writer: this supervisor and the commands it launches (they
            # inherit the locked file, so an orphaned command still holds it).
            writer = WriterLock(self.run_dir, "thermo supervise").acquire()
        except RunDirError as e:
            if lock is not None:
                os.close(lock)
            token = leader_token(self.run_dir, self.nodes) if self.nodes is not None else None
            if token is None:
                raise SupervisorError(str(e)) from None
            return follow(self, token)
        return self._lead(writer, lock)

    def _lead(self, writer: WriterLock, lock: int | None = None, generation: int = 0) -> Outcome:
        """Supervise as the run directory's writer: alone, or as the leader of several nodes
        (from launch `generation` on, when a follower takes over from a lost leader)."""
        self._writer, self._token = writer, writer.token or ""
        if self.nodes is not None:
            self._job = Leader(self.run_dir, self.nodes, self._token, generation)
            self._job.write("start")
        self.store = Store(self.run_dir, lock=False)
        handlers = self._install_signals()
        try:
            return self._loop()
        finally:
            if self._proc is not None and self._proc.poll() is None:
                self._kill_tree()  # never leave it unsupervised
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if self._job is not None and self._job.state() != "done":
                self._job.write("done", exit_code=1, status="gave_up", message="the leader ended unexpectedly")
            self.store.close()
            self._writer.release()
            if lock is not None:
                os.close(lock)

    def _loop(self) -> Outcome:
        cfg = self.config
        self.feed = _StoreFeed(self.store, cfg.detector) if cfg.detect else None
        best = self.store.last_step()
        best, stalled, restarts = -1 if best is None else best, 0, 0
        nodes = {} if self.nodes is None else {"nodes": {"min": self.nodes.min, "max": self.nodes.max,
                                                          "job": self.nodes.job, "leader": me()}}
        self.store.event("supervise", f"thermo supervise started: {shlex.join(self.command)}",
                         command=self.command, config=_config_json(cfg), **nodes)
        while True:
            launch = self._launch()
            self._watch(launch)
            self._clear_status()
            if self._job is not None and launch.ending != "finished":
                # No trainer runs on any node while the leader repairs.
                late = self._job.stop_nodes(launch.why, cfg.grace + 10 * cfg.poll + 10.0, cfg.poll)
                if late:
                    self._say(f"warning: node(s) {', '.join(late)} did not stop their agent in time; carrying on")
            if launch.ending == "stopped":
                return self._finish("stopped", 128 + (self._stop or signal.SIGTERM), launch.why)
            if launch.ending == "finished":
                return self._finish("finished", 0, launch.why)
            if launch.ending == "preempted":  # not a crash: relaunch at once, no budget spent
                if self._stop is not None:
                    return self._finish("stopped", 128 + self._stop, f"stopped by {signal.Signals(self._stop).name}")
                self._say(f"{launch.why}; relaunching (not counted as a restart)")
                self._event("restart", f"relaunch: {launch.why}", step=launch.current, reason="preempted",
                            exit_code=launch.exit_code, launch=launch.number,
                            checkpoint=self._read(lambda: self._preempted(launch), None))
                continue
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
                        fault_time=launch.fault_time, **({"node": launch.node} if launch.node else {}),
                        **self._restart_info)
            time.sleep(cfg.restart_delay)
            if self._stop is not None:
                return self._finish("stopped", 128 + self._stop, f"stopped by {signal.Signals(self._stop).name}")

    def _launch(self) -> Launch:
        launch = Launch(number=len(self.launches) + 1, start=time.time())
        self._tail.clear()  # errors are this launch's
        # The heartbeat there now is the last launch's: only one that differs is this one's.
        self._beat0 = _beat_key(_read_heartbeat(self.run_dir))
        if self._job is not None:
            self._job.next_launch()  # every node launches its agent
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, "THERMO_RUN_DIR": str(self.run_dir),
               WRITER_TOKEN_ENV: self._token, SUPERVISOR_ID_ENV: self._id}
        if self.nodes is not None:
            # torch 2.13: after torchrun restarts the workers of every node (a rank crashed),
            # they hang in init_process_group on the TCP store the agents share (seen with two
            # agents); with one store per round they resume. The user's setting wins.
            env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        # A session of its own: signals to the supervisor's terminal do not reach it, and the
        # whole group can be signalled at once.
        try:
            self._proc = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True,
                                          pass_fds=() if self._writer is None or self._writer.fd is None
                                          else (self._writer.fd,))
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
        # A sign of life is a heartbeat that changed since the last look, judged by this
        # process's clock: the heartbeat's own time comes from the host of rank 0, whose clock
        # may be off (another node's), so it is never compared with ours.
        seen = self._beat0
        while True:
            rc = self._proc.poll()
            progressed = False
            beat = _read_heartbeat(self.run_dir)
            if beat is not None and _beat_key(beat) != seen:
                seen, progressed, launch.guard = _beat_key(beat), True, True
                warning = self._job.rank0_elsewhere(beat.get("host")) if self._job is not None else None
                if warning:
                    self._say(f"warning: {warning}")
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
            node = self._job.failed_node(self._event) if self._job is not None else None
            if node is not None:
                self._end(launch, "crash", node[1], time.time())
                launch.exit_code, launch.node = node[2], node[0]
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

    def _kill_tree(self, grace: float | None = None) -> None:
        """Terminate the command's process tree, with every process that still carries this
        supervisor's id in its environment (a daemon the command double-forked); SIGKILL after
        `grace` seconds (default `SupervisorConfig.grace`)."""
        self._tree.update(_marked(SUPERVISOR_ID_ENV, self._id))
        _terminate(self._proc, self._tree, self.config.grace if grace is None else grace)

    def _end(self, launch: Launch, ending: str, why: str, fault_time: float, verdict: Verdict | None = None):
        """Terminate the command's process tree and note how the launch ended."""
        # A hung command cannot reach the step boundary where a Guard acts on SIGTERM (it would
        # checkpoint and exit): SIGKILL at once rather than after the grace period.
        hard = ending == "hang"
        if self._job is not None:
            self._job.write("stop", why=why, hard=hard)  # every node stops its agent meanwhile
        self._kill_tree(0.0 if hard else None)
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
        self._kill_tree()  # what it left behind (orphans, daemons)
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
        if rc == 0 and guard_v is not None and not self._read(lambda: self._unanswered(launch), False):
            guard_v = None  # the Guard rolled back for it in process: repaired
        if stop is not None:
            # A framework adapter (Hugging Face, Lightning) stopped on a verdict and left the
            # checkpoint to resume from and the blacklist: relaunching is the repair.
            launch.ending = "relaunch"
            launch.why = f"the trainer stopped on a verdict to resume from checkpoint {stop}"
        elif rc == 0 and (pending or guard_v is not None):
            # It finished, but diverged and nobody repaired it: the divergence was seen only
            # after the end (a fast run outpaces the supervisor's polls, or the Guard judged its
            # last partial window at close, when nothing could act on it). The same repair as
            # for a verdict seen while it ran: roll back, blacklist, relaunch.
            ours = pending[0] if pending else None
            v = guard_v or ours
            launch.ending, launch.verdict = "divergence", v
            launch.why = f"divergence seen after the command ended: {v.message}"
            if v is ours:
                self._event("verdict", f"supervisor (after the command ended): {v.message}",
                            step=v.detection_step, source="supervisor", **v.to_dict())
            launch.fault_time = self._read(lambda: self._record_time(v, launch.fault_time), launch.fault_time)
        elif rc == 0:
            launch.ending, launch.why = "finished", "the command finished"
        elif rc == EXIT_DIVERGED or gave_up or pending:
            # A Guard that gave up, or a crash while diverged (a NaN that kills a kernel): the
            # same repair either way.
            v = guard_v or (pending[0] if pending else None)
            launch.ending, launch.verdict = "divergence", v
            who = "the Guard gave up" if rc == EXIT_DIVERGED or gave_up else "crashed while diverging"
            launch.why = f"{who} ({_describe_exit(rc)})" + (f": {v.message}" if v else "")
            if v is not None:
                launch.fault_time = self._read(lambda: self._record_time(v, launch.fault_time), launch.fault_time)
        elif rc == EXIT_PREEMPTED or self._read(lambda: self._preempted(launch), None) is not None:
            # The Guard got SIGTERM/SIGUSR1 and checkpointed first (torchrun reports a worker's
            # exit 87 as 1: its `preempt` event tells).
            launch.ending = "preempted"
            launch.why = (f"preempted ({_describe_exit(rc)}): checkpoint "
                          f"{self._read(lambda: self._preempted(launch), None)} written")
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
        s = self.config.guard_settings(self._read(lambda: self.store.meta().get("guard"), None))
        ckpts = _checkpoints(self.run_dir)
        target = None
        if ckpts is not None:
            target = rollback_target(ckpts, v, s["rollback_margin"])
            if target is None:
                return f"no good checkpoint from before the onset step {v.onset_step}; {launch.why}"
            bad = ckpts.mark_bad(v.onset_step, f"written at or after the onset step {v.onset_step} "
                                 f"(thermo supervise: {v.message})")
            bad += ckpts.mark_bad(target.step + 1, f"superseded: thermo supervise restarts from step {target.step}")
            self._restart_info.update(checkpoint=target.step, bad=sorted(bad))
        first, last = skip_window(v, target.step if target else -1, s["skip_before"], s["skip_after"])
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
        if self._job is not None:
            self._job.write("done", exit_code=code, status=status, message=msg)  # every node exits with it
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

    def _unanswered(self, launch: Launch) -> bool:
        """Did this launch's Guard record a verdict that no rollback followed (one it found in
        its last partial window, at close, when nothing could act on it any more)?"""
        ev = self.store.events()
        ev = ev[(ev["time"] >= launch.start) & ev["kind"].isin(["verdict", "rollback"])]
        ev = ev[ev["data"].map(lambda d: d.get("source") != "supervisor")]
        return len(ev) > 0 and ev.iloc[-1]["kind"] == "verdict"

    def _preempted(self, launch: Launch) -> int | None:
        """The checkpoint this launch's Guard wrote on a preemption signal (its ``preempt``
        event), or None."""
        ev = self.store.events()
        ev = ev[(ev["time"] >= launch.start) & (ev["kind"] == "preempt")]
        return int(ev.iloc[-1]["data"]["checkpoint"]) if len(ev) else None

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
        # INFO: the supervisor already says it on stderr; logging reaches the user's handlers.
        log.info("thermo supervise: %s: %s", kind, message)

    def _read(self, fn, default):
        """Run a store access; a store busy past its timeout costs a warning, not the watch (an
        exception here would leave the command running unsupervised)."""
        try:
            return fn()
        except (sqlite3.Error, pd.errors.DatabaseError, StoreError) as e:
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

        # SIGUSR1: Slurm's warning before a time limit (--signal=USR1@...); stopping SIGTERMs the
        # command, whose Guard checkpoints at the next step boundary within `grace`.
        return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask a running `run` (in another thread) to stop the command and return."""
        self._stop = signum


def supervise(run_dir: str | os.PathLike, command: list[str], config: SupervisorConfig | None = None,
              **kw) -> Outcome:
    """Run `command` under a `Supervisor` (see there); returns its `Outcome`."""
    return Supervisor(run_dir, command, config, **kw).run()


def _config_json(cfg: SupervisorConfig) -> dict:
    return asdict(cfg)


def _beat_key(beat: dict | None) -> tuple | None:
    """What tells one heartbeat from the next: its writer, counter and step (``seq`` counts the
    writer's beats; its ``time`` is only one more field that changes, never read as a time)."""
    if beat is None:
        return None
    return tuple(repr(beat.get(k)) for k in ("pid", "seq", "attempt", "step", "time"))
