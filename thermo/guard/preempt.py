"""Preemption: the signal a scheduler sends before it ends a job makes the loop checkpoint at a
step boundary, on every rank alike, and exit with `EXIT_PREEMPTED`."""

from __future__ import annotations

import signal
import threading
import warnings
import weakref

import torch

from thermo import _dist
from thermo.guard.config import EXIT_PREEMPTED


class Preempted(SystemExit):
    """The loop was asked to stop (SIGTERM, SIGUSR1) and has checkpointed: exit with
    `EXIT_PREEMPTED`. A `SystemExit`, so a script that does not catch it exits with that code
    (no traceback); ``thermo supervise`` relaunches such an exit without counting a crash.

    Attributes:
        step: the step whose checkpoint was written.
        signal: the signal's name (``"SIGTERM"``, ``"SIGUSR1"``).
    """

    def __init__(self, step: int, signal_name: str):
        super().__init__(EXIT_PREEMPTED)
        self.step, self.signal = step, signal_name

    def __str__(self) -> str:
        return (f"preempted by {self.signal}: checkpoint {self.step} written; exiting with code "
                f"{EXIT_PREEMPTED}")


class Preemption:
    """Catches the preemption signals and says, the same on every rank, when to act on them.

    The handler only notes the signal (no I/O, no lock: a handler runs between two bytecodes of
    whatever the main thread was doing). `due` turns the note into a decision at a step
    boundary: with one process at every step, free; with several, one ``all_reduce(MAX)`` of a
    one-element tensor at the steps where the loop syncs anyway (a flush, a checkpoint), so that
    every rank checkpoints the same step even when only one of them got the signal. Between
    those steps nothing is read: a signal waits at most until the next flush.

    Handlers are installed from the main thread only (Python delivers signals there) and put
    back by `remove`. One left behind by a Guard dropped without ``close()`` puts the previous
    handler back at the next signal and lets it act, so that the process is not left deaf to it.
    """

    def __init__(self, signals: tuple[str, ...], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.signum: int | None = None  # set by the handler
        self.decided: str | None = None  # the signal's name, once every rank agreed
        self._previous: dict[int, object] = {}
        if not signals:
            return
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("thermo: the Guard was built outside the main thread, where Python cannot catch "
                          f"signals: {', '.join(signals)} will not checkpoint before the process ends "
                          "(GuardConfig(preempt_signals=()) says you know)", RuntimeWarning, stacklevel=3)
            return
        note = _note(weakref.ref(self), self._previous)  # no reference to self: it may be dropped
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, note)

    def due(self, boundary: bool) -> bool:
        """Act now? Call on every rank at every step boundary; `boundary` (the same on every
        rank) says whether this step synced anyway (a flush or a checkpoint)."""
        if self.decided is not None:
            return True
        if not _dist.initialized() or _dist.world_size() == 1:
            got = self.signum
        elif boundary:
            # The signal any rank got (the largest number if they differ); every rank alike.
            t = _dist.max_(torch.tensor([self.signum or 0], dtype=torch.int32, device=self.device))
            got = int(t.item()) or None  # note: a host sync, only at a flush or a checkpoint
        else:
            return False
        if got is not None:
            self.decided = signal.Signals(got).name
        return self.decided is not None

    def remove(self) -> None:
        """Put the previous handlers back (idempotent)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


def _note(ref: weakref.ref, previous: dict):
    """The handler: note the signal on the live `Preemption`, nothing else."""

    def handler(signum: int, frame) -> None:
        me = ref()
        if me is not None:
            me.signum = signum
            return
        before = previous.pop(signum, None)
        signal.signal(signum, signal.SIG_DFL if before is None else before)
        signal.raise_signal(signum)

    return handler
