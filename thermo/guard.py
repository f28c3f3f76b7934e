"""`Guard`: the trainer plugin. Thermometers, detector, checkpoints and the data position in one
object that a training loop calls in three places.

The escalation ladder:

1. A step whose loss or gradient norm is non-finite, or spikes past ``mean + skip_z·σ`` of the
   last ``skip_window`` healthy steps (OLMo-core's rule), is skipped **on the device**: the
   decision is a tensor, and the update is masked by the optimizer (``found_inf`` of torch's
   fused Adam/AdamW/SGD, the way GradScaler does it) or, for other optimizers, by zeroing that
   step's gradients. No host sync.
2. On a detector verdict, every rank together: mark checkpoints written after the onset bad,
   restore the newest good checkpoint before ``onset - rollback_margin``, blacklist the sample
   ids of steps ``[onset - skip_before, detection + skip_after]``, scale the LR down after
   repeated rollbacks in one region, record events, continue.
3. After ``max_rollbacks``, raise `DivergenceError` (exit code `EXIT_DIVERGED` for a supervisor).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from thermo import _dist
from thermo._io import atomic_write_json
from thermo.checkpoints import CheckpointConfig, CheckpointEntry, Checkpoints
from thermo.data import BatchLedger, Blacklist, ResumableSampler, StatefulLoader
from thermo.detector import Detector, DetectorConfig, Verdict
from thermo.probes import grad_norm_and_nonfinite, unwrap
from thermo.thermometer import Thermometer, ThermometerConfig

# Exit status a training script uses when the guard gave up; `thermo supervise` knows it.
EXIT_DIVERGED = 86
HEARTBEAT_NAME = "heartbeat.json"


class DivergenceError(RuntimeError):
    """The guard rolled back `max_rollbacks` times and the run still diverges."""


@dataclass(frozen=True)
class GuardConfig:
    """The guard's escalation ladder.

    Attributes:
        checkpoint_every: steps between checkpoints.
        rollback_margin: roll back to a checkpoint at least this many steps before the onset.
        skip_before: blacklist the batches of this many steps before the onset (the onset is
            where the signal moved; the damage may have begun a little earlier).
        skip_after: blacklist this many batches after the detection step as well (data
            neighbouring a bad batch is often bad too: PaLM skipped 200-500 batches).
        max_rollbacks: give up (`DivergenceError`) after this many rollbacks.
        lr_backoff: multiply the learning rate by this after `lr_backoff_after` rollbacks
            within `lr_backoff_region` steps of each other (1.0 = never).
        lr_backoff_after: rollbacks in one region before the LR is scaled.
        lr_backoff_region: steps within which two verdicts count as the same region.
        skip_nonfinite: rung 1: skip steps with a non-finite loss or gradient norm on the device.
        skip_z: rung 1: also skip steps whose loss or grad norm exceeds mean + skip_z·σ of the
            last `skip_window` steps (None: only non-finite steps).
        skip_window: steps in that rolling window.
        skip_min_window: steps the window must hold before spikes are judged.
    """

    checkpoint_every: int = 100
    rollback_margin: int = 10
    skip_before: int = 20
    skip_after: int = 10
    max_rollbacks: int = 5
    lr_backoff: float = 0.5
    lr_backoff_after: int = 2
    lr_backoff_region: int = 500
    skip_nonfinite: bool = True
    skip_z: float | None = 6.0
    skip_window: int = 128
    skip_min_window: int = 32

    def __post_init__(self):
        for name in ("checkpoint_every", "skip_window", "lr_backoff_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"GuardConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rollback_margin", "skip_before", "skip_after", "max_rollbacks",
                     "lr_backoff_region", "skip_min_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"GuardConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.lr_backoff <= 1.0:
            raise ValueError(f"GuardConfig.lr_backoff must be in (0, 1], got {self.lr_backoff}")
        if self.skip_z is not None and self.skip_z <= 0:
            raise ValueError(f"GuardConfig.skip_z must be > 0 or None, got {self.skip_z}")
        if self.skip_min_window > self.skip_window:
            raise ValueError(
                f"GuardConfig.skip_min_window ({self.skip_min_window}) must be <= skip_window "
                f"({self.skip_window})"
            )


class _DeviceSkip:
    """Rung 1: decide on the device whether this step's update is applied, and mask it."""

    def __init__(self, cfg: GuardConfig, optimizer, params: list[nn.Parameter], device):
        self.cfg = cfg
        self.params = params
        # (loss, grad norm) of recent healthy steps; NaN = empty slot
        self.window = torch.full((2, cfg.skip_window), float("nan"), device=device)
        self.filled = 0  # host-side count of window writes: which slot is next, no sync
        self.flag = torch.zeros((), device=device)
        self.fused = _fused_optimizers(optimizer)
        for opt in self.fused:
            opt.found_inf = self.flag  # read by the fused kernels at optimizer.step()

    def __call__(self, loss: torch.Tensor, gnorm: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = torch.stack([loss.detach().float().reshape(()), gnorm.detach().float().reshape(())])
        bad = ~torch.isfinite(x).all() if cfg.skip_nonfinite else torch.zeros((), dtype=torch.bool, device=x.device)
        if cfg.skip_z is not None and self.filled >= cfg.skip_min_window:
            mean = self.window.nanmean(dim=1)
            std = (self.window - mean[:, None]).square().nanmean(dim=1).sqrt()
            bad = bad | (x > mean + cfg.skip_z * std).any()
        self.flag.copy_(bad)
        # Only healthy steps enter the window (a skipped slot keeps its old value).
        slot = self.window[:, self.filled % cfg.skip_window]
        slot.copy_(torch.where(bad, slot, torch.nan_to_num(x)))
        self.filled += 1
        if not self.fused:
            for p in self.params:  # other optimizers: drop this step's gradient on the device
                if p.grad is not None:
                    g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    g.copy_(torch.where(bad, 0.0, g))
        return self.flag

    def remove(self) -> None:
        for opt in self.fused:
            if getattr(opt, "found_inf", None) is self.flag:
                del opt.found_inf


def _fused_optimizers(optimizer) -> list:
    """The optimizers whose fused kernels honour ``found_inf`` (all of them, or none)."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's local optimizer
    fused_ok = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD))
    if fused_ok and all(g.get("fused") for g in inner.param_groups):
        return [inner]
    return []


class _Data:
    """The data position: a ResumableSampler + fetch, or a StatefulLoader + ids_fn."""

    def __init__(self, data, fetch):
        self.data, self.fetch = data, fetch
        self._iter = None
        if isinstance(data, ResumableSampler):
            if fetch is None:
                raise ValueError("Guard: with a ResumableSampler, pass fetch=callable(local_ids) -> batch "
                                 "(e.g. dataset.batch)")
        elif not isinstance(data, StatefulLoader):
            raise TypeError(f"Guard: data must be a ResumableSampler or a StatefulLoader, got {type(data).__name__}")

    def next(self) -> tuple[Any, list[int]]:
        if isinstance(self.data, ResumableSampler):
            ids = self.data.next_global_batch()
            return self.fetch(self.data.local(ids)), ids
        if self._iter is None:
            self._iter = iter(self.data)
        batch = next(self._iter)
        ids = self.data.ids_fn(batch)
        return batch, [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]

    def peek(self, n: int) -> list[list[int]]:
        return self.data.peek(n) if isinstance(self.data, ResumableSampler) and n > 0 else []

    def set_blacklist(self, ids) -> None:
        self.data.set_blacklist(ids)

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)
        self._iter = None


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
        self.checkpoints = (checkpoints if isinstance(checkpoints, Checkpoints)
                            else Checkpoints(self.run_dir, checkpoints))
        tcfg = replace(thermometer or ThermometerConfig(), sync_flush=True, grad_norm=True)
        self.therm = Thermometer(model, self.run_dir, tcfg, sinks=sinks, start_step=1)
        self.store = self.therm.store  # rank 0 only
        self.blacklist = Blacklist.load(self.run_dir) if self.rank0 else None
        self.rollbacks = broadcast(self._past_rollbacks())  # every rank gives up alike
        self.last_record = None  # the newest flushed StepRecord (rank 0), for progress displays

    def _past_rollbacks(self) -> int:
        if not self.rank0:
            return 0
        ev = self.store.events()
        return int((ev["kind"] == "rollback").sum()) if len(ev) else 0

    def record(self, step: int, loss, grad_norm, **scalars) -> Verdict | None:
        """Record `step`; at a flush, write the ledger and judge. Returns the verdict (every rank
        gets rank 0's) or None."""
        flushes = self.therm.flushes
        records = self.therm.step(loss, grad_norm=grad_norm, step=step, **scalars)
        if self.therm.flushes == flushes:  # the same on every rank
            return None
        rows = self.ledger.pop_unwritten()
        pending = None
        if self.rank0:
            self.store.write_ledger(self.therm.attempt, rows)
            if records:
                self.last_record = records[-1]
                pending = self.detector.update(records)
        verdict = broadcast(pending)
        if verdict is None:
            self.checkpoints.promote(step)
        return verdict

    def plan(self, verdict: Verdict, now: int, ahead: list[list[int]] = ()) -> Plan:
        """What a verdict costs: record it, give up past `max_rollbacks`, mark the checkpoints
        written after the onset bad, pick the newest good one before ``onset - rollback_margin``
        (or before the onset), and blacklist the samples of ``[onset - skip_before,
        detection + skip_after]`` read so far (`now` is the last step read) plus the batches
        `ahead` of it.

        Raises:
            DivergenceError: past `max_rollbacks`, or with no good checkpoint before the onset.
        """
        cfg = self.config
        if self.rank0:
            self.store.event("verdict", verdict.message, step=verdict.detection_step, **verdict.to_dict())
        if self.rollbacks >= cfg.max_rollbacks:
            self.give_up(verdict)
        self.checkpoints.mark_bad(verdict.onset_step)
        # A checkpoint of step s holds update s, made from the batch of step s: the newest one
        # untouched by the onset's batch is onset - 1.
        target = self.checkpoints.newest_good(before_step=verdict.onset_step - cfg.rollback_margin)
        if target is None:
            target = self.checkpoints.newest_good(before_step=verdict.onset_step)
        if target is None:
            self.give_up(verdict, "no good checkpoint from before the onset")
        # Batches at or before the target step are in its weights already: never theirs.
        first = max(verdict.onset_step - cfg.skip_before, target.step + 1)
        last = verdict.detection_step + cfg.skip_after
        ids = set(self.ledger.ids_for(first, min(last, now)))
        for batch in ahead[: max(0, last - now)]:
            ids.update(batch)
        ids = sorted(ids)
        if self.rank0:
            self.blacklist.add(ids, reason=verdict.message, verdict=verdict.to_dict(), source="guard")
        self.rollbacks += 1
        return Plan(verdict, target, ids, first, last)

    def log_rollback(self, plan: Plan, now: int, action: str, lr_scale: float = 1.0) -> None:
        """The ``rollback`` event (`action`: ``"rollback"`` in process, ``"stop"`` to resume)."""
        if not self.rank0:
            return
        v, t = plan.verdict, plan.target.step
        what = (f"rolled back from step {now} to checkpoint {t}" if action == "rollback"
                else f"stopped at step {now} to resume from checkpoint {t}")
        self.store.event(
            "rollback", f"{what}; skipping {len(plan.ids)} samples of steps {plan.first}..{plan.last}",
            step=now, from_step=now, to_step=t, onset_step=v.onset_step, detection_step=v.detection_step,
            blacklisted=plan.ids, n_blacklisted=len(plan.ids), lr_scale=lr_scale, rollback=self.rollbacks,
            action=action,
        )

    def heartbeat(self, step: int, ids: list[int] | None = None) -> None:
        """What `thermo supervise` watches: the step in progress and (when the host knows them
        without a sync) its sample ids. No fsync: it only has to be fresh, not durable."""
        if not self.rank0:
            return
        path = self.run_dir / HEARTBEAT_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "step": step, "attempt": self.therm.attempt,
                                   "ids": ids or [], "time": time.time()}))
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

    def newest_usable(self) -> CheckpointEntry | None:
        return newest_usable(self.checkpoints)

    def give_up(self, verdict: Verdict, why: str | None = None):
        why = why or f"{self.rollbacks} rollbacks (max_rollbacks={self.config.max_rollbacks})"
        msg = f"thermo gave up: {why}; last verdict: {verdict.message}"
        if self.rank0:
            self.store.event("give_up", msg, step=verdict.detection_step, reason=why)
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
        verdict = broadcast(verdict)
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
    return broadcast(found)


def broadcast(obj):
    """Rank 0's `obj` on every rank (the object itself without a process group)."""
    if not _dist.initialized() or _dist.world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)  # note: a host sync, once per flush
    return box[0]


class Guard:
    """Watches a training loop and repairs it: skip bad steps on the device, roll back to a good
    checkpoint and blacklist the batches behind a divergence, give up clearly.

    Args:
        model: the model (plain, DDP, FSDP2); the thermometer attaches to it.
        optimizer: its optimizer (a ZeroRedundancyOptimizer too). Fused torch Adam/AdamW/SGD get
            exact on-device step skipping.
        run_dir: the run directory (default: ``$THERMO_RUN_DIR``, set by ``thermo supervise``).
        data: a `ResumableSampler` (with `fetch`) or a `StatefulLoader`.
        fetch: local sample ids -> batch, for a ResumableSampler (e.g. ``dataset.batch``).
        scheduler: an LR scheduler, checkpointed and restored with the rest.
        config, thermometer, detector: configuration of each part.
        checkpoints: a `CheckpointConfig`, or a ready `Checkpoints` (e.g. one saving through a
            framework's own checkpointing).
        resume: continue from the newest usable checkpoint in `run_dir` if there is one.
        sinks: extra record sinks (W&B) for the thermometer.

    The loop::

        guard = thermo.Guard(model, opt, "runs/exp1", data=sampler, fetch=dataset.batch)
        for step, (x, y) in guard.batches(max_steps=10_000):
            _, loss = model(x, y)
            loss.backward()
            guard.after_backward(loss)       # records, decides rung 1 on the device
            opt.step(); sched.step()
            guard.after_step()               # checkpoints, detects, rolls back (all ranks)
            opt.zero_grad(set_to_none=True)
        guard.close()

    Steps are numbered from 1; checkpoint 0 is the initial state.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        run_dir: str | os.PathLike | None = None,
        *,
        data: ResumableSampler | StatefulLoader,
        fetch: Callable[[list[int]], Any] | None = None,
        scheduler: Any = None,
        config: GuardConfig | None = None,
        thermometer: ThermometerConfig | None = None,
        detector: DetectorConfig | None = None,
        checkpoints: CheckpointConfig | Checkpoints | None = None,
        resume: bool = True,
        sinks=(),
    ):
        self.data = _Data(data, fetch)
        self.watch = w = Watch(model, run_dir, config=config, thermometer=thermometer, detector=detector,
                               checkpoints=checkpoints, sinks=sinks)
        self.run_dir, self.config, self.checkpoints, self.therm = w.run_dir, w.config, w.checkpoints, w.therm
        self.store, self.rank0 = w.store, w.rank0
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self._params = [p for p in unwrap(model).parameters() if p.requires_grad]
        self.skip = _DeviceSkip(self.config, optimizer, self._params, self.therm.buffer.device)
        self.step = 1
        self.lr_scale = 1.0
        self._verdicts: list[Verdict] = []  # this process's verdicts, for LR back-off regions
        self._current_ids: list[int] = []
        self._verdict: Verdict | None = None  # decided at this step's flush, acted on after the update
        self._closed = False
        self._sync_blacklist()
        if not (resume and self._resume()):
            self._save(0)  # the initial state: always a checkpoint to go back to
            self.checkpoints.promote(self.checkpoints.config.good_after)  # nothing trained: healthy

    @property
    def rollbacks(self) -> int:
        return self.watch.rollbacks

    @property
    def last_record(self):
        """The newest flushed StepRecord (rank 0), for progress displays."""
        return self.watch.last_record

    # -- the three call points ---------------------------------------------------------------

    def batches(self, max_steps: int | None = None) -> Iterator[tuple[int, Any]]:
        """Yield (step, batch) until `max_steps` is reached. A rollback moves `step` back and the
        data position with it, so the loop simply carries on."""
        while max_steps is None or self.step <= max_steps:
            try:
                batch, ids = self.data.next()
            except StopIteration:  # a finite StatefulLoader ran out
                return
            self._current_ids = ids
            self.watch.ledger.record(self.step, ids)
            self.watch.heartbeat(self.step, ids)
            yield self.step, batch

    @property
    def batch_ids(self) -> list[int]:
        """The sample ids of the current step's global batch (every rank sees all of them)."""
        return self._current_ids

    def after_backward(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Record this step and decide rung 1 on the device. Call after ``loss.backward()`` and
        any gradient clipping, before ``optimizer.step()``.

        Args:
            loss: this rank's loss.
            grad_norm: the pre-clip global norm if you clip (what ``clip_grad_norm_`` returns).

        Returns:
            The device flag (1.0 = this step's update is skipped). Do not read it in the loop:
            that is a host sync.
        """
        if grad_norm is None:
            grad_norm, _ = grad_norm_and_nonfinite(self._params)
        elif isinstance(grad_norm, DTensor):  # clip_grad_norm_ under FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        skipped = self.skip(loss, grad_norm)
        self._verdict = self.watch.record(self.step, loss, grad_norm, skipped=skipped)
        return skipped

    def after_step(self) -> None:
        """After ``optimizer.step()`` (and the scheduler's): checkpoint, act on a verdict."""
        verdict, self._verdict = self._verdict, None
        if verdict is not None:
            self._rollback(verdict)
            return
        if self.step % self.config.checkpoint_every == 0:
            self._save(self.step)
        self.step += 1

    # -- rollback ----------------------------------------------------------------------------

    def _rollback(self, verdict: Verdict) -> None:
        now = self.step
        plan = self.watch.plan(verdict, now, ahead=self.data.peek(verdict.detection_step
                                                                  + self.config.skip_after - now))
        self._sync_blacklist()
        out = self._restore(plan.target)
        self._verdicts.append(verdict)
        self._apply_lr_scale(out["extra"])
        self.watch.rewind(plan.target.step, f"rollback: {verdict.message}")
        self.watch.log_rollback(plan, now, "rollback", self.lr_scale)
        self.step = plan.target.step + 1

    def _apply_lr_scale(self, extra: dict) -> None:
        """Back the LR off after repeated rollbacks in one region; re-apply the scale in force to
        state restored from a checkpoint saved under another scale."""
        cfg = self.config
        last = self._verdicts[-1].detection_step
        near = [v for v in self._verdicts if abs(v.detection_step - last) <= cfg.lr_backoff_region]
        if cfg.lr_backoff < 1.0 and len(near) >= cfg.lr_backoff_after:
            self.lr_scale *= cfg.lr_backoff
            self._verdicts = []  # a fresh region count under the new LR
        saved = float(extra.get("guard", {}).get("lr_scale", 1.0))
        factor = self.lr_scale / saved
        if factor != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
            if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = [b * factor for b in self.scheduler.base_lrs]

    # -- checkpoints, resume, bookkeeping --------------------------------------------------------

    def _save(self, step: int) -> None:
        guard = {"lr_scale": self.lr_scale, "lrs": [g["lr"] for g in self.optimizer.param_groups]}
        extra = {"thermometer": self.therm.state_dict(), "guard": guard}
        # Step 0 is the initial state: the optimizer has no state yet, and saving it would make
        # torch initialise it with a zero-LR step (advancing Adam's step count). Restoring step 0
        # empties the optimizer state instead.
        optimizer = self.optimizer if step > 0 else None
        self.checkpoints.save(step, self.model, optimizer, self.scheduler,
                              data=self.data.state_dict(), extra=extra)

    def _restore(self, entry) -> dict:
        initial = entry.step == 0
        out = self.checkpoints.restore(entry, self.model, None if initial else self.optimizer, self.scheduler)
        if initial:
            inner = getattr(self.optimizer, "optim", self.optimizer)  # ZeroRedundancyOptimizer
            inner.state.clear()
            for group, lr in zip(self.optimizer.param_groups, out["extra"]["guard"]["lrs"]):
                group["lr"] = lr
        self.data.load_state_dict(out["data"])
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def _resume(self) -> bool:
        entry = self.watch.newest_usable()
        if entry is None:
            return False
        out = self._restore(entry)
        self.lr_scale = float(out["extra"].get("guard", {}).get("lr_scale", 1.0))
        self.watch.resumed(entry.step)
        self.step = entry.step + 1
        return True

    def _sync_blacklist(self) -> None:
        """Rank 0 reads blacklist.json; every rank gets the same set (samplers must agree)."""
        ids = None
        if self.rank0:
            self.watch.blacklist.reload()
            ids = sorted(self.watch.blacklist.ids)
        ids = broadcast(ids)
        self.data.set_blacklist(ids)

    def close(self) -> None:
        """Flush, remove the hooks and the optimizer mask. Every rank must call it."""
        if self._closed:
            return
        self._closed = True
        self.watch.close()
        self.skip.remove()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
