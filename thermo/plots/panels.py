"""The panel builders: `loss_figure`, `heatmap_figure`, `attention_figure`, `events_figure`."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from thermo.plots.downsampling import DEFAULT_MAX_POINTS, downsample
from thermo.plots.shared import (
    _NONFINITE_COLOR,
    _add_nonfinite,
    _data,
    _first,
    _int_or_none,
    _nonfinite_label,
    _overlay_axis,
    _scale_buttons,
    effective_mask,
    layer_order,
)
from thermo.store import Run

# Heatmap columns: cells narrower than a pixel only cost memory.
DEFAULT_MAX_COLS = 800
FP16_MAX = 65504.0
# Draw the fp16 limit when values come within this fraction of it, whatever the dtype.
_NEAR_OVERFLOW = 0.25
_EVENT_COLORS = {
    "verdict": "#d62728", "rollback": "#ff7f0e", "restart": "#9467bd", "blacklist": "#8c564b",
    "skip_step": "#7f7f7f", "give_up": "#000000",
}
_TITLES = {"loss": "Loss", "grad_norm": "Gradient norm"}
_MAX_MARKED_EVENTS = 200


def loss_figure(
    run: Run,
    keys: tuple[str, ...] | list[str] = ("loss", "grad_norm"),
    log_y: bool = False,
    max_points: int = DEFAULT_MAX_POINTS,
    height: int | None = None,
) -> go.Figure:
    """Loss and gradient norm over steps, one row per key, with the run's history marked.

    Marks: verdicts shade onset..detection (the skipped range); rollbacks draw an arrow from the
    detection step back to the restored step; attempt starts, restarts, skipped steps and
    give-ups get vertical lines. Rows of rolled-back attempts are drawn faint and dotted.
    Non-finite values are red markers at the top of their row. Buttons switch linear/log.

    Args:
        run: the run (``thermo.dashboard.read_run(run_dir)`` includes rolled-back rows).
        keys: scalar keys to draw, one row each (missing ones are skipped).
        log_y: start with log-scale y axes.
        max_points: per drawn series (see `downsample`).
        height: figure height in pixels (default: 220 per row + margins).

    Returns:
        The figure.

    Example:
        >>> loss_figure(read_run("runs/exp1"), log_y=True).show()
    """
    sc = run.scalars
    keys = [k for k in keys if k in sc.columns] or [k for k in keys][:1]
    fig = make_subplots(rows=len(keys), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[_TITLES.get(k, k) for k in keys])
    eff = effective_mask(sc, run.attempts) if not sc.empty else pd.Series(dtype=bool)
    shown_rb = shown_bad = False
    for row, key in enumerate(keys, start=1):
        axis_n = "" if row == 1 else str(row)
        xref, yref = f"x{axis_n}", f"y{axis_n}"
        if key in sc.columns:
            main = sc[eff].sort_values("step")
            xs, ys = downsample(main["step"].to_numpy(), main[key].to_numpy(), max_points)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=key, line=dict(width=1.5)),
                          row=row, col=1)
            for attempt, part in sc[~eff].groupby("attempt"):
                part = part.sort_values("step")
                bx, by = downsample(part["step"].to_numpy(), part[key].to_numpy(), max_points)
                fig.add_trace(go.Scatter(
                    x=bx, y=by, mode="lines", opacity=0.45,
                    line=dict(width=1, dash="dot", color="#7f7f7f"),
                    name="rolled back", legendgroup="rolled back", showlegend=not shown_rb,
                    hovertemplate=f"attempt {attempt} (rolled back)<br>step %{{x}}<br>%{{y}}<extra></extra>",
                ), row=row, col=1)
                shown_rb = True
            over = _overlay_axis(fig, str(90 + row), yref)
            had_bad = len(fig.data)
            _add_nonfinite(fig, xs, ys, over, xref, key, legend=not shown_bad)
            shown_bad = shown_bad or len(fig.data) > had_bad
        fig.update_yaxes(type="log" if log_y else "linear", row=row, col=1)
    _mark_history(fig, run)
    fig.update_xaxes(title_text="step", row=len(keys), col=1)
    fig.update_layout(
        height=height or 120 + 220 * len(keys), margin=dict(l=60, r=20, t=70, b=40),
        updatemenus=_scale_buttons(len(keys), log_y), legend=dict(orientation="h", y=-0.15),
        hovermode="x unified",
    )
    return fig


def _mark_history(fig: go.Figure, run: Run) -> None:
    """Shapes and arrows for events and attempts on a figure whose x axis is the step."""
    for _, a in run.attempts.iterrows():
        if int(a["attempt"]) > 0 and int(a["start_step"]) >= 0:
            fig.add_vline(x=int(a["start_step"]), line=dict(color="#9467bd", dash="dot", width=1))
    # The latest events only: thousands of shapes (a run that skips many steps) freeze plotly;
    # the events table still lists them all.
    for _, e in run.events.tail(_MAX_MARKED_EVENTS).iterrows():
        d, kind = _data(e), e["kind"]
        color = _EVENT_COLORS.get(kind, "#7f7f7f")
        step = _int_or_none(e.get("step"))
        if kind in ("verdict", "rollback"):
            onset = _int_or_none(d.get("onset_step"))
            detect = _first(_int_or_none(d.get("detection_step")), step)
            if onset is not None and detect is not None:
                fig.add_vrect(x0=onset, x1=max(detect, onset + 0.5), fillcolor=color,
                              opacity=0.12 if kind == "verdict" else 0.08, line_width=0, layer="below")
            elif detect is not None:
                fig.add_vline(x=detect, line=dict(color=color, width=1))
            if kind == "verdict" and detect is not None:
                label = " ".join(str(d[k]) for k in ("signal", "layer") if d.get(k)) or "verdict"
                fig.add_annotation(x=detect, y=1.0, xref="x", yref="y domain", text=label,
                                   showarrow=False, yanchor="bottom", font=dict(color=color, size=10))
            if kind == "rollback":
                src = _first(_int_or_none(d.get("from_step")), detect)
                dst = _int_or_none(d.get("to_step"))
                if src is not None and dst is not None:
                    fig.add_annotation(
                        x=dst, y=0.85, xref="x", yref="y domain", ax=src, ay=0.85, axref="x",
                        ayref="y domain", showarrow=True, arrowhead=2, arrowwidth=1.5,
                        arrowcolor=color, text=f"rollback → {dst}", font=dict(color=color, size=10),
                    )
        elif kind in ("restart", "give_up", "skip_step"):
            # skip_step's data may name the step too; Store.event keeps it in the step column.
            at = _int_or_none(d.get("step", step))
            if at is not None:
                fig.add_vline(x=at, line=dict(color=color, width=1,
                                               dash="solid" if kind == "give_up" else "dash"))


def heatmap_figure(
    run: Run,
    stat: str = "act_max",
    color_scale: str = "log",
    max_cols: int = DEFAULT_MAX_COLS,
    height: int | None = None,
) -> go.Figure:
    """The thermometer heatmap: layers (rows, model order, first at the top) × steps, colour =
    `stat`. Steps are binned to at most `max_cols` columns, keeping the bin's max (its min for
    ``*_min`` stats) so a spike stays visible; bins holding a non-finite value get a red ×.

    Args:
        run: the run; only effective rows are drawn.
        stat: per-layer statistic (``act_max``, ``act_min``, ``attn_max``, ``attn_bound``,
            ``grad_max``...).
        color_scale: ``"log"`` colours log10|value| (layers differ by orders of magnitude);
            ``"linear"`` colours the value itself.
        max_cols: most step columns drawn.
        height: figure height in pixels (default grows with the number of layers).

    Returns:
        The figure.

    Example:
        >>> heatmap_figure(read_run("runs/exp1"), stat="attn_max").show()
    """
    if color_scale not in ("log", "linear"):
        raise ValueError(f"heatmap color_scale must be 'log' or 'linear', got {color_scale!r}")
    df = run.layers[run.layers["stat"] == stat]
    df = df[effective_mask(df, run.attempts)]
    rows = layer_order(run, stat)
    fig = go.Figure()
    title = f"{stat} per layer" + (" (colour: log10 |value|)" if color_scale == "log" else "")
    fig.update_layout(title=title, height=height or max(260, 110 + 18 * len(rows)),
                      margin=dict(l=140, r=20, t=50, b=40))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(autorange="reversed", type="category")
    if df.empty:
        return fig
    steps = np.sort(df["step"].unique())
    size = max(1, math.ceil(len(steps) / max_cols))
    n_cols = math.ceil(len(steps) / size)
    x = steps[::size]
    # Integer cell keys (row * n_cols + col): grouping on them is far cheaper than on names.
    row = pd.Categorical(df["layer"], categories=rows).codes.astype("int64")
    col = np.searchsorted(steps, df["step"].to_numpy()) // size
    cell = row * n_cols + col
    value = df["value"].to_numpy(dtype="float64")
    finite = np.isfinite(value)
    reduce = "min" if stat.endswith("_min") else "max"
    agg = pd.Series(value[finite]).groupby(cell[finite]).agg(reduce)
    zval = np.full((len(rows), n_cols), np.nan)
    zval.flat[agg.index.to_numpy()] = agg.to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        color = np.log10(np.abs(zval)) if color_scale == "log" else zval.copy()
    color[~np.isfinite(color)] = np.nan  # log10(0) = -inf: no colour rather than a bad scale
    span = f"steps {x[0]}.." if size > 1 else "step "
    fig.add_trace(go.Heatmap(
        z=color, x=x, y=rows, customdata=zval, colorscale="Viridis", colorbar=dict(title="log10|v|" if color_scale == "log" else stat),
        hovertemplate=f"%{{y}}<br>{span}%{{x}}<br>{stat} %{{customdata:.4g}}<extra></extra>",
        hoverongaps=False,
    ))
    if not finite.all():
        first = pd.Series(value[~finite]).groupby(cell[~finite]).first()
        keys = first.index.to_numpy()
        fig.add_trace(go.Scatter(
            x=x[keys % n_cols], y=[rows[r] for r in keys // n_cols], mode="markers",
            marker=dict(symbol="x", size=10, color=_NONFINITE_COLOR, line=dict(width=1)),
            name="non-finite", text=[_nonfinite_label(v) for v in first.to_numpy()],
            hovertemplate="%{y}<br>step %{x}<br>%{text}<extra></extra>",
        ))
    return fig


def attention_figure(
    run: Run,
    stat: str = "attn_max",
    bound: bool = False,
    dtype: str | None = None,
    log_y: bool = False,
    max_points: int = DEFAULT_MAX_POINTS,
    height: int | None = None,
) -> go.Figure:
    """Attention-logit maximum per layer as lines (the picture that shows a layer running away),
    with the fp16 overflow limit (65504) drawn when the run computes in fp16 or any value comes
    within a quarter of it.

    Args:
        run: the run; only effective rows are drawn.
        stat: ``attn_max`` (exact, on sampled steps) or ``attn_bound`` (every step).
        bound: also draw ``attn_bound`` faintly (dashed) when `stat` is ``attn_max``.
        dtype: the compute dtype ("float16", "bfloat16"...); default: the run's meta
            (``compute_dtype`` or ``dtype``), if it says.
        log_y: start with a log-scale y axis.
        max_points: per drawn series (see `downsample`).
        height: figure height in pixels.

    Returns:
        The figure.

    Example:
        >>> attention_figure(read_run("runs/exp1"), dtype="float16").show()
    """
    df = run.layers[run.layers["stat"].isin([stat, "attn_bound"] if bound else [stat])]
    df = df[effective_mask(df, run.attempts)]
    fig = go.Figure()
    over = _overlay_axis(fig, "9", "y")
    peak = -math.inf
    shown_bad = False
    for i, layer in enumerate(layer_order(run, stat)):
        color = _palette(i)
        for s in ([stat, "attn_bound"] if bound and stat != "attn_bound" else [stat]):
            part = df[(df["layer"] == layer) & (df["stat"] == s)].sort_values("step")
            if part.empty:
                continue
            xs, ys = downsample(part["step"].to_numpy(), part["value"].to_numpy(), max_points)
            finite = ys[np.isfinite(ys)]
            if len(finite):
                peak = max(peak, float(np.abs(finite).max()))
            faint = s != stat
            fig.add_trace(go.Scatter(
                x=xs, y=ys, name=f"{layer} (bound)" if faint else layer, legendgroup=layer,
                mode="lines" if faint or len(xs) > 200 else "lines+markers",
                line=dict(color=color, width=1 if faint else 1.8, dash="dash" if faint else "solid"),
                opacity=0.5 if faint else 1.0, connectgaps=False,
            ))
            n = len(fig.data)
            _add_nonfinite(fig, xs, ys, over, "x", f"{layer} {s}", legend=not shown_bad)
            shown_bad = shown_bad or len(fig.data) > n
    dtype = dtype or _meta_dtype(run.meta)
    if (dtype and "16" in dtype and "bf" not in dtype) or peak >= _NEAR_OVERFLOW * FP16_MAX:
        fig.add_hline(y=FP16_MAX, line=dict(color=_NONFINITE_COLOR, dash="dash", width=1.5),
                      annotation_text="fp16 max 65504", annotation_position="top left")
    fig.update_layout(
        title=f"attention logits: {stat} per layer", height=height or 380,
        margin=dict(l=60, r=20, t=70, b=40), updatemenus=_scale_buttons(1, log_y),
        yaxis_type="log" if log_y else "linear", xaxis_title="step",
    )
    return fig


def _meta_dtype(meta: dict[str, Any]) -> str | None:
    for where in (meta, meta.get("config") or {}, meta.get("run") or {}):
        if isinstance(where, dict):
            for key in ("compute_dtype", "dtype", "autocast_dtype"):
                if where.get(key):
                    return str(where[key]).replace("torch.", "")
    return None


def _palette(i: int) -> str:
    import plotly.colors

    colors = plotly.colors.qualitative.D3
    return colors[i % len(colors)]


def event_details(kind: str, d: dict) -> str:
    """One human line for an event's data (what the table shows)."""
    parts = []
    if kind == "verdict":
        parts = [str(d.get(k)) for k in ("kind", "signal", "layer") if d.get(k)]
        if d.get("onset_step") is not None:
            parts.append(f"onset {d['onset_step']} → detected {d.get('detection_step')}")
    elif kind == "rollback":
        parts.append(f"{d.get('from_step')} → {d.get('to_step')}")
        if d.get("onset_step") is not None:
            parts.append(f"skipped onset {d['onset_step']}..{d.get('detection_step')}")
        n = d.get("n_blacklisted", len(d.get("blacklisted") or []))
        parts.append(f"{n} samples blacklisted")
    elif kind == "restart":
        parts = [f"{k} {d[k]}" for k in ("reason", "exit_code") if d.get(k) is not None]
    elif kind == "blacklist":
        for k in ("added", "removed"):
            v = d.get(k)
            if v:
                parts.append(f"{k} {len(v) if isinstance(v, (list, tuple)) else v}")
        if d.get("reason"):
            parts.append(str(d["reason"]))
    else:
        parts = [f"{k} {v}" for k, v in d.items() if not isinstance(v, (list, dict))]
    return "; ".join(parts)


def _tint(hex_color: str, alpha: float = 0.13) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def events_figure(run: Run, max_rows: int = 500, height: int | None = None) -> go.Figure:
    """The table of events (verdicts, rollbacks, restarts, blacklist edits, skipped steps,
    give-ups), oldest first; the last `max_rows` are kept.

    Example:
        >>> events_figure(read_run("runs/exp1")).show()
    """
    ev = run.events.tail(max_rows)
    cols = {"time": [], "attempt": [], "step": [], "kind": [], "message": [], "details": []}
    for _, e in ev.iterrows():
        cols["time"].append(_dt.datetime.fromtimestamp(float(e["time"])).strftime("%Y-%m-%d %H:%M:%S"))
        cols["attempt"].append(int(e["attempt"]))
        step = _int_or_none(e.get("step"))
        cols["step"].append("" if step is None else step)
        cols["kind"].append(e["kind"])
        cols["message"].append(str(e["message"]))
        cols["details"].append(event_details(e["kind"], _data(e)))
    fill = [[_tint(_EVENT_COLORS.get(k, "#ffffff")) for k in cols["kind"]]] * len(cols)
    fig = go.Figure(go.Table(
        columnwidth=[14, 6, 6, 8, 40, 40],
        header=dict(values=list(cols), fill_color="#e5e5e5", align="left"),
        cells=dict(values=list(cols.values()), align="left", fill_color=fill, height=24),
    ))
    n = len(ev)
    fig.update_layout(title=f"events ({len(run.events)})", margin=dict(l=10, r=10, t=40, b=10),
                      height=height or min(640, 120 + 44 * max(n, 1)))  # rows wrap to 2 lines
    return fig
