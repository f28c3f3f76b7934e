"""`detect_run`: replay a stored run through a fresh `Detector`, offline."""

from __future__ import annotations

import os

from thermo.detector.config import DetectorConfig
from thermo.detector.detector import Detector
from thermo.detector.verdict import Verdict
from thermo.store import StepRecord, Store


def detect_run(run, config: DetectorConfig | None = None) -> list[Verdict]:
    """Replay a stored run through a fresh `Detector`: the verdicts the live detector gave.

    Every attempt is replayed in order: ``rewind(start_step)``, then that attempt's records
    (rolled-back rows included, as the live detector saw them).

    Args:
        run: a run directory, an open `Store`, or a `thermo.Run` (from `thermo.load`).
        config: the detector configuration (defaults if None).

    Returns:
        The verdicts, at most one per attempt, in attempt order.

    Example:
        >>> for v in detect_run("runs/exp1", DetectorConfig(dtype="float16")):
        ...     print(v.message)
    """
    if isinstance(run, Store):
        return _replay(run, config)
    run_dir = getattr(run, "run_dir", run)
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"detect_run takes a run directory, a Store or a thermo.Run, got {type(run).__name__}")
    with Store(run_dir, readonly=True) as store:
        return _replay(store, config)


def _replay(store: Store, config: DetectorConfig | None) -> list[Verdict]:
    by_attempt: dict[int, list[StepRecord]] = {}
    for rec in store.records(effective=False):
        by_attempt.setdefault(rec.attempt, []).append(rec)
    det, verdicts = Detector(config), []
    attempts = store.attempts()
    for attempt, start in zip(attempts["attempt"].tolist(), attempts["start_step"].tolist()):
        det.rewind(start)
        verdict = det.update(r for r in by_attempt.get(attempt, ()) if r.step > start)
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts
