"""Dashboard layouts (which panels, in which order), building a layout's panels, and the headline
numbers a dashboard or report prints."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from thermo.plots.panels import (
    _TITLES,
    attention_figure,
    events_figure,
    heatmap_figure,
    loss_figure,
)
from thermo.plots.shared import effective_mask
from thermo.store import Run

PANELS = {
    "loss": loss_figure,
    "heatmap": heatmap_figure,
    "attention": attention_figure,
    "events": events_figure,
}
# Keys a layout's panel may carry besides the builder's arguments.
_PANEL_META = {"type", "title"}

# The default layout; thermo/layouts/default.json is the same list, for users to copy and edit.
DEFAULT_LAYOUT: dict[str, Any] = {
    "title": "thermo",
    "refresh_s": 2.0,
    "panels": [
        {"type": "loss", "keys": ["loss", "grad_norm"]},
        {"type": "heatmap", "stat": "act_max"},
        {"type": "heatmap", "stat": "act_min"},
        {"type": "heatmap", "stat": "attn_max"},
        {"type": "attention", "stat": "attn_max"},
        {"type": "events"},
    ],
}


def layout_names() -> list[str]:
    """The layouts shipped inside the package (``thermo/layouts/*.json``), by name."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("thermo.layouts").iterdir() if p.name.endswith(".json"))


def layout_path(name: str) -> Path:
    """The file of a shipped layout (`layout_names`), e.g. ``layout_path("attention")``."""
    from importlib.resources import files

    names = layout_names()
    if name not in names:
        raise ValueError(f"no layout named {name!r}; shipped layouts: {', '.join(names)} "
                         "(or give the path of a JSON/YAML layout file)")
    return Path(str(files("thermo.layouts") / f"{name}.json"))


def load_layout(path: str | Path | None = None) -> dict[str, Any]:
    """Read and check a dashboard layout: ``{"title", "refresh_s", "panels": [{"type": ...,
    builder arguments...}]}`` (JSON, or YAML when PyYAML is installed). None gives the default.

    Args:
        path: a layout file, or the name of a layout shipped in the package (``default``,
            ``attention``, ``deep``: see `layout_names`), or None.

    Raises:
        ValueError: naming the file, the panel and what is allowed, for any bad entry.

    Example:
        >>> layout = load_layout("attention")
        >>> layout = load_layout("my_layouts/team.json")
    """
    if path is None:
        return json.loads(json.dumps(DEFAULT_LAYOUT))
    if isinstance(path, str) and "/" not in path and "\\" not in path and "." not in path \
            and not Path(path).exists():
        path = layout_path(path)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read layout file {path}: {e.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"layout {path} is YAML but PyYAML is not installed: "
                                 "pip install pyyaml, or write the layout as JSON") from None
            layout = yaml.safe_load(text)
        else:
            layout = json.loads(text)
    except (json.JSONDecodeError, Exception) as e:  # yaml.YAMLError has no common base to name
        if isinstance(e, ValueError) and str(e).startswith("layout"):
            raise
        raise ValueError(f"layout file {path} does not parse: {e}") from None
    return check_layout(layout, str(path))


def check_layout(layout: Any, where: str = "layout") -> dict[str, Any]:
    """Validate a layout dict (see `load_layout`); returns it with defaults filled in."""
    if not isinstance(layout, dict) or not isinstance(layout.get("panels"), list) or not layout["panels"]:
        raise ValueError(f"{where}: a layout is an object with a non-empty 'panels' list")
    unknown = set(layout) - {"title", "refresh_s", "panels"}
    if unknown:
        raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)} "
                         "(allowed: title, refresh_s, panels)")
    refresh = layout.setdefault("refresh_s", DEFAULT_LAYOUT["refresh_s"])
    if not isinstance(refresh, (int, float)) or refresh <= 0:
        raise ValueError(f"{where}: refresh_s must be a number > 0, got {refresh!r}")
    layout.setdefault("title", "thermo")
    for i, panel in enumerate(layout["panels"]):
        kind = panel.get("type") if isinstance(panel, dict) else None
        if kind not in PANELS:
            raise ValueError(f"{where}: panel {i} has type {kind!r}; allowed: {sorted(PANELS)}")
        allowed = set(inspect.signature(PANELS[kind]).parameters) - {"run"}
        bad = set(panel) - allowed - _PANEL_META
        if bad:
            raise ValueError(f"{where}: panel {i} ({kind}) has unknown keys {sorted(bad)}; "
                             f"allowed: {sorted(allowed | _PANEL_META)}")
    return layout


def build_panel(run: Run, panel: dict[str, Any]) -> go.Figure:
    """The figure for one layout entry, e.g. ``{"type": "heatmap", "stat": "attn_max"}``."""
    args = {k: v for k, v in panel.items() if k not in _PANEL_META}
    if "keys" in args:
        args["keys"] = tuple(args["keys"])
    fig = PANELS[panel["type"]](run, **args)
    if panel.get("title"):
        fig.update_layout(title=panel["title"])
    return fig


def panel_title(panel: dict[str, Any]) -> str:
    if panel.get("title"):
        return panel["title"]
    kind = panel["type"]
    if kind == "loss":
        return " and ".join(_TITLES.get(k, k) for k in panel.get("keys", ("loss", "grad_norm")))
    if kind in ("heatmap", "attention"):
        default = "act_max" if kind == "heatmap" else "attn_max"
        return f"{kind}: {panel.get('stat', default)}"
    return "Events"


def run_summary(run: Run) -> dict[str, Any]:
    """The headline numbers a dashboard or report shows: last step, its loss and grad norm,
    the current attempt, steps and events recorded."""
    sc = run.scalars
    out: dict[str, Any] = {"last_step": None, "loss": math.nan, "grad_norm": math.nan,
                           "attempt": int(run.attempts["attempt"].max()) if len(run.attempts) else 0,
                           "steps": 0, "events": len(run.events)}
    if sc.empty:
        return out
    eff = sc[effective_mask(sc, run.attempts)].sort_values(["step", "attempt"])
    last = eff.iloc[-1]
    out.update(last_step=int(last["step"]), steps=len(eff))
    for key in ("loss", "grad_norm"):
        if key in eff.columns:
            out[key] = float(last[key])
    return out


def fmt(v: Any) -> str:
    """A number as the dashboard and report print it (6 significant digits; nan, ±inf)."""
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.6g}"
    return str(v)
