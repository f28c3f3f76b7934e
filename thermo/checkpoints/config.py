"""`CheckpointConfig`: how checkpoints are kept and judged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
        horizon: also keep every good checkpoint of the last `horizon` steps and the newest one
            before them (or, if none is that old, the oldest good one), so that a verdict whose
            onset lies that far back still has a checkpoint to return to. The Guard sets it to
            the detector's onset look-back plus the rollback margin when it is 0.
    """

    keep_last: int = 3
    good_after: int = 50
    folder: str = "checkpoints"
    rng: bool = True
    horizon: int = 0

    def __post_init__(self):
        if self.keep_last < 1:
            raise ValueError(f"CheckpointConfig.keep_last must be >= 1, got {self.keep_last}")
        if self.good_after < 0:
            raise ValueError(f"CheckpointConfig.good_after must be >= 0, got {self.good_after}")
        if self.horizon < 0:
            raise ValueError(f"CheckpointConfig.horizon must be >= 0, got {self.horizon}")
        if not self.folder or Path(self.folder).is_absolute() or ".." in Path(self.folder).parts:
            raise ValueError(
                "CheckpointConfig.folder must be a relative path inside the run directory, "
                f"got {self.folder!r}"
            )
