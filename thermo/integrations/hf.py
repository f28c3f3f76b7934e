"""Hugging Face ``transformers.Trainer``: a `TrainerCallback` that watches training and, on a
verdict, stops the run with a resumable state and a blacklist that the next launch honours.

Why stop rather than roll back in place: the Trainer owns the data iterator (a local variable of
its epoch loop) and the step counters, and a callback can rewind neither; resuming from
``output_dir/checkpoint-N`` is what the Trainer does reliably. So on a verdict the callback

1. records the ``verdict``;
2. picks the newest *good* Hugging Face checkpoint before the onset (thermo's manifest judges the
   ``checkpoint-N`` folders the Trainer writes: pending until ``good_after`` healthy steps followed
   them, bad if written after the onset), or "start from scratch" if there is none;
3. renames every later ``checkpoint-N`` to ``thermo-bad-checkpoint-N``, so that the Trainer's own
   ``get_last_checkpoint(output_dir)`` (and ``resume_from_checkpoint=True``) finds the good one,
   and its ``save_total_limit`` rotation never counts them;
4. blacklists the sample ids read from the onset (less ``skip_before`` steps) to now, records the
   ``rollback`` event (``action="stop"``), and stops the Trainer on every rank.

The next launch wraps the training set in `thermo.integrations.BlacklistDataset` (which leaves
the blacklisted samples out and tags each item with its id) and resumes. What it does not give:
the data order after the relaunch is the Trainer's for the shorter dataset, not the stream a run
that never saw those samples would have read (the `Guard` and `DeepSpeedGuard` give that, in
loops thermo owns). Past ``max_rollbacks`` stops, `thermo.DivergenceError` is raised.

Preemption (``GuardConfig.preempt_signals``: SIGTERM, SIGUSR1): at the next step boundary every
rank agrees (as in the `Guard`: at a flush or a save step with several ranks, the step in progress
with one), the Trainer saves ``checkpoint-N`` and stops, and ``trainer.train()`` raises
`thermo.Preempted` (exit code 87). The checkpoint is pending until healthy steps follow it after
the relaunch (``resume_from_checkpoint=get_last_checkpoint(output_dir)``).

What is recorded, without a host sync between flushes: per-layer extremes (the thermometer's
hooks, attached at ``on_train_begin``, before the first compiled call), ``loss`` (the ``loss`` of
the model's output, read by a forward hook and averaged over accumulated micro-batches) and
``grad_norm`` (in ``on_pre_optimizer_step``, where the gradients are whole). The Trainer clips
*before* any callback sees the gradients, so give the clipping to thermo: set
``TrainingArguments(max_grad_norm=0)`` and ``ThermoCallback(clip_grad_norm=1.0)``; thermo clips at
the same point and records the norm before clipping. Exact under a single device, DDP and FSDP2;
for DeepSpeed use `thermo.integrations.deepspeed` in your own loop.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from thermo import _dist
from thermo.checkpoints import CheckpointConfig, Checkpoints
from thermo.detector import DetectorConfig
from thermo.guard import EXIT_PREEMPTED, GuardConfig, Preempted
from thermo.guard.preempt import Preemption
from thermo.integrations import _loss_of, _require, _Watch
from thermo.probes import grad_norm_and_nonfinite
from thermo.thermometer import ThermometerConfig

_require("transformers", "hf", "hf")
from transformers import TrainerCallback  # noqa: E402

__all__ = ["ThermoCallback", "HFCheckpointBackend"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's PREFIX_CHECKPOINT_DIR folders
BAD_PREFIX = "thermo-bad-"
POINTER_NAME = "hf.json"


class HFCheckpointBackend:
    """A `CheckpointBackend` for checkpoints the Trainer writes itself: thermo's folder holds only
    a pointer (``hf.json``) to ``output_dir/checkpoint-N``, so the manifest can judge it. Step 0
    points at nothing: "start from scratch". Loading is the Trainer's (``resume_from_checkpoint``).
    """

    name = "hf"

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)

    def save(self, path: Path, model, optimizer, scheduler, rng: bool) -> None:
        if not _dist.is_rank0():
            return
        step = int(path.name.removeprefix("step_"))
        path.mkdir(parents=True, exist_ok=True)
        (path / POINTER_NAME).write_text(json.dumps({"checkpoint": f"checkpoint-{step}" if step else None}))

    def load(self, path: Path, model, optimizer, scheduler, rng: bool) -> None:
        raise NotImplementedError("Hugging Face checkpoints are loaded by Trainer.train(resume_from_checkpoint=...)")

    def torn(self, path: Path) -> str | None:
        try:
            name = json.loads((path / POINTER_NAME).read_text())["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{POINTER_NAME} is missing or unreadable"
        if name is None:
            return None
        if not (self.output_dir / name / "trainer_state.json").is_file():
            return f"the Trainer's {self.output_dir / name} is gone (save_total_limit?) or unfinished"
        return None


class ThermoCallback(TrainerCallback):
    """Thermometers, divergence detection and stop-with-blacklist for ``transformers.Trainer``.

    Args:
        run_dir: the thermo run directory (store, manifest, blacklist); default
            ``<output_dir>/thermo``.
        config: the escalation (`GuardConfig`: ``rollback_margin``, ``skip_before``,
            ``skip_after``, ``max_rollbacks``). Checkpoints are the Trainer's (``save_steps``);
            ``checkpoint_every`` and the rung-1 fields do not apply.
        thermometer, detector: configuration of each part.
        checkpoints: a `CheckpointConfig` (``good_after``: healthy steps before a Trainer
            checkpoint counts as good; ``keep_last``: pointers kept).
        clip_grad_norm: clip the gradients to this global norm (in place of the Trainer's
            ``max_grad_norm``, which must then be 0); None: no clipping.
        id_key: the batch key holding the sample ids (`BlacklistDataset` puts them there). The
            callback removes it from the model's inputs, so the model never sees it.
        sinks: extra record sinks (W&B).

    After a stop, ``callback.verdict`` is the verdict and ``callback.stopped`` is True.

    Example:
        >>> from transformers.trainer_utils import get_last_checkpoint
        >>> from thermo.integrations import BlacklistDataset
        >>> from thermo.integrations.hf import ThermoCallback
        >>> args = TrainingArguments("out", max_grad_norm=0, save_steps=100)
        >>> trainer = Trainer(model, args, train_dataset=BlacklistDataset(train, "out/thermo"),
        ...                   callbacks=[ThermoCallback(clip_grad_norm=1.0)])
        >>> trainer.train(resume_from_checkpoint=get_last_checkpoint("out"))

    Records the `thermo.Thermometer` keys, the ledger of sample ids and the Guard's events.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        *,
        config: GuardConfig | None = None,
        thermometer: ThermometerConfig | None = None,
        detector: DetectorConfig | None = None,
        checkpoints: CheckpointConfig | None = None,
        clip_grad_norm: float | None = None,
        id_key: str = "sample_id",
        sinks: Sequence[Any] = (),
    ):
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"ThermoCallback.clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.config = config or GuardConfig()
        self._therm_cfg, self._det_cfg, self._ckpt_cfg = thermometer, detector, checkpoints
        self.clip_grad_norm = clip_grad_norm
        self.id_key = id_key
        self.sinks = sinks
        self.watch: _Watch | None = None
        self.verdict = None
        self.preempted: Preempted | None = None  # set when a signal stopped the Trainer
        self._preemption: Preemption | None = None
        self._handles: list[Any] = []
        self._metrics: dict[str, float] = {}  # thermo's values for the Trainer's next log
        self._reset_step()

    @property
    def stopped(self) -> bool:
        return self.verdict is not None

    def _reset_step(self) -> None:
        self._loss_sum: torch.Tensor | None = None  # device
        self._micro = 0
        self._ids: list[torch.Tensor] = []
        self._grad_norm = None

    # -- hooks on the model: the sample ids in, the loss out -----------------------------------

    def _pop_ids(self, module, args, kwargs):
        ids = kwargs.pop(self.id_key, None)
        if ids is not None and module.training:
            self._ids.append(ids)
        return args, kwargs

    def _take_loss(self, module, args, output):
        if not module.training:
            return
        loss = _loss_of(output)
        if loss is not None:
            loss = loss.detach().float().reshape(())
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._micro += 1

    # -- Trainer events ------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "max_grad_norm", 0) and args.max_grad_norm > 0:
            raise ValueError(
                f"thermo: TrainingArguments(max_grad_norm={args.max_grad_norm}) clips the gradients "
                "before any callback sees them, so thermo would record the clipped norm and miss "
                "gradient spikes. Set max_grad_norm=0 and pass ThermoCallback(clip_grad_norm="
                f"{args.max_grad_norm}): thermo clips at the same point and records the norm before clipping."
            )
        if getattr(args, "remove_unused_columns", False):
            raise ValueError(
                f"thermo: TrainingArguments(remove_unused_columns=True) drops the '{self.id_key}' "
                "that BlacklistDataset adds to each sample before thermo can read it. Set "
                "remove_unused_columns=False (thermo takes the ids out before the model sees them)."
            )
        if getattr(args, "deepspeed", None):
            raise NotImplementedError(
                "thermo's Trainer callback does not support the Trainer's DeepSpeed mode (the engine "
                "owns the gradients); use thermo.integrations.deepspeed.DeepSpeedGuard in your own loop"
            )
        self.output_dir = Path(args.output_dir)
        run_dir = self.run_dir or self.output_dir / "thermo"
        ckpts = Checkpoints(run_dir, self._ckpt_cfg, backend=HFCheckpointBackend(self.output_dir))
        self.watch = _Watch(model, run_dir, config=self.config, thermometer=self._therm_cfg,
                            detector=self._det_cfg, checkpoints=ckpts, sinks=self.sinks)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._handles = [model.register_forward_pre_hook(self._pop_ids, with_kwargs=True),
                         model.register_forward_hook(self._take_loss)]
        self._reset_step()
        if not self.watch.begin(state.global_step):
            ckpts.save(0, model)  # "start from scratch": always a state to go back to
            ckpts.promote(ckpts.config.good_after)
        self._flushes = self.watch.therm.flushes
        self._preemption = Preemption(self.config.preempt_signals, self.watch.therm.buffer.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._reset_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Gradients are whole here (accumulated, reduced over ranks); the Trainer's clipping is off.
        if self.clip_grad_norm is not None:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
            from torch.distributed.tensor import DTensor

            if isinstance(self._grad_norm, DTensor):
                self._grad_norm = self._grad_norm.full_tensor()
        else:
            self._grad_norm, _ = grad_norm_and_nonfinite(self._params)

    def on_step_end(self, args, state, control, **kwargs):
        loss = None if self._loss_sum is None else self._loss_sum / self._micro
        ids = torch.cat([i.reshape(-1) for i in self._ids]) if self._ids else None
        verdict = self.watch.record(state.global_step, loss, self._grad_norm, ids)
        self._reset_step()
        metrics = self.watch.fresh_metrics(state.global_step)
        if metrics:  # rank 0, at a flush: into the Trainer's next log (log_history and on_log)
            self._metrics = metrics
            control.should_log = True
        flushed, self._flushes = self.watch.therm.flushes != self._flushes, self.watch.therm.flushes
        if verdict is None:
            # A collective at the steps that synced anyway (a flush, a save): every rank alike.
            if self._preemption.due(boundary=flushed or control.should_save):
                self._preempt(state.global_step, control)
            return control
        target = self.watch.stop(verdict)  # raises DivergenceError past max_rollbacks
        if _dist.is_rank0():
            self._hide_checkpoints_after(target.step)
        _dist.barrier()
        self.verdict = verdict
        control.should_training_stop = True
        control.should_save = False  # never a checkpoint of the sick state
        control.should_evaluate = False
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer appended its row to log_history before the callbacks' on_log: thermo's
        # values join that row and `logs`, which the reporting callbacks after this one see.
        if self._metrics and logs is not None:
            logs.update(self._metrics)
            if state.log_history:
                state.log_history[-1].update(self._metrics)
            self._metrics = {}
        return control

    def on_save(self, args, state, control, **kwargs):
        # The Trainer has just written output_dir/checkpoint-<global_step>: let the manifest judge it.
        if self.watch is not None and not self.stopped:
            self.watch.checkpoints.save(state.global_step, None)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        if self.preempted is not None:
            raise self.preempted  # a SystemExit: the script exits EXIT_PREEMPTED unless it catches it

    def _preempt(self, step: int, control) -> None:
        """Save ``checkpoint-<step>`` (the Trainer does, right after this step) and stop."""
        self.preempted = Preempted(step, self._preemption.decided)
        if _dist.is_rank0():
            self.watch.store.event("preempt", str(self.preempted), step=step, signal=self.preempted.signal,
                                   checkpoint=step, exit_code=EXIT_PREEMPTED)
        control.should_save = True
        control.should_training_stop = True

    def _hide_checkpoints_after(self, step: int) -> None:
        for folder in self.output_dir.iterdir():
            m = _CHECKPOINT.match(folder.name)
            if m and folder.is_dir() and int(m.group(1)) > step:
                dest = folder.with_name(BAD_PREFIX + folder.name)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(folder, dest)

    def close(self) -> None:
        """Flush and remove every hook (idempotent); the model is left as it was."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._preemption is not None:
            self._preemption.remove()
        if self.watch is not None:
            self.watch.close()
