"""Lightning: a `Callback` that watches ``Trainer.fit`` and, on a verdict, stops the run with a
resumable state and a blacklist that the next launch honours.

Why stop rather than roll back in place: Lightning's loop owns the data iterator and its step
counters, and a callback cannot rewind them; ``fit(ckpt_path=...)`` resumes reliably. So the
callback writes Lightning checkpoints (``trainer.save_checkpoint``, the full training state) into
thermo's checkpoint folders, judges them with thermo's manifest (pending, good, bad), and on a
verdict picks the newest good one before the onset, blacklists the samples of the onset..
detection steps and stops the trainer on every rank. The next launch resumes from
`resume_path` and reads a `thermo.integrations.BlacklistDataset`, which leaves those samples out.
What it does not give: the data stream after the relaunch is Lightning's for the shorter
dataset, not the stream a run that never saw those samples would have read (the `Guard` and
`DeepSpeedGuard` give that, in loops thermo owns).

Records, without a host sync between flushes: per-layer extremes (the thermometer's hooks),
``loss`` (the step's ``training_step`` loss, summed over accumulated micro-batches as Lightning
scales them) and ``grad_norm`` (in ``on_before_optimizer_step``, before Lightning clips; exact
under single-device, DDP and FSDP2/ModelParallel strategies, whose gradients are whole or
DTensors). Rank 0 decides at each flush and every rank gets the decision (one broadcast), so all
ranks stop together.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from thermo.checkpoints import CheckpointConfig, Checkpoints
from thermo.detector import DetectorConfig
from thermo.guard import GuardConfig
from thermo.guard import newest_usable
from thermo.integrations import _require, _Watch, batch_ids
from thermo.probes import grad_norm_and_nonfinite
from thermo.rundir import RunDir
from thermo.thermometer import ThermometerConfig

_require("lightning", "lightning", "lightning")
from lightning.pytorch.callbacks import Callback  # noqa: E402

__all__ = ["ThermoCallback", "resume_path", "LightningBackend"]

CKPT_NAME = "lightning.ckpt"


class LightningBackend:
    """A `CheckpointBackend` writing ``trainer.save_checkpoint(folder/lightning.ckpt)``: weights,
    optimizers, schedulers, loop progress and callback states, as Lightning resumes them. It is
    loaded by Lightning itself (``fit(ckpt_path=resume_path(run_dir))``), not in process."""

    name = "lightning"

    def __init__(self, trainer):
        self.trainer = trainer

    def save(self, path: Path, model, optimizer, scheduler, rng: bool) -> None:
        self.trainer.save_checkpoint(path / CKPT_NAME)  # a collective; rank 0 writes

    def load(self, path: Path, model, optimizer, scheduler, rng: bool) -> None:
        raise NotImplementedError(
            f"a Lightning checkpoint is loaded by Lightning: trainer.fit(..., ckpt_path={str(path / CKPT_NAME)!r})"
        )

    def torn(self, path: Path) -> str | None:
        f = path / CKPT_NAME
        if not f.is_file():
            return f"{CKPT_NAME} is missing: the save did not finish or files were deleted"
        if not zipfile.is_zipfile(f):  # torch.save writes a zip; a cut file has no end record
            return f"{CKPT_NAME} is truncated"
        return None


def resume_path(run_dir: str | os.PathLike, folder: str = RunDir.CHECKPOINTS) -> str | None:
    """The checkpoint the next ``trainer.fit`` resumes from: the newest intact one not marked bad
    (after a stop, the good one before the verdict's onset). None before the first launch.

    Example:
        >>> trainer.fit(model, datamodule=dm, ckpt_path=resume_path("runs/exp1"))
    """
    ckpts = Checkpoints(run_dir, CheckpointConfig(folder=folder), backend=LightningBackend(None))
    entry = newest_usable(ckpts)
    return None if entry is None else str(Path(run_dir) / entry.path / CKPT_NAME)


class ThermoCallback(Callback):
    """Thermometers, divergence detection and stop-with-blacklist for ``lightning.Trainer``.

    Args:
        run_dir: the thermo run directory (store, manifest, blacklist, checkpoints).
        config: the escalation (`GuardConfig`: ``checkpoint_every``, ``rollback_margin``,
            ``skip_before``/``skip_after``, ``max_rollbacks``). Its rung-1 fields do not apply.
        thermometer, detector: configuration of each part.
        checkpoints: a `CheckpointConfig` (``keep_last``, ``good_after``).
        ids_fn: batch -> its sample ids; default: what `BlacklistDataset` put in it (the
            ``"sample_id"`` key of a dict batch, the last element of a tuple batch).
        sinks: extra record sinks (W&B).

    After a stop, ``callback.verdict`` is the verdict and ``callback.stopped`` is True; after
    `max_rollbacks` stops, `thermo.DivergenceError` is raised instead.

    Example:
        >>> from thermo.integrations import BlacklistDataset
        >>> from thermo.integrations.lightning import ThermoCallback, resume_path
        >>> train = DataLoader(BlacklistDataset(dataset, "runs/exp1"), batch_size=32, shuffle=True)
        >>> trainer = L.Trainer(max_steps=10_000, callbacks=[ThermoCallback("runs/exp1")])
        >>> trainer.fit(model, train, ckpt_path=resume_path("runs/exp1"))

    Records the `thermo.Thermometer` keys, the ledger of sample ids, and the Guard's events.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        config: GuardConfig | None = None,
        thermometer: ThermometerConfig | None = None,
        detector: DetectorConfig | None = None,
        checkpoints: CheckpointConfig | None = None,
        ids_fn: Callable[[Any], Any] | None = None,
        sinks: Sequence[Any] = (),
    ):
        self.run_dir = Path(run_dir)
        self.config = config or GuardConfig()
        self._therm_cfg, self._det_cfg, self._ckpt_cfg = thermometer, detector, checkpoints
        self.ids_fn = ids_fn or batch_ids
        self.sinks = sinks
        self.watch: _Watch | None = None
        self.verdict = None
        self._reset_step()

    @property
    def stopped(self) -> bool:
        return self.verdict is not None

    def _reset_step(self) -> None:
        self._loss = None  # sum of the micro-batch losses of this step (device)
        self._ids: list[Any] = []
        self._grad_norm = None

    # -- Lightning hooks ---------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        ckpts = Checkpoints(self.run_dir, self._ckpt_cfg, backend=LightningBackend(trainer))
        self.watch = _Watch(pl_module, self.run_dir, config=self.config, thermometer=self._therm_cfg,
                            detector=self._det_cfg, checkpoints=ckpts, sinks=self.sinks)
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        self._last_step = trainer.global_step
        self._reset_step()
        if not self.watch.begin(trainer.global_step):
            ckpts.save(0, pl_module)  # the initial state: always a checkpoint to go back to
            ckpts.promote(ckpts.config.good_after)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Gradients are whole here (accumulated, reduced over ranks) and not yet clipped.
        self._grad_norm, _ = grad_norm_and_nonfinite(self._params)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning divides each micro-batch loss by the accumulation count: the sum is the mean.
            loss = loss.detach().float()
            self._loss = loss if self._loss is None else self._loss + loss
        self._ids.append(self.ids_fn(batch))
        step = trainer.global_step
        if step == self._last_step:  # accumulating: the optimizer has not stepped yet
            return
        self._last_step = step
        ids = torch.cat([torch.as_tensor(i).reshape(-1) for i in self._ids])
        verdict = self.watch.record(step, self._loss, self._grad_norm, ids)
        self._reset_step()
        metrics = self.watch.fresh_metrics(step)
        if metrics:  # rank 0, at a flush: through the trainer's own loggers (CSV, TensorBoard, W&B...)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if verdict is not None:
            self.watch.stop(verdict)  # raises DivergenceError past max_rollbacks
            self.verdict = verdict
            trainer.should_stop = True
            return
        if step % self.config.checkpoint_every == 0:
            self.watch.checkpoints.save(step, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()

    def close(self) -> None:
        """Flush and remove every hook (idempotent); the model is left as it was."""
        if self.watch is not None:
            self.watch.close()
