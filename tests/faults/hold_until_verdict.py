"""The reference loop, held after one step until `thermo supervise` ends it.

    python hold_until_verdict.py HOLD_STEP -- <thermo.train_gpt arguments>

On the first launch in the run directory, after step HOLD_STEP's update (and its flush) the loop
sleeps for up to 120 s: a divergence planted before HOLD_STEP is then always seen while the
command runs, however fast the machine, and the supervisor ends it (SIGTERM). Later launches are
never held. The opposite order, a command that always ends before the supervisor reads the
poisoned steps, is `LateSupervisor` in tests/test_supervisor.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from thermo.guard.guard import Guard
from thermo.train_gpt import main

hold = int(sys.argv[1])
argv = sys.argv[sys.argv.index("--") + 1:]
marker = Path(os.environ["THERMO_RUN_DIR"]) / ".held_once"
after_step = Guard.after_step


def held_after_step(self) -> None:
    step = self.step
    after_step(self)
    if step == hold and not marker.exists():
        marker.write_text("held\n")
        # Held outside the loop, it never reaches the step boundary where the Guard acts on a
        # SIGTERM (a preemption): the supervisor's SIGTERM ends it at once, as it ends a loop
        # without a Guard.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(120)  # the supervisor's verdict ends it long before


Guard.after_step = held_after_step
sys.exit(main(argv))
