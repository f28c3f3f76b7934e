"""The static report: one self-contained HTML file with every panel, for an incident write-up.

plotly.js is embedded once in the page head and each panel's figure is inlined as JSON, so the
file opens offline, from a mail attachment or a ticket, with nothing fetched from anywhere.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path

from thermo import plots
from thermo.dashboard import read_run

_CSS = """
body { font-family: sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; }
.summary span { margin-right: 18px; }
.panel { margin-top: 18px; border-top: 1px solid #ddd; }
.generated { color: #777; font-size: 12px; }
"""


def write_report(
    run_dir: str | os.PathLike,
    path: str | os.PathLike = "report.html",
    layout: dict | str | os.PathLike | None = None,
    title: str | None = None,
) -> Path:
    """Write the run's panels into one HTML file that opens offline.

    Args:
        run_dir: the run directory (safe to read while it trains: the report shows what was
            flushed so far).
        path: the HTML file to write (parent folders are created).
        layout: a layout dict or file (``dashboards/*.json``); None gives the default panels.
        title: the page title (default: "thermo report: <run dir>").

    Returns:
        The path written.

    Example:
        >>> write_report("runs/exp1", "incident-1412.html")
    """
    from plotly.offline import get_plotlyjs

    layout = plots.check_layout(layout) if isinstance(layout, dict) else plots.load_layout(layout)
    run = read_run(run_dir)
    title = title or f"thermo report: {run_dir}"
    s = plots.run_summary(run)
    sections = []
    for i, panel in enumerate(layout["panels"]):
        fig = plots.build_panel(run, panel)
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"graph-{i}",
                          config={"displaylogo": False, "responsive": True})
        sections.append(
            f'<section class="panel" id="panel-{i}-{panel["type"]}" '
            f'aria-label="{html.escape(plots.panel_title(panel))}">{div}</section>'
        )
    summary = "".join(
        f'<span>{label} <b id="thermo-{key}">{html.escape(plots.fmt(s[field]))}</b></span>'
        for key, label, field in [("last-step", "step", "last_step"), ("loss", "loss", "loss"),
                                  ("grad-norm", "grad norm", "grad_norm"),
                                  ("attempt", "attempt", "attempt"), ("events", "events", "events")]
    )
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        # plotly.js once, inline: the page must not reach for a CDN.
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<h1>{html.escape(title)}</h1><div class=\"summary\">{summary}</div>"
        f'<div class="generated">generated {time.strftime("%Y-%m-%d %H:%M:%S")} from '
        f"{html.escape(str(Path(run_dir).resolve()))}</div>"
        + "".join(sections)
        + "</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
