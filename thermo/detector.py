"""Divergence detection over thermometer records: the rules, the `Verdict`, offline replay.

A `Detector` is fed `StepRecord`s in step order, live (the records each flush returns) or
offline (`detect_run` over a stored run), and gives the same verdicts either way: it decides
record by record, so how the records are batched never matters. It is plain host-side Python.

Rules, checked in this order on every record; the first that fires gives the verdict:

==========  ==============================================================  ========================
kind        fires when                                                      signals
==========  ==============================================================  ========================
nonfinite   a value is NaN or ±inf, or ``grad_nonfinite`` > 0               loss, grad_norm,
                                                                            grad_nonfinite, layers
overflow    a per-layer extreme reaches ``overflow_fraction`` of the        act_max, act_min,
            compute dtype's largest value (fp16: 65504)                     attn_*, grad_max
spike       log(value) > rolling median + z·σ (σ from the MAD) and          loss, grad_norm
            value > min_ratio × median (a `SpikeRule` per signal)
growth      every value of the last ``growth_recent`` steps is at least     attn_max, attn_bound,
            ``growth_factor`` × the series' reference level (a low          act_max, act_min
            quantile of the ``growth_window`` steps before them)
==========  ==============================================================  ========================

The onset of a verdict is found by walking back from the detection step while the signal stays
outside its healthy band (``onset_z`` σ above the spike baseline; ``onset_factor`` × the growth
reference). Steps flagged ``skipped`` (the guard masked their update on the device) are checked
like any other but never enter a baseline, and a rule they trip only becomes a verdict once more
than ``skip_tolerance`` steps were skipped within ``skip_window`` steps.
"""

from __future__ import annotations

import math
import os
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from thermo.store import StepRecord, Store

# Largest finite value of the compute dtypes the overflow rule knows by name.
DTYPE_MAX = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": 3.4028234663852886e38,
    "float8_e4m3fn": 448.0,
    "float8_e5m2": 57344.0,
}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                  "float": "float32", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
_MAD_TO_SIGMA = 1.4826  # σ of a normal distribution = 1.4826 × its median absolute deviation
_LAYER_STATS = ("act_max", "act_min", "grad_max", "attn_max", "attn_min", "attn_bound")


@dataclass(frozen=True)
class SpikeRule:
    """A positive scalar watched for spikes against its rolling baseline.

    Attributes:
        signal: the scalar key (``"loss"``, ``"grad_norm"``, or one given to
            ``Thermometer.step``).
        z: robust z-score (σ of log values, σ = 1.4826·MAD) the value must exceed; 6 as in
            OLMo-core's skip rule (its "spike score" counts values >= 7σ from a rolling mean).
            Healthy runs of the benchmark peak at z 2.5 for the loss.
        min_ratio: the value must also be this many times the baseline median, so a quiet
            baseline (tiny σ) cannot turn a small move into a verdict. Healthy losses peak at
            1.23x their median; healthy gradient norms jump 5.6x (z 13.5), hence 10x for them.
    """

    signal: str
    z: float = 6.0
    min_ratio: float = 1.5

    def __post_init__(self):
        if not isinstance(self.signal, str) or not self.signal:
            raise ValueError(f"SpikeRule.signal must be a scalar key (a non-empty string), got {self.signal!r}")
        if not isinstance(self.z, (int, float)) or not math.isfinite(self.z) or self.z <= 0:
            raise ValueError(f"SpikeRule.z must be a finite number > 0, got {self.z!r}")
        if not isinstance(self.min_ratio, (int, float)) or not math.isfinite(self.min_ratio) or self.min_ratio < 1:
            raise ValueError(f"SpikeRule.min_ratio must be a finite number >= 1, got {self.min_ratio!r}")


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's knobs. Steps are training step numbers, not record counts, so a stat
    sampled every k steps (``attn_max``) and one recorded every step share the same windows.

    The defaults were tuned on seeds 100-104 of ``benchmarks/detection.py`` (healthy, poisoned
    and fp16 high-LR runs of a small byte-level GPT, plus healthy runs of a 4-layer d=128 one)
    and are reported on other seeds; see its docstring.

    Attributes:
        nonfinite: fire on a non-finite loss, gradient norm or per-layer extreme, or on
            ``grad_nonfinite`` > 0.
        spikes: the scalars watched for spikes, one `SpikeRule` each.
        spike_warmup: no spike verdict before this step. Early baselines hold the steep initial
            fall of the loss, which widens their σ, so this only needs to skip the first steps.
        spike_window: steps of history in the rolling spike baseline.
        spike_min_window: baseline values needed before the spike rule may fire.
        spike_sigma_floor: lower bound of σ (log units), so a flat baseline keeps a sane scale.
        growth_stats: per-layer statistics watched for sustained growth (magnitudes: the
            growth of ``act_min`` is the growth of ``-act_min``).
        growth_warmup: steps before which values never enter a growth reference. The floor
            already keeps the rise from initialisation (logits ~0) out; raise this for models
            whose healthy extremes climb past ``growth_factor × growth_floor`` within the first
            ``growth_window`` steps.
        growth_window: steps of history forming a series' reference level.
        growth_quantile: the reference is this quantile of the window's values: low, so that a
            steady climb is measured from where it began rather than from its middle (with the
            median, a series doubling every 35 steps would never look 8x above its reference).
        growth_recent: steps that must all stay above the growth threshold ("sustained").
        growth_min_samples: values needed in the recent span (a sampled stat such as
            ``attn_max`` every 10 steps gives 3 in 30 steps) and in the reference window.
        growth_factor: the recent values must be this many times the reference. Healthy runs
            roughly double their attention logits early on (a 4-layer d=128 byte GPT: 19 at
            step 50, 48 at 200; the largest ratio seen in healthy runs is 2.3x); 8x is clear of it.
        growth_floor: magnitudes below this count as this value, so the rise from
            initialisation (0.1 -> 20) is not growth. Logits and activations under 20 are
            harmless in any dtype.
        dtype: compute dtype for the overflow rule (``"float16"``, ``"bfloat16"``,
            ``"float8_e4m3fn"``...), None = rule off unless `dtype_max` is given.
        dtype_max: the largest finite value, overriding the one of `dtype`.
        overflow_fraction: fire when a watched magnitude reaches this fraction of the limit.
            0.1: an explicit attention forms q·kᵀ before the 1/sqrt(d_head) scale, so logits
            overflow fp16 at 65504/sqrt(d_head) (5790 for d_head=128), and an activation is
            still multiplied and summed by the next layer.
        overflow_stats: per-layer statistics checked against the limit.
        onset_z: the healthy band of a spike signal ends this many σ above its median.
        onset_factor: the healthy band of a growth series ends at this multiple of its reference.
        onset_lookback: the onset walk goes back at most this many steps.
        skip_tolerance: skipped steps tolerated within `skip_window` before a rule tripped by a
            skipped step becomes a verdict (the guard handles isolated ones on the device).
        skip_window: steps over which skipped steps are counted.
    """

    nonfinite: bool = True
    spikes: tuple[SpikeRule, ...] = (SpikeRule("loss"), SpikeRule("grad_norm", min_ratio=10.0))
    spike_warmup: int = 20
    spike_window: int = 100
    spike_min_window: int = 20
    spike_sigma_floor: float = 0.02
    growth_stats: tuple[str, ...] = ("attn_max", "attn_bound", "act_max", "act_min")
    growth_warmup: int = 0
    growth_window: int = 200
    growth_quantile: float = 0.25
    growth_recent: int = 30
    growth_min_samples: int = 3
    growth_factor: float = 8.0
    growth_floor: float = 20.0
    dtype: str | None = None
    dtype_max: float | None = None
    overflow_fraction: float = 0.1
    overflow_stats: tuple[str, ...] = _LAYER_STATS
    onset_z: float = 3.0
    onset_factor: float = 2.0
    onset_lookback: int = 200
    skip_tolerance: int = 2
    skip_window: int = 100

    def __post_init__(self):
        if not all(isinstance(r, SpikeRule) for r in self.spikes):
            raise ValueError(f"DetectorConfig.spikes must be a tuple of SpikeRule, got {self.spikes!r}")
        object.__setattr__(self, "spikes", tuple(self.spikes))
        signals = [r.signal for r in self.spikes]
        if len(set(signals)) != len(signals):
            raise ValueError(f"DetectorConfig.spikes has several rules for one signal: {signals}")
        for name in ("growth_stats", "overflow_stats"):
            v = getattr(self, name)
            if isinstance(v, str) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"DetectorConfig.{name} must be a tuple of strings, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        ints = {"spike_warmup": 0, "spike_window": 2, "spike_min_window": 2, "growth_warmup": 0,
                "growth_window": 1, "growth_recent": 1, "growth_min_samples": 1,
                "onset_lookback": 0, "skip_tolerance": 0, "skip_window": 1}
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"DetectorConfig.{name} must be an int >= {lo}, got {v!r}")
        if self.spike_min_window > self.spike_window:
            raise ValueError(
                f"DetectorConfig.spike_min_window ({self.spike_min_window}) must be <= "
                f"spike_window ({self.spike_window})"
            )
        above = {"spike_sigma_floor": 0.0, "growth_floor": 0.0, "onset_z": 0.0}
        for name, lo in above.items():
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= lo:
                raise ValueError(f"DetectorConfig.{name} must be a finite number > {lo}, got {v!r}")
        for name in ("growth_factor", "onset_factor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1.0:
                raise ValueError(f"DetectorConfig.{name} must be a finite number >= 1, got {v!r}")
        if not 0.0 <= self.growth_quantile <= 0.5:
            raise ValueError(f"DetectorConfig.growth_quantile must be in [0, 0.5], got {self.growth_quantile!r}")
        if not 0.0 < self.overflow_fraction <= 1.0:
            raise ValueError(
                f"DetectorConfig.overflow_fraction must be in (0, 1], got {self.overflow_fraction!r}"
            )
        if self.dtype is not None:
            name = _DTYPE_ALIASES.get(str(self.dtype), str(self.dtype)).removeprefix("torch.")
            if name not in DTYPE_MAX:
                raise ValueError(
                    f"DetectorConfig.dtype must be one of {sorted(DTYPE_MAX)} or None, got "
                    f"{self.dtype!r}; for another dtype set dtype_max to its largest value"
                )
            object.__setattr__(self, "dtype", name)
        if self.dtype_max is not None and not (
            isinstance(self.dtype_max, (int, float)) and math.isfinite(self.dtype_max) and self.dtype_max > 0
        ):
            raise ValueError(f"DetectorConfig.dtype_max must be a finite number > 0, got {self.dtype_max!r}")

    @property
    def limit(self) -> float | None:
        """The overflow limit in effect (None: overflow rule off)."""
        if self.dtype_max is not None:
            return float(self.dtype_max)
        return DTYPE_MAX[self.dtype] if self.dtype is not None else None


@dataclass(frozen=True)
class Verdict:
    """A detected divergence: what, where, since when.

    Attributes:
        kind: ``"nonfinite"``, ``"overflow"``, ``"spike"`` or ``"growth"``.
        signal: the key that tripped the rule (``"loss"``, ``"grad_norm"``, ``"attn_max"``...).
        layer: module name for per-layer signals, else None.
        onset_step: where the signal first left its healthy band (<= detection_step).
        detection_step: the step whose record tripped the rule.
        evidence: the numbers behind the decision (value, baseline, threshold...).
        message: one human-readable line.
    """

    kind: str
    signal: str
    layer: str | None
    onset_step: int
    detection_step: int
    evidence: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict:
        """Strict-JSON form (non-finite evidence values become the strings "nan", "inf", "-inf")."""
        d = asdict(self)
        d["evidence"] = {k: _json_float(v) for k, v in self.evidence.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Verdict.from_dict: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        d = dict(d)
        d["evidence"] = {k: float(v) for k, v in d.get("evidence", {}).items()}
        return cls(**d)


def _json_float(v: float):
    v = float(v)
    return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


class _History:
    """Finite observations of one signal in step order: step, value (log scale), and whether
    the value may enter a baseline. Compact arrays: a large model has thousands of series."""

    __slots__ = ("steps", "vals", "ok")

    def __init__(self):
        self.steps, self.vals, self.ok = array("q"), array("d"), array("b")

    def add(self, step: int, val: float, ok: bool) -> None:
        self.steps.append(step)
        self.vals.append(val)
        self.ok.append(ok)

    def cut(self, first: int, last: int) -> None:
        """Keep only steps in [first, last]."""
        j = bisect_right(self.steps, last)
        del self.steps[j:], self.vals[j:], self.ok[j:]
        i = bisect_left(self.steps, first)
        if i:
            del self.steps[:i], self.vals[:i], self.ok[:i]

    def window(self, lo: int, hi: int, baseline: bool) -> np.ndarray:
        """Values with lo <= step <= hi; only baseline-eligible ones if `baseline`."""
        i, j = bisect_left(self.steps, lo), bisect_right(self.steps, hi)
        v = np.frombuffer(self.vals[i:j], dtype=np.float64)
        return v[np.frombuffer(self.ok[i:j], dtype=np.int8) != 0] if baseline else v

    def walk_back(self, start: int, stop: int, above: float) -> int | None:
        """Earliest step of the unbroken run of values > `above` ending at the last value at or
        before `start` (values before step `stop` are not looked at); None if that value is
        not above."""
        onset = None
        for k in range(bisect_right(self.steps, start) - 1, -1, -1):
            if self.steps[k] < stop or not self.vals[k] > above:
                break
            onset = self.steps[k]
        return onset

    def to_json(self) -> list:
        return [self.steps.tolist(), self.vals.tolist(), self.ok.tolist()]

    @classmethod
    def from_json(cls, d: list) -> _History:
        h = cls()
        h.steps.extend(int(s) for s in d[0])
        h.vals.extend(float(v) for v in d[1])
        h.ok.extend(1 if o else 0 for o in d[2])
        return h


def _robust(base: np.ndarray, floor: float) -> tuple[float, float]:
    med = float(np.median(base))
    return med, max(_MAD_TO_SIGMA * float(np.median(np.abs(base - med))), floor)


def _quantile(v: np.ndarray, q: float) -> float:
    """np.quantile's default (linear) estimate, without its per-call overhead (~10x)."""
    v = np.sort(v)
    pos = q * (len(v) - 1)
    i = int(pos)
    return float(v[i]) if i + 1 >= len(v) else float(v[i] + (v[i + 1] - v[i]) * (pos - i))


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
        onset = min(verdict.onset_step, self._skipped[first])
        evidence = {**verdict.evidence, "skipped_recent": float(n)}
        message = f"{verdict.message}; {n} steps skipped in the last {c.skip_window}"
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
