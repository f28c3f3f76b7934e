"""The static report: one self-contained HTML file with every panel, for an incident write-up.

plotly.js is embedded once in the page head and each panel's figure is inlined as JSON, so the
file opens offline, from a mail attachment or a ticket, with nothing fetched from anywhere
(``cdn=True`` loads plotly.js from its CDN instead: a page of ~100 KB instead of ~5 MB). Several
run directories give one page comparing them (`thermo.plots.compare_figure`).
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Sequence
from pathlib import Path

from thermo import plots
from thermo._io import atomic_write_bytes
from thermo.plots.reader import read_run
from thermo.rundir import RunDir

_CSS = """
body { font-family: sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 18px; margin: 18px 0 4px 0; }
.headline { font-size: 16px; margin: 6px 0; }
.headline .status { color: white; padding: 2px 8px; border-radius: 4px; font-weight: bold; }
.headline .verdict-count { color: #666; }
.headline ul { margin: 4px 0 0 0; }
.headline li.incident { color: #b22222; }
.headline li.other { color: #555; }
.summary span { margin-right: 18px; }
.panel { margin-top: 18px; border-top: 1px solid #ddd; }
.generated { color: #777; font-size: 12px; }
"""

# plotly.js from the CDN (``cdn=True``): the version the inlined copy would have been.
_CDN = "https://cdn.plot.ly/plotly-{version}.min.js"


def check_output(path: str | os.PathLike, run_dirs) -> Path:
    """Refuse an output path that would overwrite a run's own files (``-o RUN/thermo.db``), a
    non-HTML file, or a folder. Returns the path.

    Raises:
        ValueError: naming the path and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"report output {path} is a folder; give a file name, e.g. {path / 'report.html'}")
    resolved = path.resolve()
    inside = [Path(d).resolve() for d in run_dirs if resolved.parent == Path(d).resolve()
              or Path(d).resolve() in resolved.parents]
    html_name = path.suffix.lower() in (".html", ".htm")
    if path.name in RunDir.file_names() or (inside and not html_name) or (path.exists() and not html_name):
        where = f" inside run directory {inside[0]}" if inside else ""
        raise ValueError(f"refusing to write the report over {path}{where}: it is not an HTML file "
                         "and may be a run file. Choose an output ending in .html, e.g. -o report.html")
    return path


def write_report(
    run_dir: str | os.PathLike | Sequence[str | os.PathLike],
    path: str | os.PathLike = "report.html",
    layout: dict | str | os.PathLike | None = None,
    title: str | None = None,
    cdn: bool = False,
) -> Path:
    """Write the run's panels into one HTML file that opens offline; several runs give a
    comparison (`compare_figure`: their loss and grad norm overlaid, then each run's headline).

    The page opens with the run's headline (status, each verdict with its cause, onset and layer,
    what thermo did) and carries `thermo.plots.page.PAGE_JS`, so the panels' step axes are linked.

    Args:
        run_dir: the run directory, or a list of them to compare (safe to read while training:
            the report shows what was flushed so far).
        path: the HTML file to write (parent folders are created; written atomically). A path
            that would overwrite a run's files is refused.
        layout: a layout dict, a shipped layout's name (``attention``) or a file; None gives the
            default panels.
        title: the page title (default: "thermo report: <run dir>").
        cdn: load plotly.js from its CDN (a ~100 KB page that needs the network to open) instead
            of inlining it (~5 MB that opens anywhere).

    Returns:
        The path written.

    Example:
        >>> write_report("runs/exp1", "incident-1412.html")
        >>> write_report(["runs/lr3e-4", "runs/lr1e-3"], "compare.html", cdn=True)
    """
    from plotly.offline import get_plotlyjs

    from thermo.plots.page import PAGE_JS

    run_dirs = [run_dir] if isinstance(run_dir, (str, os.PathLike)) else list(run_dir)
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    path = check_output(path, run_dirs)
    layout = plots.check_layout(layout) if isinstance(layout, dict) else plots.load_layout(layout)
    runs = {str(d): read_run(d) for d in run_dirs}
    if len(runs) == 1:
        title = title or f"thermo report: {run_dirs[0]}"
        body = _one_run(next(iter(runs.values())), layout)
    else:
        title = title or f"thermo: {len(runs)} runs compared"
        body = _compare(runs, layout)
    if cdn:
        script = f'<script src="{_CDN.format(version=_plotlyjs_version())}" charset="utf-8"></script>'
    else:
        # plotly.js once, inline: the page must not reach for a CDN.
        script = f'<script type="text/javascript">{get_plotlyjs()}</script>'
    sources = ", ".join(html.escape(str(Path(d).resolve())) for d in run_dirs)
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>{script}"
        f"<script>{PAGE_JS}</script></head><body>"
        f"<h1>{html.escape(title)}</h1>{body}"
        f'<div class="generated">generated {time.strftime("%Y-%m-%d %H:%M:%S")} from {sources}</div>'
        "</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def _plotlyjs_version() -> str:
    from plotly.offline import get_plotlyjs_version

    return get_plotlyjs_version()


def _figure_div(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def _summary(run, prefix: str = "thermo") -> str:
    s = plots.run_summary(run)
    return "".join(
        f'<span>{label} <b id="{prefix}-{key}">{html.escape(plots.fmt(s[field]))}</b></span>'
        for key, label, field in [("last-step", "step", "last_step"), ("loss", "loss", "loss"),
                                  ("grad-norm", "grad norm", "grad_norm"),
                                  ("attempt", "attempt", "attempt"), ("events", "events", "events")]
    )


def _one_run(run, layout: dict) -> str:
    sections = []
    for i, panel in enumerate(layout["panels"]):
        div = _figure_div(plots.build_panel(run, panel), f"graph-{i}")
        sections.append(
            f'<section class="panel" id="panel-{i}-{panel["type"]}" '
            f'aria-label="{html.escape(plots.panel_title(panel))}">{div}</section>'
        )
    return (plots.headline_html(plots.run_story(run))
            + f'<div class="summary">{_summary(run)}</div>' + "".join(sections))


def _compare(runs: dict, layout: dict) -> str:
    """Several runs: their headlines, the overlaid loss/grad norm, then each run's per-layer
    panels of the layout (loss and events panels are in the overlay and headlines)."""
    out = []
    for n, (name, run) in enumerate(runs.items()):
        head = plots.headline_html(plots.run_story(run)).replace('id="thermo-', f'id="run{n}-thermo-')
        out.append(f'<h2 id="run{n}-title">{html.escape(name)}</h2>{head}'
                   f'<div class="summary">{_summary(run, f"run{n}")}</div>')
    out.append(f'<section class="panel" id="panel-compare">{_figure_div(plots.compare_figure(runs), "graph-compare")}</section>')
    for n, (name, run) in enumerate(runs.items()):
        for i, panel in enumerate(layout["panels"]):
            if panel["type"] in ("loss", "events"):
                continue
            fig = plots.build_panel(run, panel)
            fig.update_layout(title=f"{name}: {fig.layout.title.text or plots.panel_title(panel)}")
            out.append(f'<section class="panel" id="run{n}-panel-{i}-{panel["type"]}">'
                       f'{_figure_div(fig, f"run{n}-graph-{i}")}</section>')
    return "".join(out)
