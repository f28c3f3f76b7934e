"""`_StoreFeed`: the store's records, fed to a `Detector` as they arrive."""

from __future__ import annotations

from thermo.detector import Detector, DetectorConfig, Verdict
from thermo.store import StepRecord, Store


class _StoreFeed:
    """Feeds the store's records to a Detector as they arrive, each attempt from its start step
    (rolled-back rows as the trainer saw them), the way `detect_run` replays a finished run."""

    def __init__(self, store: Store, config: DetectorConfig | None):
        self.store, self.det = store, Detector(config)
        self.attempt: int | None = None
        self.last = -1  # last step fed of `self.attempt`
        self.latest: StepRecord | None = None
        self.verdicts: list[tuple[int, Verdict]] = []  # (attempt, verdict), for the caller to take
        c = self.det.config
        # A resumed run directory: rebuild the detector's history from the recent past only.
        last = store.last_step()
        self._floor = -1 if last is None else last - 2 * max(
            c.spike_window, c.growth_window + c.growth_recent, c.onset_lookback)
        self.poll(judge=False)

    def poll(self, judge: bool = True) -> int:
        """Read and judge the new records; returns how many were fed."""
        df = self.store.attempts()
        atts = [(int(a), int(s)) for a, s in zip(df["attempt"], df["start_step"])
                if self.attempt is None or a >= self.attempt]
        if not atts:
            return 0
        if self.attempt is None:
            self._enter(*atts[0])
        after = max(self._floor, min([self.last] + [s for a, s in atts if a > self.attempt]))
        self._floor = -(2**62)
        by_attempt: dict[int, list[StepRecord]] = {}
        for r in self.store.records(effective=False, after_step=after):
            by_attempt.setdefault(r.attempt, []).append(r)
        fed = 0
        for a, s in atts:
            if a > self.attempt:
                self._enter(a, s)
            for r in sorted(by_attempt.get(a, ()), key=lambda r: r.step):
                if r.step <= self.last:
                    continue
                # Store.records reads scalars, then layers: rows of a flush committed in between
                # come back with layers only. Stop there; the next poll reads them whole.
                if not r.scalars:
                    return fed
                verdict = self.det.update([r])
                self.last, self.latest, fed = r.step, r, fed + 1
                if verdict is not None and judge:
                    self.verdicts.append((a, verdict))
        return fed

    def _enter(self, attempt: int, start_step: int) -> None:
        self.attempt, self.last = attempt, start_step
        self.det.rewind(start_step)
