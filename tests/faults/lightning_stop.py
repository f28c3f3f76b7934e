"""A Lightning script with thermo's callback: poisoned samples make its first launch stop on a
verdict (exit 0, a blacklist and a checkpoint to resume from). Run again, it resumes and finishes.
Under `thermo supervise`, the stop must be taken as "relaunch", not as "finished"."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.test_integration_lightning import BATCH, POISON_STEPS, TinyGPT, callback, loader, trainer  # noqa: E402
from thermo.integrations.lightning import resume_path  # noqa: E402

run_dir = Path(os.environ["THERMO_RUN_DIR"])
poisoned = {i for s in POISON_STEPS for i in range((s - 1) * BATCH, s * BATCH)}
cb = callback(run_dir)
trainer(run_dir, 100, cb).fit(TinyGPT(poisoned), loader(run_dir), ckpt_path=resume_path(run_dir))
