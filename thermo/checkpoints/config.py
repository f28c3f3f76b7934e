"""`CheckpointConfig`: how checkpoints are kept and judged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from thermo.rundir import RunDir


@dataclass(frozen=True)
class CheckpointConfig:
    """How checkpoints are kept and judged.

    Attributes:
        keep_last: checkpoints kept that are not bad (newest first); the newest good one is kept
            on top of those, so there is always one to roll back to.
        good_after: healthy steps that must follow a checkpoint before it counts as good. Make
            it longer than the detector's onset walk-back: a checkpoint is only good if the
            sickness a later verdict finds cannot have begun before it.
        folder: folder of the checkpoints, relative to the run directory.
        rng: save and restore each rank's RNG states (python, numpy, torch CPU, CUDA).
        horizon: also keep the newest good checkpoint older than the last `horizon` steps (or,
            if none is that old, the oldest good one), so that a verdict whose onset lies that
            far back still has a checkpoint to return to. None: none for `Checkpoints` alone; under a
            Guard, the detector's onset look-back plus the rollback margin (a shorter one is
            refused there: a rollback could find nothing to return to).
        keep_between: with a `horizon`, also keep up to this many good checkpoints inside it,
            spread evenly: a rollback to an onset inside the window then redoes at most about
            ``horizon / (keep_between + 1)`` steps more than it must. Retention keeps at most
            ``keep_last + keep_between + 3`` checkpoints, whatever `checkpoint_every` is.
        max_bytes: a disk budget for the checkpoints (0: none). Past it, retention gives up the
            ones inside the look-back first, then the older of the last `keep_last`; the newest,
            the newest good one, the next pending one (the next to become good) and the good
            one from before the look-back are kept whatever it says (with a warning): a run
            needs at most ``max(max_bytes, 4 checkpoints)``.
    """

    keep_last: int = 3
    good_after: int = 50
    folder: str = RunDir.CHECKPOINTS
    rng: bool = True
    horizon: int | None = None
    keep_between: int = 2
    max_bytes: int = 0

    def __post_init__(self):
        if self.keep_last < 1:
            raise ValueError(f"CheckpointConfig.keep_last must be >= 1, got {self.keep_last}")
        if self.good_after < 0:
            raise ValueError(f"CheckpointConfig.good_after must be >= 0, got {self.good_after}")
        if not isinstance(self.keep_between, int) or self.keep_between < 0:
            raise ValueError(f"CheckpointConfig.keep_between must be an int >= 0, got {self.keep_between!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"CheckpointConfig.max_bytes must be an int >= 0 (0: no budget), got {self.max_bytes!r}")
        if self.horizon is not None and self.horizon < 0:
            raise ValueError(f"CheckpointConfig.horizon must be >= 0 (or None), got {self.horizon}")
        if not self.folder or Path(self.folder).is_absolute() or ".." in Path(self.folder).parts:
            raise ValueError(
                "CheckpointConfig.folder must be a relative path inside the run directory, "
                f"got {self.folder!r}"
            )
