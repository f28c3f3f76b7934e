"""`Guard`: the plugin for loops thermo owns; rung 1 on the device, rollbacks through `Watch`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from thermo import _dist
from thermo.checkpoints import CheckpointConfig, Checkpoints
from thermo.data import ResumableSampler, StatefulLoader
from thermo.detector import DetectorConfig, Verdict
from thermo.guard.config import EXIT_PREEMPTED, GuardConfig
from thermo.guard.preempt import Preempted, Preemption
from thermo.guard.qkclip import QKClip, qk_clip_thermometer
from thermo.guard.skip import _DeviceSkip
from thermo.guard.watch import Watch
from thermo.probes import grad_norm_and_nonfinite, unwrap
from thermo.thermometer import ThermometerConfig

log = logging.getLogger("thermo")


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

    def local(self, ids: list[int]) -> list[int]:
        """This rank's slice of a global batch (what training fetches on this rank)."""
        return self.data.local(ids) if isinstance(self.data, ResumableSampler) else list(ids)

    @property
    def num_samples(self) -> int | None:
        if isinstance(self.data, ResumableSampler):
            return self.data.num_samples
        try:
            return len(self.data.dataset)
        except (AttributeError, TypeError):
            return None

    def peek(self, n: int) -> list[list[int]]:
        return self.data.peek(n) if isinstance(self.data, ResumableSampler) and n > 0 else []

    def set_blacklist(self, ids) -> None:
        self.data.set_blacklist(ids)

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)
        self._iter = None


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
        loss_fn: ``batch -> loss``, the forward of your step (the mean loss over the batch it
            is given, under the autocast your loop uses): what the replay runs to find a
            verdict's cause (`GuardConfig.replay`). Without it a verdict blacklists the samples
            of its whole suspect window. The replay calls it on your batches, on single samples
            and on subsets; it may read ``guard.step`` (the step being replayed).
        clip_grad_norm: the max norm your loop clips the gradients to, if it clips, so that the
            replay's updates are your loop's.

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

    Preemption: a signal of ``config.preempt_signals`` (SIGTERM, SIGUSR1) makes `after_step`
    checkpoint a step boundary on every rank alike, close the Guard and raise `Preempted`, a
    `SystemExit` with code `EXIT_PREEMPTED` (uncaught, the process exits with it). The checkpoint
    is pending: it turns good only after healthy steps follow it in the relaunched run.
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
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
        clip_grad_norm: float | None = None,
    ):
        self.data = _Data(data, fetch)
        self.loss_fn, self.clip_grad_norm = loss_fn, clip_grad_norm
        thermometer = qk_clip_thermometer(config, thermometer)  # QK-Clip reads per-head logits
        self.watch = w = Watch(model, run_dir, config=config, thermometer=thermometer, detector=detector,
                               checkpoints=checkpoints, sinks=sinks)
        self.run_dir, self.config, self.checkpoints, self.therm = w.run_dir, w.config, w.checkpoints, w.therm
        self.store, self.rank0 = w.store, w.rank0
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.params = self._params = [p for p in unwrap(model).parameters() if p.requires_grad]
        w.num_samples = self.data.num_samples
        self.skip = _DeviceSkip(self.config, optimizer, self._params, self.therm.buffer.device)
        self.qk_clip = QKClip(self.therm, self.config.qk_clip_tau) if self.config.qk_clip_tau else None
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
        self._flushes = self.therm.flushes  # a flush since the last step: a sync point (preemption)
        self.preemption = Preemption(self.config.preempt_signals, self.therm.buffer.device)

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
        skipped, scalars = self.decide(loss, grad_norm)
        self._verdict = self.watch.record(self.step, loss, grad_norm, **scalars)
        return skipped

    def decide(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Rung 1 on the device, and the scalars the step's record carries besides the loss and
        the grad norm: in training and in a replay alike."""
        skipped = self.skip(loss, grad_norm)
        # QK-Clip takes this step's per-head logits before `record` moves them to the ring.
        hot = {} if self.qk_clip is None else {"qk_clip_heads": self.qk_clip.capture()}
        return skipped, {"skipped": skipped, **hot}

    def after_step(self) -> None:
        """After ``optimizer.step()`` (and the scheduler's): checkpoint, act on a verdict.

        Raises:
            Preempted: a preemption signal was agreed on at this boundary; this step's checkpoint
                is written on every rank and the Guard is closed.
            DivergenceError: the Guard gave up (see `GuardConfig.max_rollbacks`).
        """
        self.after_update()
        verdict, self._verdict = self._verdict, None
        if verdict is not None:
            self._rollback(verdict)
            return
        checkpoint = self.step % self.config.checkpoint_every == 0
        flushed, self._flushes = self.therm.flushes != self._flushes, self.therm.flushes
        # A collective at the steps that synced anyway; the same decision on every rank.
        preempt = self.preemption.due(boundary=flushed or checkpoint)
        if checkpoint or preempt:
            # What the checkpoint holds goes to the store first (checkpoint_every need not be a
            # multiple of flush_every); a verdict in those steps is acted on instead.
            verdict = self.watch.flush(self.step)
            if verdict is not None:
                self._rollback(verdict)
                return
            self._save(self.step)
        if preempt:
            self._preempted()
        self.step += 1

    def after_update(self) -> None:
        """What follows every applied update, in training and in a replay alike."""
        self.skip.restore()  # a skipped step's update undone on the device (skip_mode="snapshot")
        if self.qk_clip is not None:
            self.qk_clip.apply(self.skip.flag)  # after the update (not a skipped one), before checkpoints

    def clip_and_norm(self) -> torch.Tensor:
        """The replay's clipping (`clip_grad_norm`): the pre-clip global gradient norm."""
        if self.clip_grad_norm:
            gn = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
            return gn.full_tensor() if isinstance(gn, DTensor) else gn
        gn, _ = grad_norm_and_nonfinite(self.params)
        return gn

    def _preempted(self):
        """The checkpoint of this step is written on every rank: record why, close, exit."""
        err = Preempted(self.step, self.preemption.decided)
        if self.rank0:
            self.store.event("preempt", str(err), step=self.step, signal=err.signal, checkpoint=self.step,
                             exit_code=EXIT_PREEMPTED)
            log.warning("thermo: %s", err)
        self.close()
        raise err

    # -- rollback ----------------------------------------------------------------------------

    def _rollback(self, verdict: Verdict) -> None:
        """Every rank together: restore the newest good checkpoint before the onset, replay the
        steps since to find the cause (when a `loss_fn` was given), blacklist what the cause
        warrants, back the LR off when the cause is the optimizer's, continue."""
        from thermo.guard.replay import Replay

        now, cfg = self.step, self.config
        replay = cfg.replay and self.loss_fn is not None and self.data.fetch is not None
        plan = self.watch.plan(verdict, now, ahead=self.data.peek(verdict.detection_step + cfg.skip_after - now),
                               blacklist=not replay)
        finding = None
        if replay:
            batches = self.watch.ledger.batches(plan.target.step + 1, now)
            out = self._restore(plan.target)
            self._rescale_lr(out["extra"])
            finding = Replay(self, plan, batches, now).run()
            if finding.cause == "data":
                self.watch.blacklist_toxic(verdict, finding.toxic, f"found toxic by replay ({finding.summary})")
            elif finding.cause == "unattributed":
                self.watch.blacklist_window(verdict, plan.ids)
        self._sync_blacklist()
        out = self._restore(plan.target)
        self._verdicts.append(verdict)
        self._backoff(finding.cause if finding is not None else None)
        self._rescale_lr(out["extra"])
        self.watch.rewind(plan.target.step, f"rollback: {verdict.message}")
        self.watch.log_rollback(plan, now, "rollback", self.lr_scale,
                                cause=None if finding is None else finding.to_dict())
        self.step = plan.target.step + 1

    def _backoff(self, cause: str | None) -> None:
        """Back the LR off at once when the replay put the cause on the optimizer, else after
        repeated rollbacks in one region (never for a cause found in the data or a transient)."""
        cfg = self.config
        if cfg.lr_backoff >= 1.0 or cause in ("data", "transient"):
            return
        last = self._verdicts[-1].detection_step
        near = [v for v in self._verdicts if abs(v.detection_step - last) <= cfg.lr_backoff_region]
        if cause == "numerics" or len(near) >= cfg.lr_backoff_after:
            self.lr_scale *= cfg.lr_backoff
            self._verdicts = []  # a fresh region count under the new LR

    def _rescale_lr(self, extra: dict) -> None:
        """Re-apply the LR scale in force to state restored from a checkpoint saved under
        another scale."""
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
        ranks = _dist.world_size()
        if self.rank0 and entry.world_size and entry.world_size != ranks:
            # The backend resharded it (DCP); the sampler's position is global, so the stream of
            # global batches goes on as if nothing changed.
            msg = f"checkpoint {entry.step} was written by {entry.world_size} ranks, resumed on {ranks}"
            self.store.event("resize", msg, step=entry.step, checkpoint=entry.step,
                             from_world_size=entry.world_size, to_world_size=ranks)
            log.info("thermo: %s", msg)
        self.step = entry.step + 1
        return True

    def _sync_blacklist(self) -> None:
        """Rank 0 reads blacklist.json; every rank gets the same set (samplers must agree)."""
        ids = None
        if self.rank0:
            self.watch.blacklist.reload()
            ids = self.watch.blacklist.ids  # an IdSet of ranges: never listed id by id
        ids = _dist.from_rank0(ids)
        self.data.set_blacklist(ids)

    def close(self) -> None:
        """Flush, remove the hooks and the optimizer mask. Every rank must call it."""
        if self._closed:
            return
        self._closed = True
        self.preemption.remove()
        self.watch.close()
        self.skip.remove()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
