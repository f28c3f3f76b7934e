"""One plotly figure builder per panel, shared by the live dashboard, the static report and W&B.

Every builder takes a `thermo.store.Run` holding every attempt's rows (what
``thermo.dashboard.read_run(run_dir)`` gives, and the dashboard and report use), so rolled-back
rows can be drawn faintly; an effective-only `Run` works too. Each returns a
``plotly.graph_objects.Figure``. Long series are cut to a few thousand points with `downsample`,
which keeps every bin's minimum, maximum and first non-finite value, so a one-step spike or NaN
in a million steps is still drawn. Non-finite values (NaN, ±inf) are never dropped silently:
they are drawn as red markers along the top of the plot.

========== ==================== ================================================================
panel      builder              shows
========== ==================== ================================================================
loss       `loss_figure`        loss and grad norm per step (one row each, log where values span
                                decades), rolled-back branches faint, each verdict's
                                onset..detection band shaded and labelled, rollback arrows
heatmap    `heatmap_figure`     layers × steps, colour = a per-layer stat (act_max, act_min,
                                attn_max...), rows in model order, by block or the hottest N;
                                the verdict's layer marked; the rolled-back branch below
attention  `attention_figure`   attention-logit max per layer as lines (rolled-back branch
                                dotted), the fp16 limit when the values come near it
events     `events_figure`      table of verdicts, rollbacks, restarts, blacklist edits, skips
(click)    `layer_figure`       one layer's curves, every stat it records (dashboard click)
(compare)  `compare_figure`     several runs overlaid (``thermo report A B``)
========== ==================== ================================================================

`run_story` reads the events into the headline every page opens with (status; each verdict with
its cause, onset and layer; what thermo did), `headline_html` renders it. `thermo.plots.page`
holds the script the pages carry (linked step axes, the user's view kept across refreshes).
"""

from __future__ import annotations

from thermo.plots.downsampling import DEFAULT_MAX_POINTS, downsample, downsample_index
from thermo.plots.layouts import (
    DEFAULT_LAYOUT,
    PANELS,
    build_panel,
    check_layout,
    fmt,
    layout_names,
    layout_path,
    load_layout,
    panel_title,
    run_summary,
)
from thermo.plots.panels import (
    DEFAULT_MAX_COLS,
    FP16_MAX,
    attention_figure,
    compare_figure,
    event_details,
    events_figure,
    heatmap_figure,
    layer_figure,
    loss_figure,
    verdict_label,
)
from thermo.plots.shared import block_of, effective_mask, layer_order, module_type
from thermo.plots.story import EXIT_CODES, Incident, Story, headline_html, run_story

__all__ = [
    "EXIT_CODES",
    "Incident",
    "Story",
    "headline_html",
    "run_story",
    "DEFAULT_LAYOUT",
    "DEFAULT_MAX_COLS",
    "DEFAULT_MAX_POINTS",
    "FP16_MAX",
    "PANELS",
    "attention_figure",
    "build_panel",
    "check_layout",
    "compare_figure",
    "downsample",
    "downsample_index",
    "block_of",
    "effective_mask",
    "module_type",
    "event_details",
    "events_figure",
    "fmt",
    "heatmap_figure",
    "layer_figure",
    "verdict_label",
    "layer_order",
    "layout_names",
    "layout_path",
    "load_layout",
    "loss_figure",
    "panel_title",
    "run_summary",
]
