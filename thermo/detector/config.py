"""The detector's knobs: `DetectorConfig`, one `SpikeRule` per watched scalar, dtype limits."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

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
        skip_cluster_gap: the onset of a verdict on skipped steps reaches back through the
            skipped steps that follow each other with at most this many steps between them; an
            older, isolated skip still counts towards `skip_tolerance` but does not move the
            onset (it was harmless: its update never happened).
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
    skip_cluster_gap: int = 20

    def to_dict(self) -> dict:
        """Plain JSON-able values (what the store's meta records; `from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        """The config `to_dict` gave (lists back to tuples, spike rules back to `SpikeRule`).

        Raises:
            ValueError: an unknown field or a bad value, named.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"DetectorConfig has no field {unknown[0]!r}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if "spikes" in kw:
            kw["spikes"] = tuple(SpikeRule(**r) if isinstance(r, dict) else r for r in kw["spikes"])
        return cls(**kw)

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
                "onset_lookback": 0, "skip_tolerance": 0, "skip_window": 1, "skip_cluster_gap": 1}
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
