"""What the panel builders share: the effective timeline, layer order, non-finite markers, the
linear/log buttons, and reading an event's fields."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from thermo.store import Run

_NONFINITE_COLOR = "#d62728"


def effective_mask(df: pd.DataFrame, attempts: pd.DataFrame) -> pd.Series:
    """True for the rows of `df` (with attempt and step columns) on the effective timeline:
    row (a, s) is effective when no later attempt restarted at or before step s."""
    if df.empty or attempts is None or attempts.empty:
        return pd.Series(True, index=df.index)
    end = df["attempt"].map(attempts.set_index("attempt")["end_step"]).fillna(2**62)
    return df["step"] <= end


def layer_order(run: Run, stat: str) -> list[str]:
    """Layers that record `stat`, in model order (the run's meta "layers"); layers only seen in
    the data (not in meta) follow in order of appearance."""
    seen = pd.unique(run.layers.loc[run.layers["stat"] == stat, "layer"]).tolist()
    order = [entry["name"] for entry in run.meta.get("layers", []) if stat in entry.get("stats", ())]
    known = set(order)
    present = set(seen)
    return [name for name in order if name in present] + [n for n in seen if n not in known]


def _nonfinite_label(v: float) -> str:
    return "NaN" if math.isnan(v) else ("+inf" if v > 0 else "-inf")


def _overlay_axis(fig: go.Figure, name: str, over: str) -> str:
    """A hidden [0, 1] y axis over `over` (e.g. "y2"), for markers pinned to the top of a plot
    whatever the main axis' range or scale. Returns its trace reference ("y9")."""
    fig.layout[f"yaxis{name}"] = dict(
        overlaying=over, range=[0, 1], visible=False, fixedrange=True, showgrid=False
    )
    return f"y{name}"


def _add_nonfinite(fig: go.Figure, x, y, yref: str, xref: str, name: str, legend: bool) -> None:
    """Mark the non-finite points of a series at the top of its plot (never drop them)."""
    y = np.asarray(y, dtype="float64")
    bad = ~np.isfinite(y)
    if not bad.any():
        return
    labels = [_nonfinite_label(v) for v in y[bad]]
    fig.add_trace(go.Scatter(
        x=np.asarray(x)[bad], y=np.full(bad.sum(), 0.97), yaxis=yref, xaxis=xref,
        mode="markers", marker=dict(symbol="x", size=9, color=_NONFINITE_COLOR),
        name="non-finite", legendgroup="non-finite", showlegend=legend,
        text=[f"{name}: {t}" for t in labels], hovertemplate="step %{x}<br>%{text}<extra></extra>",
    ))


def _scale_buttons(n_axes: int, log_y: bool) -> list[dict]:
    axes = ["yaxis"] + [f"yaxis{i}" for i in range(2, n_axes + 1)]
    buttons = [
        dict(label=label, method="relayout", args=[{f"{a}.type": kind for a in axes}])
        for label, kind in (("linear", "linear"), ("log", "log"))
    ]
    return [dict(type="buttons", direction="right", x=1.0, xanchor="right", y=1.02,
                 yanchor="bottom", buttons=buttons, active=1 if log_y else 0, showactive=True,
                 pad=dict(t=0, b=0), font=dict(size=11))]


def _data(event: pd.Series) -> dict:
    data = event.get("data")
    return data if isinstance(data, dict) else {}


def _int_or_none(v) -> int | None:
    try:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
    except (TypeError, ValueError):
        return None


def _first(*values):
    return next((v for v in values if v is not None), None)



def block_of(name: str) -> str | None:
    """The repeated block a layer belongs to: ``h.3`` for ``h.3.attn.c_attn`` (the name up to
    its first numeric part), None for layers outside any block (``wte``, ``lm_head``)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return None


def module_type(name: str) -> str:
    """What a layer is, whatever block it sits in: ``attn.c_attn`` for ``h.3.attn.c_attn``,
    ``block`` for ``h.3`` itself, the name itself outside blocks (``lm_head``)."""
    block = block_of(name)
    if block is None:
        return name
    rest = name[len(block) + 1:]
    return rest or "block"


def verdicts(run: Run) -> list[dict]:
    """The run's verdicts, one dict each: layer, signal, kind, onset, detect, cause (deduplicated
    when the Guard and the supervisor both recorded the same divergence)."""
    out, seen = [], set()
    for _, e in run.events.iterrows():
        if e["kind"] != "verdict":
            continue
        d = _data(e)
        detect = _first(_int_or_none(d.get("detection_step")), _int_or_none(e.get("step")))
        onset = _int_or_none(d.get("onset_step"))
        key = (d.get("kind"), d.get("signal"), d.get("layer"), onset, detect)
        if key in seen:
            continue
        seen.add(key)
        out.append({"kind": d.get("kind") or "verdict", "signal": d.get("signal"),
                    "layer": d.get("layer"), "onset": onset, "detect": detect,
                    "cause": d.get("cause")})
    return out


def spans_decades(values, decades: float = 2.0) -> bool:
    """True when the positive finite values span more than `decades` orders of magnitude: a
    linear axis would flatten the small ones to zero (a grad-norm spike over a healthy curve)."""
    v = np.asarray(values, dtype="float64")
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) < 2:
        return False
    return float(np.log10(v.max()) - np.log10(v.min())) > decades
