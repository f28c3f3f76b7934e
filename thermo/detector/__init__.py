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

from thermo.detector.config import DTYPE_MAX, DetectorConfig, SpikeRule
from thermo.detector.detector import Detector
from thermo.detector.replay import detect_run
from thermo.detector.verdict import Verdict

__all__ = ["DTYPE_MAX", "Detector", "DetectorConfig", "SpikeRule", "Verdict", "detect_run"]
