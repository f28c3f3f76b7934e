"""Checkpoints through torch.distributed.checkpoint (DCP), and a manifest of their health.

One DCP folder per saved step, ``RUN/checkpoints/step_00001234/``, holding the model, the
optimizer, the LR scheduler, every rank's RNG states, and ``thermo.json`` (every rank's data
position, thermo's own state). ``RUN/manifest.json`` lists the checkpoints that count:

=========== =====================================================================================
field       meaning
=========== =====================================================================================
step        the training step after whose optimizer update the state was taken
path        the folder, relative to the run directory
health      ``pending`` when written; ``good`` once `CheckpointConfig.good_after` healthy steps
            followed it (`promote`); ``bad`` if a verdict's onset precedes it (`mark_bad`) or the
            run was rolled back to an earlier one (`restore`)
time        when it was committed (Unix seconds)
world_size  ranks that wrote it
data        rank 0's data position (e.g. `ResumableSampler.state_dict()`)
note        why it is bad, if it is
=========== =====================================================================================

A checkpoint counts only once rank 0 has committed its manifest entry, after every rank finished
writing; a folder without an entry (a save killed half-way) is never loaded and is deleted by the
next save. Only rank 0 writes files. One writer at a time: the trainer while it runs, the
supervisor or ``thermo`` between launches.

Optimizer state is stored per parameter name (DCP's ``flatten_optimizer_state_dict``), the same
layout for a plain model, DDP, FSDP2 and DDP + ZeroRedundancyOptimizer, so a checkpoint can be
restored under another parallelism or number of ranks (RNG states excepted: they are per rank).

What goes inside a folder is a `CheckpointBackend`'s business: `DCPBackend` (the default) writes
the DCP files above; a framework that owns its state writes its own (DeepSpeed's
``engine.save_checkpoint``, see ``thermo.integrations.deepspeed``). The manifest, ``thermo.json``,
health and retention are the same whatever the backend.
"""

from __future__ import annotations

# `_rng_state`, `_set_rng` (`_x as _x`): private, re-exported for thermo.integrations.deepspeed.
from thermo.checkpoints.backends import CheckpointBackend, DCPBackend
from thermo.checkpoints.backends import _rng_state as _rng_state
from thermo.checkpoints.backends import _set_rng as _set_rng
from thermo.checkpoints.checkpoints import Checkpoints
from thermo.checkpoints.config import CheckpointConfig
from thermo.checkpoints.manifest import (
    HEALTH,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    STATE_FORMAT,
    STATE_NAME,
    CheckpointEntry,
    rebuild_manifest,
)

__all__ = [
    "HEALTH",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "STATE_FORMAT",
    "STATE_NAME",
    "CheckpointBackend",
    "CheckpointConfig",
    "CheckpointEntry",
    "Checkpoints",
    "DCPBackend",
    "rebuild_manifest",
]
