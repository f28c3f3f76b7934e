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
    block_of,
    effective_mask,
    layer_order,
    module_type,
    spans_decades,
    verdicts,
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
    log_y: bool | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    height: int | None = None,
) -> go.Figure:
    """Loss and gradient norm over steps, one row per key, with the run's history marked.

    Marks: each verdict shades onset..detection (the window judged sick and skipped) with a label
    saying what diverged, where, and that the band runs from the onset to the detection; labels
    that would overlap are stacked. Rollbacks draw an arrow from the detection step back to the
    restored step; attempt starts, restarts, skipped steps and give-ups get vertical lines. Rows of
    rolled-back attempts are drawn faint and dotted. Non-finite values are red markers at the top
    of their row. Buttons switch linear/log.

    Args:
        run: the run (``thermo.dashboard.read_run(run_dir)`` includes rolled-back rows).
        keys: scalar keys to draw, one row each (missing ones are skipped).
        log_y: log-scale y axes; None (default) picks log for a row whose values span more than
            two decades (a grad-norm spike would flatten a linear axis), linear otherwise.
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
    any_log = False
    for row, key in enumerate(keys, start=1):
        axis_n = "" if row == 1 else str(row)
        xref, yref = f"x{axis_n}", f"y{axis_n}"
        row_log = bool(log_y)
        if key in sc.columns:
            main = sc[eff].sort_values("step")
            xs, ys = downsample(main["step"].to_numpy(), main[key].to_numpy(), max_points)
            if log_y is None:
                row_log = spans_decades(sc[key].to_numpy())
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
        any_log = any_log or row_log
        fig.update_yaxes(type="log" if row_log else "linear", row=row, col=1)
    _mark_history(fig, run)
    fig.update_xaxes(title_text="step", row=len(keys), col=1)
    fig.update_layout(
        height=height or 120 + 220 * len(keys), margin=dict(l=60, r=20, t=70, b=40),
        updatemenus=_scale_buttons(len(keys), any_log), legend=dict(orientation="h", y=-0.15),
        hovermode="x unified",
    )
    return fig


def _x_span(run: Run) -> float:
    steps = [run.scalars["step"]] if len(run.scalars) else []
    if len(run.layers):
        steps.append(run.layers["step"])
    if not steps:
        return 1.0
    lo = min(float(s.min()) for s in steps)
    hi = max(float(s.max()) for s in steps)
    return max(hi - lo, 1.0)


def _stack(xs: list[float], gap: float) -> list[int]:
    """A level per label (0 = top) so that labels on one level are at least `gap` apart in x."""
    levels: list[float] = []  # last x placed on each level
    out = []
    for x in xs:
        for i, last in enumerate(levels):
            if x - last >= gap:
                levels[i] = x
                out.append(i)
                break
        else:
            levels.append(x)
            out.append(len(levels) - 1)
    return out


def verdict_label(v: dict) -> str:
    what = " ".join(str(v[k]) for k in ("kind", "signal") if v.get(k))
    if v.get("layer"):
        what += f" in {v['layer']}"
    if v.get("onset") is not None and v.get("detect") is not None and v["onset"] != v["detect"]:
        what += f" · onset {v['onset']} → detected {v['detect']}"
    elif v.get("detect") is not None:
        what += f" · step {v['detect']}"
    return what


def _mark_history(fig: go.Figure, run: Run, labels: bool = True) -> None:
    """Shapes and arrows for events and attempts on a figure whose x axis is the step."""
    for _, a in run.attempts.iterrows():
        if int(a["attempt"]) > 0 and int(a["start_step"]) >= 0:
            fig.add_vline(x=int(a["start_step"]), line=dict(color="#9467bd", dash="dot", width=1))
    color = _EVENT_COLORS["verdict"]
    vs = [v for v in verdicts(run) if v["detect"] is not None][-_MAX_MARKED_EVENTS:]
    for v in vs:
        if v["onset"] is not None:
            fig.add_vrect(x0=v["onset"], x1=max(v["detect"], v["onset"] + 0.5), fillcolor=color,
                          opacity=0.12, line_width=0, layer="below")
        else:
            fig.add_vline(x=v["detect"], line=dict(color=color, width=1))
    if labels and vs:
        # Stacked so two verdicts close together stay readable; each label says the band is
        # the onset..detection window (where the signal left its band, before it tripped).
        centers = [(v["onset"] + v["detect"]) / 2 if v["onset"] is not None else v["detect"] for v in vs]
        order = sorted(range(len(vs)), key=lambda i: centers[i])
        gap = 0.22 * _x_span(run)
        levels = dict(zip(order, _stack([centers[i] for i in order], gap)))
        for i, v in enumerate(vs):
            fig.add_annotation(
                x=centers[i], y=1.0 - 0.11 * levels[i], xref="x", yref="y domain",
                text=verdict_label(v), showarrow=False, yanchor="top",
                font=dict(color=color, size=10), bgcolor="rgba(255,255,255,0.8)",
                hovertext="shaded: onset..detection, the steps judged sick (their batches are skipped)",
            )
    # The latest events only: thousands of shapes (a run that skips many steps) freeze plotly;
    # the events table still lists them all.
    for _, e in run.events.tail(_MAX_MARKED_EVENTS).iterrows():
        d, kind = _data(e), e["kind"]
        color = _EVENT_COLORS.get(kind, "#7f7f7f")
        step = _int_or_none(e.get("step"))
        if kind == "rollback":
            src = _first(_int_or_none(d.get("from_step")), _int_or_none(d.get("detection_step")), step)
            dst = _int_or_none(d.get("to_step"))
            if src is not None and dst is not None:
                fig.add_annotation(
                    x=dst, y=0.12, xref="x", yref="y domain", ax=src, ay=0.12, axref="x",
                    ayref="y domain", showarrow=True, arrowhead=2, arrowwidth=1.5,
                    arrowcolor=color, text=f"rollback → {dst}", font=dict(color=color, size=10),
                )
        elif kind in ("restart", "give_up", "skip_step"):
            # skip_step's data may name the step too; Store.event keeps it in the step column.
            at = _int_or_none(d.get("step", step))
            if at is not None:
                fig.add_vline(x=at, line=dict(color=color, width=1,
                                               dash="solid" if kind == "give_up" else "dash"))


def _heat_rows(run: Run, df: pd.DataFrame, stat: str, group: str, types, top: int | None):
    """(row names, layer -> row) for the heatmap: every layer, or one row per block, filtered by
    module type, or only the `top` hottest."""
    layers = layer_order(run, stat)
    if types:
        want = [types] if isinstance(types, str) else list(types)
        layers = [n for n in layers if any(module_type(n) == t or module_type(n).startswith(t + ".")
                                           or module_type(n).endswith("." + t) for t in want)]
    if top:
        mag = df.assign(m=df["value"].abs().fillna(np.inf)).groupby("layer")["m"].max()
        hot = set(mag.reindex(layers).sort_values(ascending=False, kind="stable").index[:top])
        layers = [n for n in layers if n in hot]
    if group == "auto":
        group = "block" if len(layers) > 60 else "layer"
    if group == "block":
        mapping = {n: block_of(n) or n for n in layers}
        rows = list(dict.fromkeys(mapping.values()))
    else:
        mapping = {n: n for n in layers}
        rows = layers
    return rows, mapping


def _grid(df: pd.DataFrame, rows: list[str], mapping: dict, steps: np.ndarray, size: int,
          reduce: str):
    """(values[rows, cols], per-cell first non-finite or None) of `df` binned `size` steps a
    column; a cell keeps the bin's max (min for *_min stats)."""
    n_cols = math.ceil(len(steps) / size)
    row = pd.Categorical(df["layer"].map(mapping), categories=rows).codes.astype("int64")
    col = np.searchsorted(steps, df["step"].to_numpy()) // size
    keep = row >= 0
    cell = (row * n_cols + col)[keep]
    value = df["value"].to_numpy(dtype="float64")[keep]
    finite = np.isfinite(value)
    agg = pd.Series(value[finite]).groupby(cell[finite]).agg(reduce)
    zval = np.full((len(rows), n_cols), np.nan)
    zval.flat[agg.index.to_numpy()] = agg.to_numpy()
    bad = pd.Series(value[~finite]).groupby(cell[~finite]).first() if not finite.all() else None
    return zval, bad


def heatmap_figure(
    run: Run,
    stat: str = "act_max",
    color_scale: str = "log",
    max_cols: int = DEFAULT_MAX_COLS,
    height: int | None = None,
    group: str = "auto",
    types: list[str] | str | None = None,
    top: int | None = None,
    rolled_back: bool = True,
) -> go.Figure:
    """The thermometer heatmap: layers (rows, model order, first at the top) × steps, colour =
    `stat`. Steps are binned to at most `max_cols` columns, keeping the bin's max (its min for
    ``*_min`` stats) so a spike stays visible; bins holding a non-finite value get a red ×.
    The layer a verdict names is marked (▶ on its row label, a red outline and an arrow at the
    detection step). When the run rolled back, a second strip below shows the rolled-back branch
    (the steps that diverged) with the same rows.

    Args:
        run: the run (with rolled-back rows for the second strip).
        stat: per-layer statistic (``act_max``, ``act_min``, ``attn_max``, ``attn_bound``,
            ``grad_max``...).
        color_scale: ``"log"`` colours log10|value| (layers differ by orders of magnitude);
            ``"linear"`` colours the value itself.
        max_cols: most step columns drawn.
        height: figure height in pixels (default grows with the number of rows, capped).
        group: ``"layer"`` (a row per layer), ``"block"`` (a row per block: the max over its
            modules), ``"auto"`` (blocks when there are more than 60 layers).
        types: only layers of these module types (``"attn"``, ``"mlp.c_fc"``, ``"block"``,
            ``"ln_1"``: see `thermo.plots.shared.module_type`).
        top: only the `top` hottest layers (largest |value| seen, NaN hottest).
        rolled_back: draw the rolled-back branch strip when there is one.

    Returns:
        The figure.

    Example:
        >>> heatmap_figure(read_run("runs/exp1"), stat="attn_max", top=20).show()
    """
    if color_scale not in ("log", "linear"):
        raise ValueError(f"heatmap color_scale must be 'log' or 'linear', got {color_scale!r}")
    if group not in ("auto", "layer", "block"):
        raise ValueError(f"heatmap group must be 'auto', 'layer' or 'block', got {group!r}")
    if top is not None and (not isinstance(top, int) or top < 1):
        raise ValueError(f"heatmap top must be an int >= 1 or None, got {top!r}")
    every = run.layers[run.layers["stat"] == stat]
    mask = effective_mask(every, run.attempts)
    df, old = every[mask], every[~mask]
    rows, mapping = _heat_rows(run, every, stat, group, types, top)
    grouped = any(k != v for k, v in mapping.items())
    branch = rolled_back and not old.empty
    n_rows = 2 if branch else 1
    if branch:
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                            row_heights=[0.62, 0.38],
                            subplot_titles=["effective timeline", "rolled-back branch (the steps that diverged)"])
    else:
        fig = go.Figure()
    title = f"{stat} per {'block (max over its modules)' if grouped else 'layer'}"
    title += " (colour: log10 |value|)" if color_scale == "log" else ""
    per_row = 18 if len(rows) <= 40 else 10
    fig.update_layout(title=title, height=height or min(1400, max(260, 110 + per_row * len(rows) * (1.6 if branch else 1))),
                      margin=dict(l=160, r=20, t=60, b=40))
    fig.update_xaxes(title_text="step", row=n_rows, col=1) if branch else fig.update_xaxes(title_text="step")
    fig.update_yaxes(autorange="reversed", type="category")
    if every.empty:
        return fig
    reduce = "min" if stat.endswith("_min") else "max"
    marked = _verdict_rows(run, rows, mapping)
    for strip, part in ((1, df), (2, old)) if branch else ((1, df),):
        if part.empty:
            continue
        steps = np.sort(part["step"].unique())
        size = max(1, math.ceil(len(steps) / max_cols))
        x = steps[::size]
        zval, bad = _grid(part, rows, mapping, steps, size, reduce)
        with np.errstate(divide="ignore", invalid="ignore"):
            color = np.log10(np.abs(zval)) if color_scale == "log" else zval.copy()
        color[~np.isfinite(color)] = np.nan  # log10(0) = -inf: no colour rather than a bad scale
        span = f"steps {x[0]}.." if size > 1 else "step "
        where = "" if strip == 1 else " (rolled back)"
        trace = go.Heatmap(
            z=color, x=x, y=rows, customdata=zval, colorscale="Viridis", coloraxis="coloraxis",
            hovertemplate=f"%{{y}}<br>{span}%{{x}}{where}<br>{stat} %{{customdata:.4g}}<extra></extra>",
            hoverongaps=False, name="rolled back" if strip == 2 else stat,
        )
        if branch:
            fig.add_trace(trace, row=strip, col=1)
        else:
            fig.add_trace(trace)
        if bad is not None:
            keys = bad.index.to_numpy()
            n_cols = zval.shape[1]
            marks = go.Scatter(
                x=x[keys % n_cols], y=[rows[r] for r in keys // n_cols], mode="markers",
                marker=dict(symbol="x", size=10, color=_NONFINITE_COLOR, line=dict(width=1)),
                name="non-finite", text=[_nonfinite_label(v) for v in bad.to_numpy()],
                hovertemplate="%{y}<br>step %{x}<br>%{text}<extra></extra>", showlegend=False,
            )
            fig.add_trace(marks, row=strip, col=1) if branch else fig.add_trace(marks)
    fig.update_layout(coloraxis=dict(colorscale="Viridis", colorbar=dict(
        title="log10|v|" if color_scale == "log" else stat)))
    ticktext = [f"▶ {r}" if r in marked else r for r in rows]
    fig.update_yaxes(tickmode="array", tickvals=rows, ticktext=ticktext)
    if branch:  # the strip's rows are the ones above; their labels would only crowd it
        fig.update_yaxes(showticklabels=False, row=2, col=1)
    labelled: set[int] = set()
    for r, v in marked.items():
        i = rows.index(r)
        for strip in range(1, n_rows + 1):
            axis = "" if strip == 1 else str(strip)
            fig.add_shape(type="rect", xref=f"x{axis} domain", yref=f"y{axis}", x0=0, x1=1,
                          y0=i - 0.5, y1=i + 0.5, line=dict(color=_NONFINITE_COLOR, width=2),
                          fillcolor="rgba(0,0,0,0)")
        if v["detect"] is not None and id(v) not in labelled:  # one arrow per verdict
            labelled.add(id(v))
            fig.add_annotation(x=v["detect"], y=r, xref="x", yref="y", text=f"verdict: {v['kind']}",
                               showarrow=True, arrowhead=2, arrowcolor=_NONFINITE_COLOR, ax=30, ay=-22,
                               font=dict(color=_NONFINITE_COLOR, size=10), bgcolor="rgba(255,255,255,0.8)")
    return fig


def _verdict_rows(run: Run, rows: list[str], mapping: dict) -> dict[str, dict]:
    """row -> verdict, for the rows of the layers verdicts name: the row itself; else its row
    when rows are blocks; else the rows inside it (it names a parent module); else the nearest
    row containing it."""
    out: dict[str, dict] = {}
    for v in verdicts(run):
        layer = v.get("layer")
        if not layer:
            continue
        if layer in rows:
            out[layer] = v
        elif layer in mapping:
            out[mapping[layer]] = v
        elif inside := [r for r in rows if r.startswith(layer + ".")]:
            out.update(dict.fromkeys(inside, v))
        elif outer := [r for r in rows if layer.startswith(r + ".")]:
            out[max(outer, key=len)] = v
    return out


def attention_figure(
    run: Run,
    stat: str = "attn_max",
    bound: bool = False,
    dtype: str | None = None,
    log_y: bool | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    height: int | None = None,
    rolled_back: bool = True,
) -> go.Figure:
    """Attention-logit maximum per layer as lines (the picture that shows a layer running away),
    with the rolled-back branch (the steps that diverged) faint and dotted in the layer's colour,
    and the fp16 overflow limit (65504): drawn as a line when the values come within a factor 4
    of it, otherwise noted in the title (a line at 65504 would flatten logits of 200 to zero).

    Args:
        run: the run (with rolled-back rows for the faint branch).
        stat: ``attn_max`` (exact, on sampled steps) or ``attn_bound`` (every step).
        bound: also draw ``attn_bound`` faintly (dashed) when `stat` is ``attn_max``.
        dtype: the compute dtype ("float16", "bfloat16"...); default: the run's meta
            (``compute_dtype`` or ``dtype``), if it says.
        log_y: log-scale y axis; None (default) picks log when the values span two decades.
        max_points: per drawn series (see `downsample`).
        height: figure height in pixels.
        rolled_back: draw the rolled-back branch.

    Returns:
        The figure.

    Example:
        >>> attention_figure(read_run("runs/exp1"), dtype="float16").show()
    """
    every = run.layers[run.layers["stat"].isin([stat, "attn_bound"] if bound else [stat])]
    mask = effective_mask(every, run.attempts)
    df, old = every[mask], every[~mask]
    fig = go.Figure()
    over = _overlay_axis(fig, "9", "y")
    peak = -math.inf
    shown_bad = shown_rb = False
    verdict_layers = {v["layer"] for v in verdicts(run) if v.get("layer")}
    for i, layer in enumerate(layer_order(run, stat)):
        color = _palette(i)
        hot = layer in verdict_layers or any(layer.startswith(v + ".") for v in verdict_layers)
        for s in ([stat, "attn_bound"] if bound and stat != "attn_bound" else [stat]):
            part = df[(df["layer"] == layer) & (df["stat"] == s)].sort_values("step")
            if part.empty:
                continue
            xs, ys = downsample(part["step"].to_numpy(), part["value"].to_numpy(), max_points)
            finite = ys[np.isfinite(ys)]
            if len(finite):
                peak = max(peak, float(np.abs(finite).max()))
            faint = s != stat
            name = f"{layer} (bound)" if faint else (f"▶ {layer}" if hot else layer)
            fig.add_trace(go.Scatter(
                x=xs, y=ys, name=name, legendgroup=layer,
                mode="lines" if faint or len(xs) > 200 else "lines+markers",
                line=dict(color=color, width=1 if faint else (3 if hot else 1.8),
                          dash="dash" if faint else "solid"),
                opacity=0.5 if faint else 1.0, connectgaps=False,
            ))
            n = len(fig.data)
            _add_nonfinite(fig, xs, ys, over, "x", f"{layer} {s}", legend=not shown_bad)
            shown_bad = shown_bad or len(fig.data) > n
            if faint or not rolled_back:
                continue
            for attempt, branch in old[(old["layer"] == layer) & (old["stat"] == s)].groupby("attempt"):
                branch = branch.sort_values("step")
                bx, by = downsample(branch["step"].to_numpy(), branch["value"].to_numpy(), max_points)
                fin = by[np.isfinite(by)]
                if len(fin):
                    peak = max(peak, float(np.abs(fin).max()))
                fig.add_trace(go.Scatter(
                    x=bx, y=by, name=f"{layer} (rolled back)", legendgroup=layer, showlegend=False,
                    mode="lines", line=dict(color=color, width=1, dash="dot"), opacity=0.55,
                    hovertemplate=f"{layer}, attempt {attempt} (rolled back)<br>step %{{x}}<br>%{{y}}<extra></extra>",
                ))
                _add_nonfinite(fig, bx, by, over, "x", f"{layer} {s} (rolled back)", legend=False)
                shown_rb = True
    dtype = dtype or _meta_dtype(run.meta)
    fp16 = bool(dtype and "16" in dtype and "bf" not in dtype)
    title = f"attention logits: {stat} per layer"
    if peak >= _NEAR_OVERFLOW * FP16_MAX:
        fig.add_hline(y=FP16_MAX, line=dict(color=_NONFINITE_COLOR, dash="dash", width=1.5),
                      annotation_text="fp16 max 65504", annotation_position="top left")
    elif fp16:
        share = f"{100 * peak / FP16_MAX:.2g}% of it" if math.isfinite(peak) else "no values yet"
        title += f" — fp16 limit 65504 off the chart (peak {share})"
    if shown_rb:
        title += " — dotted: rolled back"
    all_values = every["value"].to_numpy() if len(every) else np.array([])
    use_log = spans_decades(all_values) if log_y is None else bool(log_y)
    _mark_history(fig, run, labels=False)
    fig.update_layout(
        title=title, height=height or 380,
        margin=dict(l=60, r=20, t=70, b=40), updatemenus=_scale_buttons(1, use_log),
        yaxis_type="log" if use_log else "linear", xaxis_title="step",
    )
    return fig


def layer_figure(
    run: Run,
    layer: str,
    stats: list[str] | tuple[str, ...] | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    height: int | None = None,
) -> go.Figure:
    """One layer's curves, one row per statistic it records (what clicking a heatmap row
    shows): the effective timeline, the rolled-back branch faint and dotted, the run's history
    marked. A block name (``h.3``) that records nothing itself shows the max (min for ``*_min``)
    over the modules inside it.

    Args:
        run: the run (with rolled-back rows).
        layer: the layer (or block) name, as the heatmap rows show it.
        stats: statistics to draw (default: every one the layer records).
        max_points: per drawn series (see `downsample`).
        height: figure height in pixels.

    Example:
        >>> layer_figure(read_run("runs/exp1"), "h.1.attn").show()
    """
    df = run.layers[run.layers["layer"] == layer]
    label = layer
    if df.empty:  # a block row: aggregate its modules
        inside = run.layers[run.layers["layer"].str.startswith(layer + ".")]
        if not inside.empty:
            parts = []
            for stat, g in inside.groupby("stat"):
                how = "min" if stat.endswith("_min") else "max"
                parts.append(g.groupby(["attempt", "step"], as_index=False)["value"].agg(how)
                             .assign(stat=stat, layer=layer))
            df = pd.concat(parts, ignore_index=True)
            label = f"{layer} (extreme over its modules)"
    have = list(dict.fromkeys(df["stat"].tolist()))
    stats = [s for s in (stats or have) if s in have] or have[:1]
    n = max(1, len(stats))
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=stats or [f"{layer}: nothing recorded"])
    eff = effective_mask(df, run.attempts) if len(df) else pd.Series(dtype=bool)
    for row, stat in enumerate(stats, start=1):
        part = df[eff & (df["stat"] == stat)].sort_values("step")
        xs, ys = downsample(part["step"].to_numpy(), part["value"].to_numpy(), max_points)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=stat, line=dict(width=1.6)),
                      row=row, col=1)
        for attempt, old in df[~eff & (df["stat"] == stat)].groupby("attempt"):
            old = old.sort_values("step")
            bx, by = downsample(old["step"].to_numpy(), old["value"].to_numpy(), max_points)
            fig.add_trace(go.Scatter(
                x=bx, y=by, mode="lines", opacity=0.5, line=dict(width=1, dash="dot", color="#7f7f7f"),
                name=f"{stat} (rolled back)", showlegend=False,
                hovertemplate=f"attempt {attempt} (rolled back)<br>step %{{x}}<br>%{{y}}<extra></extra>",
            ), row=row, col=1)
        if spans_decades(df.loc[df["stat"] == stat, "value"].to_numpy()):
            fig.update_yaxes(type="log", row=row, col=1)
    _mark_history(fig, run)
    fig.update_xaxes(title_text="step", row=n, col=1)
    fig.update_layout(title=f"layer {label}", height=height or 120 + 200 * n,
                      margin=dict(l=60, r=20, t=70, b=40), showlegend=False, hovermode="x unified")
    return fig


def compare_figure(
    runs: dict[str, Run],
    keys: tuple[str, ...] | list[str] = ("loss", "grad_norm"),
    log_y: bool | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    height: int | None = None,
) -> go.Figure:
    """Several runs overlaid: one row per key, one colour per run (its effective timeline; the
    rolled-back branches faint and dotted), each run's verdicts as ✕ markers at their detection
    step (hover: what diverged).

    Args:
        runs: name -> run, e.g. ``{"lr 3e-4": read_run("runs/a"), "lr 1e-3": read_run("runs/b")}``.
        keys: scalar keys, one row each.
        log_y: log-scale y; None picks log for a row whose values span two decades.
        max_points: per drawn series.
        height: figure height in pixels.

    Example:
        >>> compare_figure({d: read_run(d) for d in ["runs/a", "runs/b"]}).show()
    """
    keys = [k for k in keys if any(k in r.scalars.columns for r in runs.values())] or list(keys)[:1]
    fig = make_subplots(rows=len(keys), cols=1, shared_xaxes=True, vertical_spacing=0.07,
                        subplot_titles=[_TITLES.get(k, k) for k in keys])
    any_log = False
    for row, key in enumerate(keys, start=1):
        values = []
        for n, (name, run) in enumerate(runs.items()):
            sc = run.scalars
            if key not in sc.columns:
                continue
            color = _palette(n)
            eff = effective_mask(sc, run.attempts)
            main = sc[eff].sort_values("step")
            xs, ys = downsample(main["step"].to_numpy(), main[key].to_numpy(), max_points)
            values.append(sc[key].to_numpy())
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, legendgroup=name,
                                     showlegend=row == 1, line=dict(color=color, width=1.6)),
                          row=row, col=1)
            for attempt, part in sc[~eff].groupby("attempt"):
                part = part.sort_values("step")
                bx, by = downsample(part["step"].to_numpy(), part[key].to_numpy(), max_points)
                fig.add_trace(go.Scatter(
                    x=bx, y=by, mode="lines", opacity=0.45, legendgroup=name, showlegend=False,
                    line=dict(width=1, dash="dot", color=color), name=f"{name} (rolled back)",
                    hovertemplate=f"{name}, attempt {attempt} (rolled back)<br>step %{{x}}<br>%{{y}}<extra></extra>",
                ), row=row, col=1)
            vs = [v for v in verdicts(run) if v["detect"] is not None]
            if vs and row == 1:
                at = main.set_index("step")[key]
                fig.add_trace(go.Scatter(
                    x=[v["detect"] for v in vs],
                    y=[float(at.get(v["detect"], np.nan)) if v["detect"] in at.index else None for v in vs],
                    mode="markers", marker=dict(symbol="x", size=11, color=color, line=dict(width=2)),
                    name=f"{name}: verdicts", legendgroup=name, showlegend=False,
                    text=[verdict_label(v) for v in vs],
                    hovertemplate=f"{name}<br>%{{text}}<extra></extra>",
                ), row=row, col=1)
        row_log = spans_decades(np.concatenate(values)) if (log_y is None and values) else bool(log_y)
        any_log = any_log or row_log
        fig.update_yaxes(type="log" if row_log else "linear", row=row, col=1)
    fig.update_xaxes(title_text="step", row=len(keys), col=1)
    fig.update_layout(title=f"{len(runs)} runs compared", height=height or 120 + 240 * len(keys),
                      margin=dict(l=60, r=20, t=70, b=40), hovermode="x unified",
                      updatemenus=_scale_buttons(len(keys), any_log))
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
