"""The guard's escalation ladder (`GuardConfig`), how it gives up (`DivergenceError`,
`EXIT_DIVERGED`)."""

from __future__ import annotations

import signal
from dataclasses import dataclass

# Exit status a training script uses when the guard gave up; `thermo supervise` knows it.
EXIT_DIVERGED = 86
# Exit status after a preemption signal (SIGTERM, SIGUSR1): the Guard checkpointed at a step
# boundary on every rank and stopped; `thermo supervise` relaunches without counting a crash.
EXIT_PREEMPTED = 87


class DivergenceError(RuntimeError):
    """The guard rolled back `max_rollbacks` times and the run still diverges."""


@dataclass(frozen=True)
class GuardConfig:
    """The guard's escalation ladder.

    Attributes:
        checkpoint_every: steps between checkpoints.
        rollback_margin: roll back to a checkpoint at least this many steps before the onset.
        skip_before: blacklist the batches of this many steps before the onset (the onset is
            where the signal moved; the damage may have begun a little earlier).
        skip_after: blacklist this many batches after the detection step as well (data
            neighbouring a bad batch is often bad too: PaLM skipped 200-500 batches).
        max_rollbacks: give up (`DivergenceError`) after this many rollbacks.
        lr_backoff: multiply the learning rate by this after `lr_backoff_after` rollbacks
            within `lr_backoff_region` steps of each other (1.0 = never).
        lr_backoff_after: rollbacks in one region before the LR is scaled.
        lr_backoff_region: steps within which two verdicts count as the same region.
        skip_nonfinite: rung 1: skip steps with a non-finite loss or gradient norm on the device.
        skip_z: rung 1: also skip steps whose loss or grad norm exceeds mean + skip_z·σ of the
            last `skip_window` steps (None: only non-finite steps).
        skip_window: steps in that rolling window.
        skip_min_window: steps the window must hold before spikes are judged.
        skip_mode: rung 1: how a skipped step is masked so that it changes nothing (see
            `thermo.guard.skip`): ``"fused"`` (``found_inf`` of torch's fused Adam/AdamW/SGD;
            exact, no memory), ``"snapshot"`` (copy parameters and optimizer state before the
            step, restore them after on the device; exact, one more copy of both in memory),
            ``"zero_grad"`` (zero the gradients; free but not exact), ``"auto"`` (fused when
            the optimizer is, else snapshot, with a warning at construction).
        qk_clip_tau: QK-Clip (Kimi K2): after each update on a step with exact per-head
            attention logits, scale W_q and W_k of every head whose max logit exceeds this so
            that it equals it (None: off). Needs ``ThermometerConfig(attn_per_head=True)``.
        replay: on a verdict, replay the steps since the restored checkpoint to find the cause
            (needs the Guard's ``loss_fn``; `thermo.guard.replay`): *data* (the anomaly follows
            specific samples: only those are blacklisted), *numerics* (it happens without them:
            nothing is blacklisted, the LR backs off at once) or *transient* (an identical replay
            does not show it: nothing is blacklisted). False (or no ``loss_fn``): blacklist the
            samples of ``[onset - skip_before, detection + skip_after]``.
        replay_max_steps: replay at most this many steps per verdict (the last step read minus
            the restored one); a longer stretch is not replayed and the window is blacklisted.
        replay_max_evals: per-sample and subset forward/backward passes per verdict at most
            (each over at most one rank's batch); past it the replay stops and the window is
            blacklisted.
        replay_outlier_z: a sample is a suspect when its log loss or log grad norm lies this many
            robust σ (MAD) above its batch's median (and is at least 2x the median).
        replay_max_toxic_share: when the samples that carry the anomalies pass this share of the
            samples of the suspect steps, the cause is called numerics: every batch looks toxic
            to a model that is itself unstable (a too-high LR), and data that bad is not the
            common case (raise it if yours is).
        max_blacklist_fraction: give up (`DivergenceError`) rather than blacklist more than this
            share of the dataset in one run (needs the data's size).
        preempt_signals: signals (names) that ask the Guard to checkpoint at the next step
            boundary on every rank and exit with `EXIT_PREEMPTED` (`thermo.guard.preempt`):
            Slurm's ``--signal=USR1@120`` before a time limit, the SIGTERM of a preemption or of
            Kubernetes. With several ranks the boundary is the next flush or checkpoint (at most
            ``flush_every`` steps away); with one process, the step in progress. ``()``: off.
    """

    checkpoint_every: int = 100
    rollback_margin: int = 10
    skip_before: int = 20
    skip_after: int = 10
    max_rollbacks: int = 5
    lr_backoff: float = 0.5
    lr_backoff_after: int = 2
    lr_backoff_region: int = 500
    skip_nonfinite: bool = True
    skip_z: float | None = 6.0
    skip_window: int = 128
    skip_min_window: int = 32
    skip_mode: str = "auto"
    qk_clip_tau: float | None = None
    replay: bool = True
    replay_max_steps: int = 400
    replay_max_evals: int = 4096
    replay_outlier_z: float = 6.0
    replay_max_toxic_share: float = 0.25
    max_blacklist_fraction: float = 0.05
    preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")

    def __post_init__(self):
        for name in ("checkpoint_every", "skip_window", "lr_backoff_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"GuardConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rollback_margin", "skip_before", "skip_after", "max_rollbacks",
                     "lr_backoff_region", "skip_min_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"GuardConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.lr_backoff <= 1.0:
            raise ValueError(f"GuardConfig.lr_backoff must be in (0, 1], got {self.lr_backoff}")
        if self.skip_z is not None and self.skip_z <= 0:
            raise ValueError(f"GuardConfig.skip_z must be > 0 or None, got {self.skip_z}")
        for name in ("replay_max_steps", "replay_max_evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"GuardConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.replay_outlier_z <= 0:
            raise ValueError(f"GuardConfig.replay_outlier_z must be > 0, got {self.replay_outlier_z}")
        if not 0.0 < self.replay_max_toxic_share <= 1.0:
            raise ValueError(
                f"GuardConfig.replay_max_toxic_share must be in (0, 1], got {self.replay_max_toxic_share}"
            )
        if not 0.0 < self.max_blacklist_fraction <= 1.0:
            raise ValueError(
                f"GuardConfig.max_blacklist_fraction must be in (0, 1], got {self.max_blacklist_fraction}"
            )
        for name in self.preempt_signals:
            if not (isinstance(getattr(signal, str(name), None), signal.Signals)
                    and name not in ("SIGKILL", "SIGSTOP")):
                raise ValueError(f"GuardConfig.preempt_signals must name signals that can be caught, like "
                                 f"'SIGTERM' or 'SIGUSR1', got {name!r}")
        if self.skip_min_window > self.skip_window:
            raise ValueError(
                f"GuardConfig.skip_min_window ({self.skip_min_window}) must be <= skip_window "
                f"({self.skip_window})"
            )
        if self.skip_mode not in ("auto", "fused", "snapshot", "zero_grad"):
            raise ValueError(f"GuardConfig.skip_mode must be 'auto', 'fused', 'snapshot' or 'zero_grad', "
                             f"got {self.skip_mode!r}")
        if self.qk_clip_tau is not None and not self.qk_clip_tau > 0:
            raise ValueError(f"GuardConfig.qk_clip_tau must be > 0 or None (off), got {self.qk_clip_tau}")
