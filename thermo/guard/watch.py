"""`Watch`: the decisions every loop shares (record, judge, plan a rollback, give up), with `Plan`,
and `newest_usable`."""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch.nn as nn

from thermo import _dist
from thermo.checkpoints import CheckpointConfig, CheckpointEntry, Checkpoints
from thermo.data import BatchLedger, Blacklist
from thermo.detector import Detector, DetectorConfig, Verdict
from thermo.guard.config import DivergenceError, GuardConfig
from thermo.rundir import RunDir
from thermo.thermometer import Thermometer, ThermometerConfig

log = logging.getLogger("thermo")


class Watch:
    """What every loop thermo serves shares: a thermometer, the detector, the batch ledger, the
    checkpoints and the blacklist, and the decisions over them. `Guard` (loops thermo owns) and
    the framework adapters (`thermo.integrations`) are built on it, so the escalation lives once.

    Every method is called on every rank alike; rank 0 decides and writes, and its decision
    reaches the other ranks in a broadcast at the flush.

    Args:
        model: the model the thermometer attaches to.
        run_dir: the run directory (default: ``$THERMO_RUN_DIR``).
        config, thermometer, detector: configuration of each part.
        checkpoints: a `CheckpointConfig`, or a ready `Checkpoints` (e.g. with a framework's
            checkpoint backend).
        sinks: extra record sinks (W&B) for the thermometer.
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: str | os.PathLike | None = None,
        *,
        config: GuardConfig | None = None,
        thermometer: ThermometerConfig | None = None,
        detector: DetectorConfig | None = None,
        checkpoints: CheckpointConfig | Checkpoints | None = None,
        sinks=(),
    ):
        run_dir = run_dir if run_dir is not None else os.environ.get("THERMO_RUN_DIR")
        if run_dir is None:
            raise ValueError("thermo needs a run directory: pass run_dir= or set THERMO_RUN_DIR")
        self.run_dir = Path(run_dir)
        self.config = config or GuardConfig()
        self.rank0 = _dist.is_rank0()
        self.detector = Detector(detector)
        self.ledger = BatchLedger(max_steps=max(10_000, 4 * self.config.checkpoint_every))
        tcfg = self._thermometer_config(thermometer or ThermometerConfig())  # refused before any file
        if not isinstance(checkpoints, Checkpoints):
            checkpoints = Checkpoints(self.run_dir, self._checkpoint_config(checkpoints or CheckpointConfig()))
        self.checkpoints = checkpoints
        self.therm = Thermometer(model, self.run_dir, tcfg, sinks=sinks, start_step=1)
        self.store = self.therm.store  # rank 0 only
        if self.rank0:  # what `thermo supervise` repairs with from outside: the same settings
            self.store.set_meta("guard", asdict(self.config))
            self.store.set_meta("detector", self.detector.config.to_dict())
        self.blacklist = Blacklist.load(self.run_dir) if self.rank0 else None
        self.rollbacks = _dist.from_rank0(self._past_rollbacks())  # every rank gives up alike
        self.last_record = None  # the newest flushed StepRecord (rank 0), for progress displays
        # The dataset's size, for `GuardConfig.max_blacklist_fraction` (None: no cap); the Guard
        # sets it from its sampler.
        self.num_samples: int | None = None
        # Ids this process blacklisted without finding them toxic (the window fall-back): a
        # give-up takes them out again, so that only samples found toxic stay blacklisted.
        self._unproven: set[int] = set()
        self._replay_detector: Detector | None = None  # set while a replay runs
        self._beats = 0  # heartbeats written by this process (`heartbeat`'s seq)

    def _checkpoint_config(self, cfg: CheckpointConfig) -> CheckpointConfig:
        """Retention must keep a checkpoint from before the furthest onset the detector reports."""
        need = self.detector.config.onset_lookback + self.config.rollback_margin
        if cfg.horizon is None:
            return replace(cfg, horizon=need)
        if cfg.horizon < need:
            raise ValueError(
                f"CheckpointConfig.horizon={cfg.horizon} is shorter than the detector's onset look-back "
                f"plus the rollback margin ({need}): retention could delete every checkpoint a rollback "
                f"can return to. Leave it unset (None) or set it >= {need}")
        return cfg

    @staticmethod
    def _thermometer_config(cfg: ThermometerConfig) -> ThermometerConfig:
        """The detector judges each flush as it happens and its grad-norm rule needs the norm."""
        if cfg.sync_flush is False:
            raise ValueError("ThermometerConfig.sync_flush=False cannot be used under a Guard: it judges "
                             "every flush at once, so the rows must land at once. Leave it unset (None)")
        if not cfg.grad_norm:
            raise ValueError("ThermometerConfig.grad_norm=False cannot be used under a Guard: the detector's "
                             "grad-norm rule needs the norm of every step. Leave it True")
        return replace(cfg, sync_flush=True)

    def _past_rollbacks(self) -> int:
        if not self.rank0:
            return 0
        ev = self.store.events()
        return int((ev["kind"] == "rollback").sum()) if len(ev) else 0

    def record(self, step: int, loss, grad_norm, **scalars) -> Verdict | None:
        """Record `step`; at a flush, write the ledger and judge. Returns the verdict (every rank
        gets rank 0's) or None."""
        if self._replay_detector is not None:
            raise RuntimeError("Watch.record during a replay: use Watch.replay_record")
        flushes = self.therm.flushes
        records = self.therm.step(loss, grad_norm=grad_norm, step=step, **scalars)
        return self._judge(step, flushes, records)

    def flush(self, step: int) -> Verdict | None:
        """Flush and judge now, whatever the ring holds: before a checkpoint of `step`, so that
        what the checkpoint holds is in the store and the ledger too (a crash after it loses no
        recorded step). Returns the verdict (every rank gets rank 0's) or None."""
        flushes = self.therm.flushes
        return self._judge(step, flushes, self.therm.flush(wait=True))

    def _judge(self, step: int, flushes: int, records: list) -> Verdict | None:
        if self.therm.flushes == flushes:  # nothing was flushed: the same on every rank
            return None
        rows = self.ledger.pop_unwritten()
        pending = None
        if self.rank0:
            self.store.write_ledger(self.therm.attempt, rows)
            if records:
                self.last_record = records[-1]
                pending = self.detector.update(records)
        verdict = _dist.from_rank0(pending)
        if verdict is None:
            self.checkpoints.promote(step)
        return verdict

    def plan(self, verdict: Verdict, now: int, ahead: list[list[int]] = (), *, blacklist: bool = True) -> Plan:
        """What a verdict costs: record it, give up past `max_rollbacks`, mark the checkpoints
        written after the onset bad, pick the newest good one before ``onset - rollback_margin``
        (or before the onset), and find the suspects: the samples of ``[onset - skip_before,
        detection + skip_after]`` read so far (`now` is the last step read) plus the batches
        `ahead` of it.

        Args:
            blacklist: blacklist the suspects now (loops that cannot replay, and the fall-back).
                The Guard passes False, replays, and blacklists only what the replay found
                toxic (`blacklist_toxic`).

        Raises:
            DivergenceError: past `max_rollbacks`, with no good checkpoint before the onset, or
                when blacklisting the suspects would pass `max_blacklist_fraction`.
        """
        cfg = self.config
        if self.rank0:
            self.store.event("verdict", verdict.message, step=verdict.detection_step, **verdict.to_dict())
            log.warning("thermo: %s", verdict.message)
        if self.rollbacks >= cfg.max_rollbacks:
            self.give_up(verdict)
        self.checkpoints.mark_bad(verdict.onset_step)
        target = rollback_target(self.checkpoints, verdict, cfg.rollback_margin)
        if target is None:
            self.give_up(verdict, "no good checkpoint from before the onset")
        first, last = skip_window(verdict, target.step, cfg.skip_before, cfg.skip_after)
        ids = set(self.ledger.ids_for(first, min(last, now)))
        for batch in ahead[: max(0, last - now)]:
            ids.update(batch)
        ids = sorted(ids)
        if blacklist:
            self.blacklist_window(verdict, ids)
        self.rollbacks += 1
        return Plan(verdict, target, ids, first, last)

    def blacklist_window(self, verdict: Verdict, ids: list[int]) -> None:
        """Blacklist a verdict's whole suspect window (no replay told the toxic samples apart).
        These ids are not proven toxic: a give-up takes them out again."""
        self._check_cap(verdict, ids)
        if self.rank0:
            added = self.blacklist.add(ids, reason=verdict.message, verdict=verdict.to_dict(), source="guard")
            self._unproven.update(added)

    def blacklist_toxic(self, verdict: Verdict, ids: list[int], why: str) -> None:
        """Blacklist the samples a replay found toxic."""
        if not ids:
            return
        self._check_cap(verdict, ids)
        if self.rank0:
            self.blacklist.add(ids, reason=f"{why}; {verdict.message}", verdict=verdict.to_dict(), source="guard")
            self._unproven.difference_update(ids)

    def _check_cap(self, verdict: Verdict, ids: list[int]) -> None:
        """Give up rather than blacklist more than `max_blacklist_fraction` of the dataset.
        Rank 0 decides (it holds the blacklist); every rank gives up alike."""
        n = self.num_samples
        over = None
        if self.rank0 and n:
            total = len(self.blacklist.ids | set(ids))
            cap = self.config.max_blacklist_fraction
            if total > cap * n:
                over = (f"blacklisting {len(ids)} more samples would leave {total} of {n} "
                        f"({total / n:.1%}) blacklisted, over max_blacklist_fraction={cap:g}; the cause "
                        "is likely not the data (try a lower learning rate or a longer warm-up), or raise "
                        "GuardConfig.max_blacklist_fraction if the data really is that bad")
        over = _dist.from_rank0(over)
        if over is not None:
            self.give_up(verdict, over)

    def log_rollback(self, plan: Plan, now: int, action: str, lr_scale: float = 1.0,
                     cause: dict | None = None) -> None:
        """The ``rollback`` event (`action`: ``"rollback"`` in process, ``"stop"`` to resume).

        Args:
            cause: the replay's finding (`thermo.guard.replay.Finding.to_dict`); None: the suspect
                window was blacklisted whole.
        """
        if not self.rank0:
            return
        v, t = plan.verdict, plan.target.step
        what = (f"rolled back from step {now} to checkpoint {t}" if action == "rollback"
                else f"stopped at step {now} to resume from checkpoint {t}")
        if cause is None or cause["cause"] == "unattributed":  # the suspect window, whole
            ids = plan.ids
        else:
            ids = cause["toxic"] if cause["cause"] == "data" else []
        if cause is None:
            why = f"skipping {len(ids)} samples of steps {plan.first}..{plan.last}"
        else:
            why = (f"cause: {cause['cause']} ({cause['summary']}); blacklisted {len(ids)} of {len(plan.ids)} "
                   f"suspects; the replay took {cause['steps_replayed']} steps, {cause['evals']} passes, "
                   f"{cause['seconds']:.1f} s")
        self.store.event(
            "rollback", f"{what}; {why}",
            step=now, from_step=now, to_step=t, onset_step=v.onset_step, detection_step=v.detection_step,
            blacklisted=ids, n_blacklisted=len(ids), lr_scale=lr_scale, rollback=self.rollbacks,
            action=action, cause=None if cause is None else cause["cause"],
            suspects=len(plan.ids), replay=cause,
        )
        log.warning("thermo: %s; %s", what, why)

    def heartbeat(self, step: int, ids: list[int] | None = None) -> None:
        """What `thermo supervise` watches: the step in progress and (when the host knows them
        without a sync) its sample ids. No fsync: it only has to be fresh, not durable. ``seq``
        counts this process's beats: the supervisor, maybe on another host, judges staleness by
        when it last saw the beat change, by its own clock; ``time`` (this host's clock) and
        ``host`` are for people."""
        if not self.rank0:
            return
        self._beats += 1
        path = RunDir(self.run_dir).heartbeat
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "seq": self._beats,
                                   "step": step, "attempt": self.therm.attempt, "ids": ids or [],
                                   "time": time.time()}))
        os.replace(tmp, path)

    def rewind(self, step: int, reason: str) -> None:
        """Continue the record after checkpoint `step`: a new attempt on the store's timeline."""
        attempt = self.store.begin_attempt(step, reason) if self.rank0 else 0
        self.therm.load_state_dict({"step": step + 1, "attempt": attempt})
        self.detector.rewind(step)
        self.ledger.rewind(step)

    def resumed(self, step: int) -> None:
        """This launch resumed from checkpoint `step`: the detector gets back the history it had
        (the stored records up to `step`), so it is not blind for a warm-up after every restart."""
        if self.rank0:
            first = step - self.detector.horizon
            history = [r for r in self.store.records(after_step=first) if r.step <= step]
            self.detector.update(history)  # a verdict in there is an old one: rewind unlatches it
        self.rewind(step, "restart")
        if self.rank0:
            self.store.event("restart", f"resumed from checkpoint {step}", step=step, reason="resume",
                             checkpoint=step)
            log.info("thermo: resumed from checkpoint %d", step)

    def newest_usable(self) -> CheckpointEntry | None:
        return newest_usable(self.checkpoints)

    # -- replay ------------------------------------------------------------------------------

    @contextmanager
    def replaying(self, after_step: int):
        """While a replay of the steps after `after_step` runs: the thermometer records into
        memory only (no store, no sinks), a copy of the detector rewound to `after_step` judges
        the replayed steps, nothing is promoted; on exit the thermometer's position is back where
        it was. Every rank enters it together."""
        therm = self.therm
        store, sinks, state = therm.store, therm.sinks, therm.state_dict()
        therm.flush(wait=True)  # the ring holds nothing of the training steps during the replay
        therm.store, therm.sinks = None, []
        if self.rank0:
            self._replay_detector = copy.deepcopy(self.detector)
            self._replay_detector.rewind(after_step)
        else:
            self._replay_detector = Detector(self.detector.config)  # a placeholder: rank 0 judges
        try:
            yield
        finally:
            therm.flush(wait=True)  # nothing of the replay stays in the ring
            therm.store, therm.sinks = store, sinks
            therm.load_state_dict(state)
            self._replay_detector = None

    def replay_record(self, step: int, loss, grad_norm, **scalars) -> dict:
        """Record one replayed step and judge it at once (a flush per step: a host sync, fine
        off the hot path). Returns, on every rank alike, ``{"loss", "grad_norm", "skipped",
        "verdict"}`` (the verdict a `Verdict` or None)."""
        det = self._replay_detector
        self.therm.step(loss, grad_norm=grad_norm, step=step, **scalars)
        records = self.therm.flush(wait=True)
        out = None
        if self.rank0:
            rec = [r for r in records if r.step == step][-1]
            verdict = det.update([rec])
            out = {"loss": rec.scalars.get("loss"), "grad_norm": rec.scalars.get("grad_norm"),
                   "skipped": bool(rec.scalars.get("skipped", 0.0)), "verdict": verdict}
        return _dist.from_rank0(out)

    def replay_forget(self, step: int) -> None:
        """Forget the replayed `step` and what followed (it is redone without some samples)."""
        if self.rank0:
            self._replay_detector.rewind(step - 1)

    def give_up(self, verdict: Verdict, why: str | None = None):
        hint = ""
        if why is None:
            why = f"{self.rollbacks} rollbacks (max_rollbacks={self.config.max_rollbacks})"
            if self.rollbacks:
                hint = (". Rolling back and skipping data did not cure it, so the cause is likely not the "
                        "data: try a lower learning rate or a longer warm-up")
        msg = f"thermo gave up: {why}; last verdict: {verdict.message}{hint}"
        if self.rank0:
            released = self.blacklist.remove(self._unproven) if self._unproven else []
            self._unproven.clear()
            self.store.event("give_up", msg, step=verdict.detection_step, reason=why,
                             released=len(released))
            log.error("%s", msg)
        raise DivergenceError(msg)

    def close(self) -> None:
        """Flush, judge the last partial window (nothing acts on it any more, but a verdict there
        is recorded and condemns the checkpoints after its onset) and remove the hooks."""
        records = self.therm.flush(wait=True)
        verdict = self.detector.update(records) if self.rank0 and records else None
        if verdict is not None:
            self.store.event("verdict", f"after the last step: {verdict.message}",
                             step=verdict.detection_step, **verdict.to_dict())
            warnings.warn(f"thermo: the run ended diverging: {verdict.message}", RuntimeWarning, stacklevel=3)
        verdict = _dist.from_rank0(verdict)
        if verdict is not None:
            self.checkpoints.mark_bad(verdict.onset_step)
        self.therm.close()


@dataclass(frozen=True)
class Plan:
    """A verdict's repair, decided by `Watch.plan`: where to go back to and what to skip."""

    verdict: Verdict
    target: CheckpointEntry
    ids: list[int]
    first: int
    last: int


def rollback_target(checkpoints: Checkpoints, verdict: Verdict, margin: int) -> CheckpointEntry | None:
    """The newest good checkpoint before ``onset - margin``, else before the onset, else None.
    A checkpoint of step s holds update s, made from the batch of step s: the newest one
    untouched by the onset's batch is onset - 1. A collective (rank 0 reads the manifest)."""
    return (checkpoints.newest_good(before_step=verdict.onset_step - margin)
            or checkpoints.newest_good(before_step=verdict.onset_step))


def skip_window(verdict: Verdict, target_step: int, before: int, after: int) -> tuple[int, int]:
    """The steps whose samples a verdict blacklists: ``[onset - before, detection + after]``,
    never at or before the restored step (those batches are in its weights already)."""
    return max(verdict.onset_step - before, target_step + 1), verdict.detection_step + after


def newest_usable(checkpoints: Checkpoints) -> CheckpointEntry | None:
    """After a restart: the newest intact checkpoint not marked bad (a crash says nothing
    against the newest pending one; the supervisor marks bad what a verdict condemns). Rank 0
    decides; every rank gets its answer."""
    found = None
    if _dist.is_rank0():
        for e in sorted(checkpoints.entries, key=lambda e: -e.step):
            if e.health == "bad":
                continue
            why = checkpoints.torn(e)
            if why is None:
                found = e
                break
            warnings.warn(f"thermo: checkpoint {checkpoints.run_dir / e.path} is unusable ({why}); "
                          "resuming from an older one", RuntimeWarning, stacklevel=3)
    return _dist.from_rank0(found)
