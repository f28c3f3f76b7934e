"""`Detector`: the streaming rules over `StepRecord`s (nonfinite, overflow, spike, growth) and the
onset walk-back."""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from thermo.detector.config import DetectorConfig
from thermo.detector.history import _History, _quantile, _robust
from thermo.detector.verdict import Verdict
from thermo.store import StepRecord


def _fmt(v: float) -> str:
    return f"{v:.3g}"


class Detector:
    """Streaming divergence detector over `StepRecord`s.

    Args:
        config: a `DetectorConfig` (defaults if None).

    Feed records in step order with `update`; the first verdict is returned and the detector
    latches (returns None) until `rewind`, which a rollback calls with the restored step.
    Decisions are taken record by record, so one batch, one flush at a time or one record at a
    time give the same verdict, and `detect_run` replays a stored run to the verdicts the live
    detector gave.

    Example:
        >>> det = Detector(DetectorConfig(dtype="float16"))
        >>> for batch in loader:
        ...     ...
        ...     verdict = det.update(therm.step(loss))
        ...     if verdict:
        ...         print(verdict.message)  # "grad_norm spike at step 412 (onset 405): ..."
        ...         step = restore_checkpoint_before(verdict.onset_step)
        ...         det.rewind(step)
    """

    def __init__(self, config: DetectorConfig | None = None):
        self.config = config or DetectorConfig()
        c = self.config
        # The growth reference window ends on a multiple of `_stride` steps, so a reference is
        # computed once per stride and series, not once per record (thousands of series).
        self._stride = max(1, c.growth_recent // 3)
        # Older history is never read: windows and the onset walk reach back this far at most.
        self._horizon = max(c.spike_window, c.growth_window + c.growth_recent + self._stride,
                            c.onset_lookback) + 1
        self._refs: dict[tuple[str, str], tuple[int, float | None]] = {}  # key -> (window end, ref)
        self._series: dict[tuple[str | None, str], _History] = {}
        self._skipped = array("q")  # steps flagged ``skipped``
        self._last_step: int | None = None
        self._trimmed_at: int | None = None
        self._latched: Verdict | None = None

    @property
    def horizon(self) -> int:
        """Steps of history a decision can reach back to (windows and the onset walk)."""
        return self._horizon

    @property
    def latched(self) -> Verdict | None:
        """The verdict the detector is latched on (None when live)."""
        return self._latched

    def update(self, records: Iterable[StepRecord]) -> Verdict | None:
        """Process records in step order; return the first verdict, or None.

        Args:
            records: the records of a flush (any number, each with a step above the last).

        Returns:
            The first `Verdict` raised by these records, or None (also None while latched:
            records after a verdict are ignored until `rewind`).
        """
        for rec in records:
            if self._latched is not None:
                return None
            verdict = self._process(rec)
            if verdict is not None:
                self._latched = verdict
                return verdict
        return None

    def rewind(self, step: int) -> None:
        """Forget everything after `step` and unlatch: call it once a rollback restored `step`
        (the next record is then step + 1 or later)."""
        step = int(step)
        for key in list(self._series):
            h = self._series[key]
            h.cut(-(2**62), step)
            if not len(h.steps):
                del self._series[key]
        del self._skipped[bisect_right(self._skipped, step):]
        if self._last_step is None or self._last_step > step:
            self._last_step = step
        self._refs.clear()
        self._latched = None

    # -- one record -------------------------------------------------------------------------

    def _process(self, rec: StepRecord) -> Verdict | None:
        c, t = self.config, int(rec.step)
        if self._last_step is not None and t <= self._last_step:
            raise ValueError(
                f"Detector got step {t} after step {self._last_step}: records must arrive in step "
                "order; after a rollback call rewind(restored_step) first"
            )
        self._last_step = t
        skipped = _truthy(rec.scalars.get("skipped", 0.0))
        if skipped:
            self._skipped.append(t)
        for rule in c.spikes:
            v = rec.scalars.get(rule.signal)
            if v is not None and math.isfinite(v) and v > 0:
                self._history((None, rule.signal)).add(t, math.log(v), not skipped)
        for (layer, stat), v in rec.layers.items():
            if stat in c.growth_stats and math.isfinite(v):
                self._history((layer, stat)).add(t, math.log(max(abs(v), c.growth_floor)), not skipped)
        self._trim(t)
        verdict = self._nonfinite(rec) or self._overflow(rec) or self._spike(rec) or self._growth(rec)
        if verdict is not None and skipped:
            verdict = self._escalate(verdict, t)
        return verdict

    def _history(self, key: tuple[str | None, str]) -> _History:
        h = self._series.get(key)
        if h is None:
            h = self._series[key] = _History()
        return h

    def _trim(self, t: int) -> None:
        # Trimming only bounds memory (windows never reach past the horizon), so doing it every
        # quarter horizon keeps the per-record cost flat without changing any decision.
        if self._trimmed_at is not None and t - self._trimmed_at < self._horizon // 4 + 1:
            return
        self._trimmed_at = t
        for h in self._series.values():
            h.cut(t - self._horizon, t)
        del self._skipped[: bisect_left(self._skipped, t - self._horizon)]

    # -- rules --------------------------------------------------------------------------------

    def _nonfinite(self, rec: StepRecord) -> Verdict | None:
        if not self.config.nonfinite:
            return None
        t = rec.step
        for sig in ("loss", "grad_norm"):
            v = rec.scalars.get(sig)
            if v is not None and not math.isfinite(v):
                onset = self._scalar_onset(t)
                return Verdict("nonfinite", sig, None, onset, t, {"value": v},
                               f"non-finite {sig} ({v}) at step {t} (onset {onset})")
        v = rec.scalars.get("grad_nonfinite")
        if v is not None and (not math.isfinite(v) or v > 0):
            onset = self._scalar_onset(t)
            return Verdict("nonfinite", "grad_nonfinite", None, onset, t, {"value": v},
                           f"{v:g} gradient tensors hold NaN/inf at step {t} (onset {onset})")
        bad = sorted(k for k, v in rec.layers.items() if not math.isfinite(v))
        if bad:
            (layer, stat), v = bad[0], rec.layers[bad[0]]
            onset = self._scalar_onset(t)
            return Verdict("nonfinite", stat, layer, onset, t,
                           {"value": v, "nonfinite_stats": float(len(bad))},
                           f"non-finite {stat} of {layer} ({v}) at step {t} (onset {onset}); "
                           f"{len(bad)} layer stats non-finite")
        return None

    def _overflow(self, rec: StepRecord) -> Verdict | None:
        c, t = self.config, rec.step
        limit = c.limit
        if limit is None:
            return None
        threshold = c.overflow_fraction * limit
        hits = [(abs(v), k) for k, v in rec.layers.items()
                if k[1] in c.overflow_stats and math.isfinite(v) and abs(v) >= threshold]
        if not hits:
            return None
        mag, (layer, stat) = min(hits, key=lambda h: (-h[0], h[1]))  # largest; ties: sorted order
        onset = self._growth_onset((layer, stat), t)
        name = c.dtype or "limit"
        return Verdict("overflow", stat, layer, onset, t,
                       {"value": rec.layers[(layer, stat)], "limit": limit, "threshold": threshold},
                       f"{stat} of {layer} at {_fmt(mag)} is {mag / limit:.2g} of the {name} "
                       f"limit {_fmt(limit)} at step {t} (onset {onset})")

    def _spike(self, rec: StepRecord) -> Verdict | None:
        c, t = self.config, rec.step
        if t < c.spike_warmup:
            return None
        for rule in c.spikes:
            sig = rule.signal
            v = rec.scalars.get(sig)
            if v is None or not math.isfinite(v) or v <= 0:
                continue
            base = self._baseline(sig, t)
            if base is None:
                continue
            med, sigma = base
            x = math.log(v)
            threshold = med + max(rule.z * sigma, math.log(rule.min_ratio))
            if x <= threshold:
                continue
            h = self._series[(None, sig)]
            prev = h.walk_back(t - 1, t - c.onset_lookback, med + c.onset_z * sigma)
            onset = t if prev is None else prev
            z = (x - med) / sigma
            return Verdict("spike", sig, None, onset, t,
                           {"value": v, "baseline": math.exp(med), "sigma_log": sigma, "z": z,
                            "threshold": math.exp(threshold)},
                           f"{sig} spike at step {t} (onset {onset}): {_fmt(v)} vs baseline "
                           f"{_fmt(math.exp(med))}, over the limit {_fmt(math.exp(threshold))} "
                           f"(log-scale z {z:.3g})")
        return None

    def _growth(self, rec: StepRecord) -> Verdict | None:
        c, t = self.config, rec.step
        hits, log_factor, log_floor = [], math.log(c.growth_factor), math.log(c.growth_floor)
        for key in rec.layers:
            if key[1] not in c.growth_stats:
                continue
            h = self._series.get(key)
            if h is None or not len(h.steps) or h.steps[-1] != t:
                continue  # non-finite now: the nonfinite rule's business
            # Cheap bounds first (most series of a healthy run stop here): the reference is
            # >= log(floor), and the current value is one of the recent ones that must be high.
            x = h.vals[-1]
            if x - log_floor < log_factor:
                continue
            ref = self._reference(key, h, t)
            if ref is None or x - ref < log_factor:
                continue
            recent = h.window(t - c.growth_recent + 1, t, baseline=False)
            if len(recent) < c.growth_min_samples:
                continue
            rise = float(recent.min()) - ref
            if rise >= log_factor:
                hits.append((rise, key, ref, len(recent)))
        if not hits:
            return None
        # The steepest growth wins; ties go to the first key in sorted order (deterministic).
        rise, (layer, stat), ref, n = min(hits, key=lambda h: (-h[0], h[1]))
        onset = self._growth_onset((layer, stat), t)
        value = rec.layers[(layer, stat)]
        return Verdict("growth", stat, layer, onset, t,
                       {"value": value, "reference": math.exp(ref), "level": math.exp(ref + rise),
                        "ratio": math.exp(rise), "factor": c.growth_factor, "samples": float(n)},
                       f"{stat} of {layer} grew {math.exp(rise):.3g}x over its reference "
                       f"{_fmt(math.exp(ref))}{' (the floor)' if ref <= log_floor else ''} for "
                       f"{c.growth_recent} steps (now {_fmt(value)}) at step {t} (onset {onset})")

    def _escalate(self, verdict: Verdict, t: int) -> Verdict | None:
        """A rule tripped on a skipped step: a verdict only if skipping is no longer enough."""
        c = self.config
        first = bisect_left(self._skipped, t - c.skip_window + 1)
        n = len(self._skipped) - first
        if n <= c.skip_tolerance:
            return None
        # The onset reaches back through the cluster of skips that leads up to `t`, not to the
        # oldest skip in the window: an isolated skip long before was harmless (its update never
        # happened) and must not drag the rollback and the blacklist back with it.
        start = len(self._skipped) - 1
        while start > first and self._skipped[start] - self._skipped[start - 1] <= c.skip_cluster_gap:
            start -= 1
        onset = min(verdict.onset_step, self._skipped[start])
        evidence = {**verdict.evidence, "skipped_recent": float(n)}
        message = verdict.message.replace(f"(onset {verdict.onset_step})", f"(onset {onset})")
        message = f"{message}; {n} steps skipped in the last {c.skip_window}"
        return Verdict(verdict.kind, verdict.signal, verdict.layer, onset, t, evidence, message)

    # -- baselines and onsets -----------------------------------------------------------------

    def _baseline(self, sig: str, t: int) -> tuple[float, float] | None:
        """(median, σ) of the healthy log values of `sig` over the spike window before `t`."""
        c = self.config
        h = self._series.get((None, sig))
        if h is None:
            return None
        base = h.window(t - c.spike_window, t - 1, baseline=True)
        if len(base) < c.spike_min_window:
            return None
        return _robust(base, c.spike_sigma_floor)

    def _reference(self, key: tuple[str, str], h: _History, t: int) -> float | None:
        """`growth_quantile` of the baseline log magnitudes over the growth window before the
        recent span (its end rounded down to a multiple of the stride)."""
        c = self.config
        hi = (t - c.growth_recent) // self._stride * self._stride
        cached = self._refs.get(key)
        if cached is not None and cached[0] == hi:
            return cached[1]  # exact: history up to `hi` < t never changes (rewind clears this)
        vals = h.window(max(c.growth_warmup, hi - c.growth_window + 1), hi, baseline=True)
        ref = _quantile(vals, c.growth_quantile) if len(vals) >= c.growth_min_samples else None
        self._refs[key] = (hi, ref)
        return ref

    def _scalar_onset(self, t: int) -> int:
        """Onset of a non-finite step: the earliest start of an unbroken out-of-band run of a
        spike signal that reaches the step before; `t` if none was out of band."""
        c, onset = self.config, t
        for sig in (r.signal for r in c.spikes):
            base = self._baseline(sig, t)
            if base is None:
                continue
            med, sigma = base
            prev = self._series[(None, sig)].walk_back(t - 1, t - c.onset_lookback, med + c.onset_z * sigma)
            if prev is not None:
                onset = min(onset, prev)
        return onset

    def _growth_onset(self, key: tuple[str, str], t: int) -> int:
        c = self.config
        h = self._series.get(key)
        ref = self._reference(key, h, t) if h is not None else None
        if ref is None:
            return t
        prev = h.walk_back(t, t - c.onset_lookback, ref + math.log(c.onset_factor))
        return t if prev is None else prev

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serialisable state (histories within the horizon, latch, last step)."""
        return {
            "version": 1,
            "last_step": self._last_step,
            "latched": None if self._latched is None else self._latched.to_dict(),
            "skipped": self._skipped.tolist(),
            "series": [[layer, stat, h.to_json()] for (layer, stat), h in self._series.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (the config stays the one this detector was built with)."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != 1:
            raise ValueError(
                f"not a thermo Detector state (expected a dict with version 1, got a "
                f"{type(state).__name__} with version {version!r})"
            )
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        self._latched = None if state["latched"] is None else Verdict.from_dict(state["latched"])
        self._skipped = array("q", (int(s) for s in state["skipped"]))
        self._series = {(layer, stat): _History.from_json(h) for layer, stat, h in state["series"]}
        self._trimmed_at = None
        self._refs.clear()


def _truthy(v) -> bool:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return bool(v)
    return v != 0.0 and not math.isnan(v)
