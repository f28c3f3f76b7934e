"""The live dashboard: a Dash app on 127.0.0.1 that redraws a run's panels while it trains.

It only reads the run directory: one read-only SQLite connection (WAL, so the trainer is never
blocked), short read transactions, and an incremental `RunReader` that asks only for rows newer
than the last it saw (per attempt), so a refresh costs what the run wrote since the last one.
Panels come from `thermo.plots` (the same figures as the report); which panels, in which order,
comes from a layout: one shipped in the package by name (``default``, ``attention``, ``deep``)
or a file of your own (see `thermo.plots.load_layout`).

Example:
    $ thermo dashboard runs/exp1 --port 8050 --layout attention
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from thermo import plots
from thermo.plots.reader import RunReader, read_run

__all__ = ["RunReader", "create_app", "create_compare_app", "read_run", "serve"]

def _require_dash():
    try:
        import dash
    except ImportError:
        raise ImportError(
            "the live dashboard needs Dash: pip install 'thermo[dashboard]'") from None
    return dash


def _headline(story: plots.Story, prefix: str = "thermo"):
    from dash import html

    color = plots.story.STATUS_COLORS.get(story.status, "#7f7f7f")
    n = len(story.incidents)
    return [
        html.Span(story.status, id=f"{prefix}-run-status", style={
            "background": color, "color": "white", "padding": "2px 8px", "borderRadius": "4px",
            "fontWeight": "bold", "marginRight": "8px"}),
        html.Span(story.status_line, id=f"{prefix}-status-line"),
        html.Span(f" · {n} verdict{'s' * (n != 1)}" if n else " · no verdicts",
                  style={"color": "#666"}),
        html.Ul(id=f"{prefix}-incidents", style={"margin": "4px 0 0 0"}, children=[
            html.Li(i.line, className="incident", style={"color": "#b22222"}) for i in story.incidents
        ] + [html.Li(o, className="other", style={"color": "#555"}) for o in story.other]),
    ]


_ROW_CHOICES = [("all layers", "layer"), ("by block", "block"), ("hottest 20", "top")]


def _panel_args(panel: dict, rows: str | None, types: list[str] | None) -> dict:
    """A heatmap panel with the page's row controls applied (group / hottest / module types)."""
    if panel["type"] != "heatmap":
        return panel
    p = dict(panel)
    if rows == "top":
        p["top"], p["group"] = 20, "layer"
    elif rows in ("layer", "block"):
        p["group"] = rows
    if types:
        p["types"] = list(types)
    return p


def _apply_ui(fig, key: str):
    # One uirevision per panel: plotly keeps what the user did (zoom, pan, the scale picked
    # with the buttons, legend clicks) across the refreshes that bring new rows.
    fig.update_layout(uirevision=key)
    return fig


def create_app(run_dir: str | os.PathLike | list, layout: dict | str | os.PathLike | None = None):
    """The Dash app for one run directory (serve it with `serve`, or ``app.run(...)``); a list
    of run directories gives a page comparing them (`create_compare_app`).

    The page opens with the run's headline (training / finished / gave up, each verdict with its
    cause, onset and layer, and what thermo did about it), then the numbers of the last step and
    one graph per layout panel. Heatmap panels have row controls (all layers, one row per block,
    the hottest 20; module-type filter); clicking a heatmap row shows that layer's curves in the
    layer panel at the bottom (the latest verdict's layer until then). Every ``refresh_s``
    seconds it polls the store; figures are rebuilt and sent only when something new was
    written. Zoom, pan and the linear/log choice survive refreshes, and the panels' step axes
    are linked (`thermo.plots.page`).

    Args:
        run_dir: the run directory (it may not hold ``thermo.db`` yet).
        layout: a layout dict, a layout name (``default``, ``attention``: see
            `thermo.plots.layout_names`), a layout file path, or None for the default.

    Returns:
        ``dash.Dash``.

    Example:
        >>> app = create_app("runs/exp1", "attention")
        >>> app.run(host="127.0.0.1", port=8050)
    """
    if isinstance(run_dir, (list, tuple)):
        if len(run_dir) > 1:
            return create_compare_app(run_dir)
        run_dir = run_dir[0]
    dash = _require_dash()
    from dash import Input, Output, State, dcc, html

    from thermo.plots.page import PAGE_JS

    if isinstance(layout, dict):
        layout = plots.check_layout(layout)
    else:
        layout = plots.load_layout(layout)
    reader = RunReader(run_dir)
    panels = layout["panels"]
    heat = [i for i, p in enumerate(panels) if p["type"] == "heatmap"]
    app = dash.Dash(__name__, title=f"{layout['title']}: {Path(run_dir).name}",
                    update_title=None, serve_locally=True)
    app.index_string = app.index_string.replace(
        "{%renderer%}", "{%renderer%}<script>" + PAGE_JS + "</script>")
    status_ids = ["last-step", "loss", "grad-norm", "attempt", "events", "updated"]

    def controls(i: int):
        if i not in heat:
            return []
        return [html.Div(style={"display": "flex", "gap": "16px", "alignItems": "center",
                                "fontSize": "13px"}, children=[
            dcc.RadioItems(id=f"rows-{i}", value="auto", inline=True,
                           options=[{"label": " auto", "value": "auto"}]
                           + [{"label": f" {lab}", "value": v} for lab, v in _ROW_CHOICES]),
            dcc.Dropdown(id=f"types-{i}", multi=True, placeholder="module types (all)",
                         options=[], style={"minWidth": "320px"}),
        ])]

    app.layout = html.Div(style={"fontFamily": "sans-serif", "margin": "0 16px"}, children=[
        html.H2(f"{layout['title']} · {run_dir}", style={"marginBottom": "4px"}),
        html.Div(id="thermo-headline", style={"fontSize": "16px", "marginBottom": "6px"},
                 children=[html.Span("–", id="thermo-run-status")]),
        html.Div(id="thermo-status", style={"fontSize": "14px", "marginBottom": "8px",
                                            "color": "#444"}, children=[
            html.Span([f"{label} ", html.B("–", id=f"thermo-{key}")], style={"marginRight": "18px"})
            for key, label in zip(status_ids, ["step", "loss", "grad norm", "attempt", "events",
                                               "updated"])
        ]),
        *[html.Section(id=f"panel-{i}-{p['type']}", className="thermo-panel", children=[
            *controls(i),
            dcc.Graph(id=f"graph-{i}", config={"displaylogo": False}, responsive=False,
                      figure=_placeholder(plots.panel_title(p)))])
          for i, p in enumerate(panels)],
        html.Section(id="panel-layer", className="thermo-panel", children=[
            html.Div("click a heatmap row to see that layer's curves", id="thermo-layer-hint",
                     style={"fontSize": "13px", "color": "#666"}),
            dcc.Graph(id="thermo-layer-graph", config={"displaylogo": False}, responsive=False,
                      figure=_placeholder("layer")),
        ]),
        dcc.Interval(id="thermo-tick", interval=int(layout["refresh_s"] * 1000)),
        dcc.Store(id="thermo-version", data=-1),
        dcc.Store(id="thermo-layer", data=None),
    ])
    rows_inputs = [Input(f"rows-{i}", "value") for i in heat]
    types_inputs = [Input(f"types-{i}", "value") for i in heat]

    @app.callback(
        [Output(f"graph-{i}", "figure") for i in range(len(panels))]
        + [Output(f"thermo-{k}", "children") for k in status_ids]
        + [Output("thermo-headline", "children"), Output("thermo-version", "data")]
        + [Output(f"types-{i}", "options") for i in heat],
        [Input("thermo-tick", "n_intervals"), *rows_inputs, *types_inputs],
        State("thermo-version", "data"),
    )
    def refresh(_n, *args):
        rows, types, shown_version = args[: len(heat)], args[len(heat): 2 * len(heat)], args[-1]
        reader.poll()
        now = time.strftime("%H:%M:%S")
        keep = [dash.no_update] * len(panels)
        rest = [dash.no_update] * (1 + len(heat))
        control = dash.callback_context.triggered_id not in (None, "thermo-tick")
        if not reader.connected:
            waiting = f"{now} (waiting: {reader.error})"
            return keep + [dash.no_update] * (len(status_ids) - 1) + [waiting, dash.no_update] + rest
        if reader.version == shown_version and not control:
            return keep + [dash.no_update] * (len(status_ids) - 1) + [now, dash.no_update] + rest
        run = reader.run()
        figs = []
        for i, p in enumerate(panels):
            j = heat.index(i) if i in heat else None
            spec = _panel_args(p, rows[j], types[j]) if j is not None else p
            # The uirevision changes with the row choice: other rows, a fresh zoom.
            key = f"panel-{i}" + (f"-{rows[j]}-{types[j]}" if j is not None else "")
            figs.append(_apply_ui(plots.build_panel(run, spec), key))
        s = plots.run_summary(run)
        status = [plots.fmt(s["last_step"]), plots.fmt(s["loss"]), plots.fmt(s["grad_norm"]),
                  str(s["attempt"]), str(s["events"]), now]
        options = []
        for i in heat:
            stat = panels[i].get("stat", "act_max")
            kinds = sorted({plots.module_type(n) for n in plots.layer_order(run, stat)})
            options.append([{"label": k, "value": k} for k in kinds])
        return figs + status + [_headline(plots.run_story(run)), reader.version] + options

    @app.callback(
        [Output("thermo-layer-graph", "figure"), Output("thermo-layer", "data"),
         Output("thermo-layer-hint", "children")],
        [Input(f"graph-{i}", "clickData") for i in heat] + [Input("thermo-version", "data")],
        State("thermo-layer", "data"),
    )
    def show_layer(*args):
        clicks, chosen = args[: len(heat)], args[-1]
        trig = dash.callback_context.triggered_id
        if isinstance(trig, str) and trig.startswith("graph-"):
            click = clicks[[f"graph-{i}" for i in heat].index(trig)]
            points = (click or {}).get("points") or []
            if points and points[0].get("y") is not None:
                chosen = str(points[0]["y"])
        if not reader.connected:
            return dash.no_update, dash.no_update, dash.no_update
        run = reader.run()
        hint = "click a heatmap row to see that layer's curves"
        if chosen is None:  # until a click: the layer the latest verdict names
            named = [v["layer"] for v in plots.shared.verdicts(run) if v.get("layer")]
            chosen = named[-1] if named else None
            if chosen is None:
                return dash.no_update, dash.no_update, hint
            hint = f"the latest verdict's layer ({chosen}); {hint}"
        else:
            hint = f"layer {chosen}; {hint}"
        fig = _apply_ui(plots.layer_figure(run, chosen), f"layer-{chosen}")
        return fig, chosen, hint

    app.thermo_reader = reader  # for tests and embedding: the app's reader
    return app


def create_compare_app(run_dirs: list, refresh_s: float = 2.0):
    """The Dash app comparing several run directories live: each run's headline, then their
    loss and grad norm overlaid (`thermo.plots.compare_figure`), one colour per run.

    Example:
        >>> create_compare_app(["runs/lr3e-4", "runs/lr1e-3"]).run(port=8050)
    """
    dash = _require_dash()
    from dash import Input, Output, State, dcc, html

    from thermo.plots.page import PAGE_JS

    readers = [RunReader(d) for d in run_dirs]
    names = [str(d) for d in run_dirs]
    app = dash.Dash(__name__, title=f"thermo: {len(names)} runs", update_title=None,
                    serve_locally=True)
    app.index_string = app.index_string.replace(
        "{%renderer%}", "{%renderer%}<script>" + PAGE_JS + "</script>")
    app.layout = html.Div(style={"fontFamily": "sans-serif", "margin": "0 16px"}, children=[
        html.H2(f"thermo · {len(names)} runs compared", style={"marginBottom": "4px"}),
        *[html.Div([html.H3(name, style={"margin": "10px 0 2px 0"}),
                    html.Div(id=f"run{n}-headline", children="waiting for the run's store")])
          for n, name in enumerate(names)],
        html.Section(id="panel-compare", className="thermo-panel", children=[
            dcc.Graph(id="graph-compare", config={"displaylogo": False}, responsive=False,
                      figure=_placeholder("runs compared"))]),
        dcc.Interval(id="thermo-tick", interval=int(refresh_s * 1000)),
        dcc.Store(id="thermo-version", data=None),
    ])

    @app.callback(
        [Output(f"run{n}-headline", "children") for n in range(len(names))]
        + [Output("graph-compare", "figure"), Output("thermo-version", "data")],
        Input("thermo-tick", "n_intervals"),
        State("thermo-version", "data"),
    )
    def refresh(_n, shown):
        for r in readers:
            r.poll()
        versions = [r.version for r in readers]
        if versions == shown:
            return [dash.no_update] * (len(names) + 2)
        runs, heads = {}, []
        for n, (name, r) in enumerate(zip(names, readers)):
            if not r.connected:
                heads.append(f"waiting: {r.error or 'no store yet'}")
                continue
            run = r.run()
            runs[name] = run
            heads.append(_headline(plots.run_story(run), prefix=f"run{n}"))
        fig = _apply_ui(plots.compare_figure(runs), "compare") if runs else dash.no_update
        return heads + [fig, versions]

    app.thermo_readers = readers
    return app


def _placeholder(title: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=f"{title} (loading)", height=220)
    return fig


def serve(
    run_dir: str | os.PathLike | list,
    host: str = "127.0.0.1",
    port: int = 8050,
    layout: dict | str | os.PathLike | None = None,
) -> None:
    """Serve the live dashboard of `run_dir` until interrupted (see `create_app`).

    Args:
        run_dir: the run directory, or a list of them to compare.
        host: interface to listen on; the default keeps it on this machine (open it remotely
            through an SSH tunnel rather than binding 0.0.0.0).
        port: TCP port.
        layout: a layout dict, file path, or None for the default.

    Example:
        >>> serve("runs/exp1", port=8050)
    """
    import logging

    app = create_app(run_dir, layout)
    # One access-log line per refresh of every open page would bury the useful output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app.run(host=host, port=port, debug=False)
