"""`Guard`: the trainer plugin. Thermometers, detector, checkpoints and the data position in one
object that a training loop calls in three places.

The escalation ladder:

1. A step whose loss or gradient norm is non-finite, or spikes past ``mean + skip_z·σ`` of the
   last ``skip_window`` healthy steps (OLMo-core's rule), is skipped **on the device**: the
   decision is a tensor, reduced over ranks, and the update is masked so that parameters and
   optimizer state stay bit-identical: ``found_inf`` of torch's fused Adam/AdamW/SGD (the way
   GradScaler does it), else a snapshot restored with ``torch.where`` (``GuardConfig.skip_mode``,
   `thermo.guard.skip`). No host sync. Optionally, QK-Clip (``GuardConfig.qk_clip_tau``,
   `thermo.guard.qkclip`) scales W_q/W_k of heads whose exact max logit exceeds tau after the update.
2. On a detector verdict, every rank together: mark checkpoints written after the onset bad,
   restore the newest good checkpoint before ``onset - rollback_margin``.
3. Replay the steps since (``replay.py``) to find the cause: the samples that carry the anomaly
   (*data*), none (*numerics*), or an identical replay that is clean (*transient*).
4. The remedy fits the cause: blacklist exactly the toxic samples; or nothing and the LR backs off;
   or nothing. Without a ``loss_fn`` the samples of ``[onset - skip_before, detection +
   skip_after]`` are blacklisted. Never more than ``max_blacklist_fraction`` of the data.
5. After ``max_rollbacks``, raise `DivergenceError` (exit code `EXIT_DIVERGED` for a supervisor).

Preemption (``GuardConfig.preempt_signals``, `thermo.guard.preempt`): SIGTERM or SIGUSR1 make
every rank checkpoint the same step boundary and raise `Preempted` (exit code `EXIT_PREEMPTED`).
"""

from __future__ import annotations

# `_DeviceSkip as _DeviceSkip`: private, re-exported because the tests import it from here.
from thermo.guard.config import (
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    DivergenceError,
    GuardConfig,
)
from thermo.guard.guard import Guard
from thermo.guard.preempt import Preempted
from thermo.guard.qkclip import QKClip
from thermo.guard.skip import _DeviceSkip as _DeviceSkip
from thermo.guard.watch import Plan, Watch, newest_usable, rollback_target, skip_window

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_PREEMPTED",
    "DivergenceError",
    "Guard",
    "GuardConfig",
    "QKClip",
    "Plan",
    "Preempted",
    "Watch",
    "newest_usable",
    "rollback_target",
    "skip_window",
]
