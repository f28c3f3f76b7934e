"""DeepSpeed: the `Guard` around a ``deepspeed.initialize`` engine, rolling back through the
engine's own checkpoints (``engine.save_checkpoint`` / ``engine.load_checkpoint``).

The loop is thermo's (`DeepSpeedGuard.batches`), so a verdict is repaired in process exactly as
the Guard repairs one: every rank restores the newest good checkpoint before the onset, the
sampler moves back with it, the onset..detection batches are blacklisted and skipped, the run
goes on. Tested at ZeRO stage 2 on 2 ranks; stage 3 (same engine calls) was checked by hand.

The gradient norm is DeepSpeed's own: ``engine.get_global_grad_norm()`` after ``engine.step()``,
the pre-clip norm over all ranks. Under ZeRO it is a 0-d tensor (no host sync; a Python float
only on an overflowed step, ``inf``, where DeepSpeed had already synced), and it is passed to
the thermometer as it is. Note that DeepSpeed's ``step()`` itself reads its overflow check on
the host (``is_invalid_grad_norm`` -> ``bool(tensor)``) for fp32/fp16 and, with
``gradient_clipping``, clips; thermo adds no sync of its own between flushes.

Rung 1 of the Guard (masking one bad step on the device) needs the decision before the optimizer
step; DeepSpeed computes the norm inside its step, so that rung is DeepSpeed's here: for fp16
and fp32 (and bf16 with ``check_grad_overflow``) it skips a step whose gradients are not finite.
Spikes are left to the detector and rollback.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from thermo import _dist
from thermo._io import RunDirError, read_json
from thermo.checkpoints import STATE_NAME, CheckpointConfig, Checkpoints, _rng_state, _set_rng
from thermo.data import ResumableSampler, StatefulLoader
from thermo.detector import DetectorConfig
from thermo.guard import Guard, GuardConfig
from thermo.integrations import _require
from thermo.thermometer import ThermometerConfig

_require("deepspeed", "deepspeed", "deepspeed")

__all__ = ["DeepSpeedGuard", "EngineBackend"]


class EngineBackend:
    """A `CheckpointBackend` that writes a checkpoint folder with ``engine.save_checkpoint`` (tag =
    the folder name) and reads it with ``engine.load_checkpoint``: module, ZeRO optimizer
    partitions and the engine's LR scheduler, in DeepSpeed's own layout (so DeepSpeed's tools,
    ``zero_to_fp32.py`` included, work on it). Each rank's RNG goes to ``rng_rank<r>.pkl``.

    The engine always saves and loads its optimizer state; an optimizer state saved before the
    first step is empty, and loading it empties the optimizer (what restoring step 0 needs).

    Args:
        engine: the ``DeepSpeedEngine`` from ``deepspeed.initialize``.
    """

    name = "deepspeed"

    def __init__(self, engine):
        self.engine = engine

    def save(self, path: Path, model, optimizer, scheduler, rng: bool) -> None:
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        if rng:
            with open(path / f"rng_rank{_dist.rank()}.pkl", "wb") as f:
                pickle.dump(_rng_state(), f)

    def load(self, path: Path, model, optimizer, scheduler, rng: bool) -> None:
        loaded, _ = self.engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True,
            load_lr_scheduler_states=self.engine.lr_scheduler is not None,
        )
        if loaded is None:
            raise RunDirError(f"DeepSpeed could not load the checkpoint {path}")
        rng_file = path / f"rng_rank{_dist.rank()}.pkl"
        if rng and rng_file.is_file():
            with open(rng_file, "rb") as f:
                _set_rng(pickle.load(f))

    def torn(self, path: Path) -> str | None:
        model_files = sorted(path.glob("*model_states.pt"))
        if not model_files:
            return "no DeepSpeed *model_states.pt: the save did not finish or files were deleted"
        try:
            world = int(read_json(path / STATE_NAME, "checkpoint state", "").get("world_size", 1))
        except (RunDirError, AttributeError, TypeError, ValueError):
            return f"{STATE_NAME} is unreadable"
        optim_files = sorted(path.glob("*optim_states.pt"))
        if optim_files and len(optim_files) != world:
            return f"{len(optim_files)} DeepSpeed optimizer partitions for {world} ranks"
        for f in model_files + optim_files:
            if not zipfile.is_zipfile(f):  # torch.save writes a zip; a cut file has no end record
                return f"{f.name} is truncated"
        return None


class DeepSpeedGuard:
    """The `Guard` for a DeepSpeed engine: thermometers, detector, rollback through the engine's
    checkpoints, blacklisting and skipping of the batches behind a divergence.

    Args:
        engine: from ``deepspeed.initialize(model=..., optimizer=..., lr_scheduler=..., config=...)``.
        run_dir: the run directory (default ``$THERMO_RUN_DIR``).
        data: a `ResumableSampler` (with `fetch`) or a `StatefulLoader`: thermo's data position,
            which rolls back with the engine.
        fetch: local sample ids -> batch, for a ResumableSampler.
        config: the Guard's `GuardConfig` (its rung-1 fields are ignored: see the module notes).
        thermometer, detector: configuration of each part.
        checkpoints: a `CheckpointConfig` (the folders are written by the engine).
        resume: continue from the newest usable checkpoint in `run_dir` if there is one.
        sinks: extra record sinks (W&B).

    The loop (one call per optimizer step, after ``engine.step()``)::

        guard = DeepSpeedGuard(engine, "runs/ds", data=sampler, fetch=dataset.batch)
        for step, (x, y) in guard.batches(max_steps=1000):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            guard.after_step(loss)        # records; checkpoints; on a verdict, rolls back
        guard.close()

    Every rank runs the loop; every rank rolls back together (rank 0 decides). Records the
    Guard's keys and events (see `thermo.Guard`). Preemption is the Guard's: SIGTERM or SIGUSR1
    make `after_step` save through the engine at the next step boundary and raise
    `thermo.Preempted` (exit code 87).
    """

    def __init__(
        self,
        engine,
        run_dir: str | os.PathLike | None = None,
        *,
        data: ResumableSampler | StatefulLoader,
        fetch: Callable[[list[int]], Any] | None = None,
        config: GuardConfig | None = None,
        thermometer: ThermometerConfig | None = None,
        detector: DetectorConfig | None = None,
        checkpoints: CheckpointConfig | None = None,
        resume: bool = True,
        sinks: Sequence[Any] = (),
    ):
        if not hasattr(engine, "save_checkpoint") or not hasattr(engine, "get_global_grad_norm"):
            raise TypeError(
                f"DeepSpeedGuard takes the engine returned by deepspeed.initialize, got {type(engine).__name__}"
            )
        run_dir = run_dir if run_dir is not None else os.environ.get("THERMO_RUN_DIR")
        if run_dir is None:
            raise ValueError("DeepSpeedGuard needs a run directory: pass run_dir= or set THERMO_RUN_DIR")
        self.engine = engine
        ckpts = Checkpoints(run_dir, checkpoints, backend=EngineBackend(engine))
        # Rung 1 off: its mask must act before the optimizer step (see the module notes).
        cfg = replace(config or GuardConfig(), skip_nonfinite=False, skip_z=None)
        self.guard = Guard(
            engine.module, engine.optimizer, run_dir, data=data, fetch=fetch, scheduler=engine.lr_scheduler,
            config=cfg, thermometer=thermometer, detector=detector, checkpoints=ckpts, resume=resume, sinks=sinks,
        )

    def batches(self, max_steps: int | None = None) -> Iterator[tuple[int, Any]]:
        """Yield (step, batch) until `max_steps`; a rollback moves `step` and the data back."""
        return self.guard.batches(max_steps)

    def after_step(self, loss: torch.Tensor) -> None:
        """Record the step ``engine.step()`` just applied; checkpoint; act on a verdict.

        Args:
            loss: this rank's loss of the step (unscaled).
        """
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            raise RuntimeError(
                "DeepSpeedGuard: engine.get_global_grad_norm() is None, so DeepSpeed computed no "
                "gradient norm this step; call after_step after engine.step(), and leave the ZeRO "
                "gradient-norm computation on"
            )
        self.guard.after_backward(loss, grad_norm=grad_norm)
        self.guard.after_step()

    @property
    def step(self) -> int:
        """The step the next batch belongs to (steps count from 1)."""
        return self.guard.step

    @property
    def batch_ids(self) -> list[int]:
        """The sample ids of the current step's global batch."""
        return self.guard.batch_ids

    @property
    def rollbacks(self) -> int:
        return self.guard.rollbacks

    @property
    def store(self):
        return self.guard.store

    def close(self) -> None:
        """Flush and remove the hooks. Every rank must call it."""
        self.guard.close()

    def __enter__(self) -> DeepSpeedGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
