"""Adapters for training loops thermo does not own. Each is an optional extra and a thin shim over
thermo's core (`Thermometer`, `Detector`, `Checkpoints`, `Blacklist`, the store's events).

- ``hf.ThermoCallback`` (``pip install thermo[hf]``): on a verdict, stops the Trainer with a
  resumable state; the next launch resumes from the newest good ``checkpoint-N`` and
  `BlacklistDataset` leaves the blacklisted samples out.
- ``lightning.ThermoCallback`` (``thermo[lightning]``): the same, through Lightning checkpoints
  that thermo writes and judges, resumed with ``fit(ckpt_path=resume_path(run_dir))``.
- ``deepspeed.DeepSpeedGuard`` (``thermo[deepspeed]``): rolls back in process through the
  engine's own checkpoints and skips the batches, as the `Guard` does.

Why two behaviours: a verdict's repair needs the data position to move back with the weights.
In a loop thermo owns (the `Guard`, and the DeepSpeed adapter, which is the Guard with the
engine's checkpointing) the sampler is thermo's and rolls back with the rest. Inside the Trainer
of Hugging Face or Lightning the data iterator is the framework's, deep in its loop, and cannot be
rewound from a callback; what both frameworks do reliably is resume from a checkpoint. So their
callbacks stop the run the moment a verdict arrives, leave the newest good checkpoint as the one
the next launch resumes from, and blacklist the samples of the onset..detection steps, which
`BlacklistDataset` then leaves out. Running the same command again continues the run.

The escalation is the Guard's: the same `GuardConfig` fields (rollback margin, skip window,
``max_rollbacks`` then `DivergenceError`), the same events (``verdict``, ``rollback``,
``restart``, ``give_up``) with the same data fields in the store. A stop's ``rollback`` event
carries ``action="stop"``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thermo import _dist
from thermo.checkpoints import CheckpointEntry
from thermo.data import Blacklist
from thermo.rundir import RunDir
from thermo.detector import Verdict
from thermo.guard import Watch

__all__ = ["BlacklistDataset", "batch_ids"]


def _require(module: str, extra: str, adapter: str):
    """Import an optional dependency or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"thermo.integrations.{adapter} needs {module}, which is not installed: "
            f"pip install thermo[{extra}]  ({e})"
        ) from e


# -- data ---------------------------------------------------------------------------------------


class BlacklistDataset(torch.utils.data.Dataset):
    """A map-style dataset without the run's blacklisted sample ids, each item tagged with its id.

    The sample id is the index into `dataset`, whatever is left out. Index ``k`` of this dataset
    is the ``k``-th id that is not blacklisted. The adapters read the ids back from the batches
    to know what each step trained on (the ids a verdict blacklists):

    - dict items (Hugging Face, most tokenised datasets) get ``item[id_key] = id``;
    - tuple or list items get the id appended as their last element (``x, y, ids = batch``);
    - other items become ``(item, id)``.

    The blacklist is read once, here (or on `reload`): every rank of a launch reads the same file,
    so all ranks see the same dataset.

    Args:
        dataset: anything with ``len`` and integer indexing (a torch ``Dataset``, a Hugging Face
            ``datasets.Dataset``, a list).
        run_dir: the thermo run directory whose ``blacklist.json`` is honoured; None or a missing
            file: nothing is left out.
        id_key: the key added to dict items.

    Example:
        >>> train = BlacklistDataset(tokenized["train"], "runs/exp1")
        >>> trainer = Trainer(model, args, train_dataset=train, callbacks=[ThermoCallback("runs/exp1")])
    """

    def __init__(self, dataset: Any, run_dir: str | os.PathLike | None, id_key: str = "sample_id"):
        self.dataset = dataset
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.id_key = id_key
        self.reload()

    def reload(self) -> None:
        """Re-read ``blacklist.json`` (only between epochs or launches: the length changes)."""
        n = len(self.dataset)
        ids = np.arange(n, dtype=np.int64)
        if self.run_dir is not None and RunDir(self.run_dir).blacklist.exists():
            bad = np.fromiter(Blacklist.load(self.run_dir).ids, dtype=np.int64)
            ids = np.setdiff1d(ids, bad, assume_unique=True)
        if len(ids) == 0:
            raise ValueError(
                f"BlacklistDataset: all {n} samples are blacklisted in {RunDir(self.run_dir).blacklist}; "
                "nothing is left to train on"
            )
        self.ids = ids
        self.skipped = n - len(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int):
        i = int(self.ids[k])
        item = self.dataset[i]
        if isinstance(item, dict):
            return {**item, self.id_key: i}
        if isinstance(item, (tuple, list)):
            return (*item, i)
        return item, i


def batch_ids(batch: Any, id_key: str = "sample_id") -> Any:
    """The sample ids a `BlacklistDataset` put in a collated batch (a tensor or a list)."""
    if isinstance(batch, dict):
        if id_key not in batch:
            raise KeyError(
                f"thermo: the batch has no {id_key!r} key (keys: {sorted(batch)[:8]}): wrap the "
                "training dataset in thermo.integrations.BlacklistDataset, or pass ids_fn="
            )
        return batch[id_key]
    if isinstance(batch, (tuple, list)):
        return batch[-1]
    raise TypeError(f"thermo: cannot find sample ids in a batch of type {type(batch).__name__}; pass ids_fn=")


# -- the escalation for loops thermo does not own ----------------------------------------------


class _Watch(Watch):
    """`Watch` for a framework's loop: the framework calls `record` once per optimizer step with
    this rank's sample ids; on a verdict the adapter calls `stop`, which plans the repair as the
    Guard does but restores nothing: it leaves the checkpoint the next launch resumes from.
    Every method is called on every rank alike; rank 0 decides and writes.
    """

    def __init__(self, model: torch.nn.Module, run_dir: Path, **kw: Any):
        super().__init__(model, run_dir, **kw)
        self.verdict: Verdict | None = None  # the verdict that stopped this launch
        self.target: CheckpointEntry | None = None  # where the next launch resumes
        self.step = 0  # the last step recorded
        self._ids: list[tuple[int, Any]] = []  # (step, this rank's ids) not yet on the host
        self._reported: int | None = None  # the last step handed to a framework's loggers

    def begin(self, step: int) -> bool:
        """Start recording after `step` (the step the framework resumed at, 0 on a fresh start).

        Returns:
            True if this launch continues an earlier one (it resumed, or restarted from scratch
            after a stop); False on the run's first launch, which should save checkpoint 0.
        """
        resumed = _dist.from_rank0(step > 0 or bool(self.rank0 and self.store.last_step() is not None))
        self.step = step
        if resumed:
            self.resumed(step)
        return resumed

    def record(self, step: int, loss, grad_norm, ids=None) -> Verdict | None:
        """Record optimizer step `step`; at a flush, judge it. Returns the verdict (every rank)."""
        self.step = step
        self.heartbeat(step + 1)  # the step the framework starts next (ids: on the device until the flush)
        if ids is not None:
            self._ids.append((step, ids))
        if self.therm.flush_due:
            self._gather_ids()
        return super().record(step, loss, grad_norm)

    def fresh_metrics(self, step: int) -> dict[str, float]:
        """On rank 0, right after the flush that recorded `step`: its values under the sinks'
        key budget (``thermo/loss``, ``thermo/grad_norm``, per-block and hottest-layer extremes,
        at most 100 keys), for the framework's own loggers; else empty. One row per flush, at
        the current step: the framework's loggers never see a step go back."""
        rec = self.last_record
        if not self.rank0 or rec is None or rec.step != step or rec.step == self._reported:
            return {}
        from thermo.sinks.budget import KeyBudget

        self._reported = rec.step
        return KeyBudget().row(rec)

    def _gather_ids(self) -> None:
        """Put the global batches of the steps since the last flush in the ledger: every rank's
        ids, gathered (one collective per flush)."""
        rows = [(s, _id_list(i)) for s, i in self._ids]  # note: a host sync if ids are on a device; once per flush
        self._ids.clear()
        if _dist.world_size() > 1:
            parts = _dist.gather(rows)
            rows = [(s, [i for part in parts for i in dict(part).get(s, [])]) for s, _ in rows]
        for s, ids in rows:
            self.ledger.record(s, ids)

    def stop(self, verdict: Verdict) -> CheckpointEntry:
        """Act on `verdict` without restoring: the next launch resumes from the returned entry.
        The batches after now are the framework's to choose, so none are blacklisted ahead.

        Raises:
            DivergenceError: after `max_rollbacks` stops, or with no good checkpoint before the onset.
        """
        plan = self.plan(verdict, self.step)
        # The next launch continues from the target: later checkpoints are an abandoned timeline.
        self.checkpoints.mark_bad(plan.target.step + 1,
                                  note=f"superseded: the run stopped to resume from step {plan.target.step}")
        self.log_rollback(plan, self.step, "stop")
        self.verdict, self.target = verdict, plan.target
        _dist.barrier()  # rank 0's files are written before any rank lets its framework go on
        return plan.target


def _id_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [int(i) for i in ids]



def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss in a model's output, read the way Hugging Face's Trainer reads it."""
    if isinstance(output, dict):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
