"""`Verdict`: a detected divergence (what, where, since when), and its strict-JSON form."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


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
