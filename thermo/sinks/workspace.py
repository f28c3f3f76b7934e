"""A W&B workspace for `WandbSink`'s keys, in one command:

    python -m thermo.sinks.workspace ENTITY/PROJECT            # saves a view named "thermo"
    python -m thermo.sinks.workspace ENTITY/PROJECT --dry-run  # prints the sections, saves nothing

Sections (every chart against ``thermo/step``): loss and grad norm with the event markers; the
per-block extremes (``block_act_max/*``, ``block_attn_max/*``: one line per block, log y); the
hottest layers (``act_max/*``, ``attn_max/*``, ``grad_max/*``); a note on the tables and panels.
Needs ``pip install 'thermo[wandb]'`` (wandb-workspaces) and a logged-in W&B (``wandb login``).
"""

from __future__ import annotations

import argparse
import sys

_EVENT_KINDS = ("verdict", "rollback", "restart", "give_up", "skip_step")


def _require():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise ImportError("the W&B workspace needs wandb-workspaces: pip install 'thermo[wandb]'") from None
    return ws, wr


def workspace(entity: str, project: str, name: str = "thermo"):
    """The workspace (``wandb_workspaces.workspaces.Workspace``) for thermo's keys; ``.save()``
    it, or run this module.

    Example:
        >>> workspace("my-team", "gpt").save()
    """
    ws, wr = _require()
    x = "thermo/step"

    def line(title, y=None, regex=None, log_y=None, **kw):
        return wr.LinePlot(title=title, x=x, y=list(y or []), metric_regex=regex, log_y=log_y, **kw)

    events = [f"thermo/event/{k}" for k in _EVENT_KINDS]
    sections = [
        ws.Section(name="thermo: loss", is_open=True, panels=[
            line("loss (dots: verdicts, rollbacks)", ["thermo/loss", *events]),
            line("gradient norm", ["thermo/grad_norm"], log_y=True),
            line("attempt (+1 at each rollback or restart)", ["thermo/attempt"]),
        ]),
        ws.Section(name="thermo: blocks", is_open=True, panels=[
            line("activation max per block", regex=r"^block_act_max/.*", log_y=True),
            line("attention-logit max per block", regex=r"^block_attn_max/.*", log_y=True),
        ]),
        ws.Section(name="thermo: hottest layers", is_open=False, panels=[
            line("hottest layers: act_max", regex=r"^act_max/.*", log_y=True),
            line("hottest layers: attn_max", regex=r"^attn_max/.*", log_y=True),
            line("hottest layers: grad_max", regex=r"^grad_max/.*", log_y=True),
        ]),
        ws.Section(name="thermo: tables and panels", is_open=False, panels=[
            wr.MarkdownPanel(markdown=(
                "`thermo/layers`: every layer's statistics at a flush (table). "
                "`thermo/events`: verdicts, rollbacks, restarts (table, at close). "
                "`thermo/panel/*`: the report's heatmaps and attention lines (at close). "
                "`thermo/step` never goes back after a rollback; `thermo/train_step` is the "
                "training step.")),
        ]),
    ]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m thermo.sinks.workspace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="ENTITY/PROJECT")
    p.add_argument("--name", default="thermo", help="the saved view's name")
    p.add_argument("--dry-run", action="store_true", help="print the sections, save nothing")
    args = p.parse_args(argv)
    entity, sep, project = args.target.partition("/")
    if not (entity and sep and project) or "/" in project:
        print(f"thermo: error: give the W&B project as ENTITY/PROJECT, got {args.target!r}", file=sys.stderr)
        return 2
    try:
        view = workspace(entity, project, args.name)
    except ImportError as e:
        print(f"thermo: error: {e}", file=sys.stderr)
        return 2
    for section in view.sections:
        titles = [getattr(panel, "title", None) or type(panel).__name__ for panel in section.panels]
        print(f"{section.name}: {'; '.join(titles)}")
    if args.dry_run:
        return 0
    view.save()
    print(f"saved: {view.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
