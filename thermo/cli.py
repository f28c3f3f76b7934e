"""The ``thermo`` command line.

Each command imports what it needs when it runs, so ``thermo --help`` stays fast and a missing
optional dependency only matters to the command that needs it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
import numpy as np

from thermo._io import RunDirError


class _Group(click.Group):
    """Turn thermo's own errors (bad run directory, torn file) into one clear line, exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (RunDirError, ValueError) as e:
            click.echo(f"thermo: error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="thermo")
def main():
    """thermo: thermometers for large-model training.

    Records per-layer activation, gradient and attention-logit extremes, the gradient norm and
    the loss into a run directory (RUN/thermo.db), detects divergence, rolls back to a good
    checkpoint and skips the batches that caused it.
    """


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4g}"


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Where the run goes (a numbered sibling if it already holds a run).")
@click.option("--steps", default=400, show_default=True, help="Optimizer steps to train.")
@click.option("--quick", is_flag=True, help="A smaller model and fewer steps (about a minute).")
def demo(run_dir: Path, steps: int, quick: bool):
    """Train a small GPT on CPU, hit a planted divergence, recover, write a report.

    Takes a few minutes on a laptop CPU. Ends by printing the verdict, the onset, the samples
    skipped and the steps lost, and writes RUN_DIR/report.html.
    """
    from thermo.demo import fresh_dir, run_demo

    if quick and steps == 400:
        steps = 120
    summary = run_demo(fresh_dir(run_dir), steps, quick, echo=click.echo)
    if not summary.rollbacks:
        sys.exit(1)  # the demo exists to show a recovery: say so if it did not happen


def _json_num(v):
    """A float as strict JSON: non-finite values become the strings "nan", "inf", "-inf"."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--top", default=5, show_default=True, help="How many of the hottest layers to list (>= 1).")
@click.option(
    "--stat",
    default="act_max",
    show_default=True,
    help="Per-layer statistic that ranks the layers (act_max, grad_max, attn_max, attn_bound...).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def inspect(run_dir: Path, top: int, stat: str, as_json: bool):
    """Summarise a run: status, verdicts and what thermo did, steps, last loss and grad norm,
    hottest layers, events.

    RUN_DIR is a thermo run directory (it holds thermo.db). Safe to run while training writes.

    \b
    Exit status (for scripts; the same in --json as "exit_code"):
      0  training, finished, or idle (nothing recorded lately)
      1  the run gave up (the Guard or the supervisor stopped trying)
      2  bad input: no run there, an unreadable store, a bad option
      3  stopped by a signal before it finished
    """
    import json

    import pandas as pd

    from thermo import plots
    from thermo.store import Run, Store

    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    # Only what the summary needs: every attempt's scalars (the story tells the branches apart),
    # the events, and the one statistic ranked, not every per-layer row of a long run.
    with Store(run_dir, readonly=True) as store, store.snapshot():
        run = Run(run_dir=run_dir, scalars=store.scalars(effective=False), layers=pd.DataFrame(),
                  events=store.events(), attempts=store.attempts(), meta=store.meta())
        layers = store.layer_stats(stats=[stat])
        recorded = sorted({s for entry in run.meta.get("layers", []) for s in entry.get("stats", ())})
        if layers.empty and not recorded:  # a store without the layer list in its meta
            recorded = sorted(set(store.layer_stats()["stat"]))
    story = plots.run_story(run)
    eff = run.scalars[plots.effective_mask(run.scalars, run.attempts)] if len(run.scalars) else run.scalars
    if recorded and stat not in recorded:
        raise ValueError(f"no per-layer statistic {stat!r} recorded in {run_dir}; "
                         f"recorded: {', '.join(recorded)} (choose one with --stat)")
    out: dict = {"run": str(run_dir), "status": story.status, "status_line": story.status_line,
                 "exit_code": story.exit_code,
                 "verdicts": [{"step": i.step, "onset": i.onset, "kind": i.kind, "signal": i.signal,
                               "layer": i.layer, "cause": i.cause, "actions": i.actions, "line": i.line}
                              for i in story.incidents],
                 "other_actions": story.other, "steps": len(eff), "attempts": len(run.attempts),
                 "first_step": None, "last_step": None, "scalars": {}, "hottest": [], "stat": stat,
                 "events": len(run.events)}
    if len(eff):
        out["first_step"], out["last_step"] = int(eff["step"].min()), int(eff["step"].max())
        eff = eff.sort_values("step", kind="stable")
        for key in ("loss", "grad_norm"):
            if key in eff:
                col = eff[key]
                finite = col[np.isfinite(col)]
                out["scalars"][key] = {
                    "last": _json_num(col.iloc[-1]),
                    "min": _json_num(finite.min()) if len(finite) else None,
                    "max": _json_num(finite.max()) if len(finite) else None,
                    "nonfinite_steps": int(len(col) - len(finite))}
    if len(layers):
        last_step = layers["step"].max()
        window = layers[layers["step"] > last_step - 100]
        # Rank by magnitude with NaN hottest of all: a non-finite layer is what to look at first.
        mag = window["value"].abs().fillna(np.inf)
        peak_rows = mag.groupby(window["layer"]).idxmax()
        order = mag[peak_rows].sort_values(ascending=False, kind="stable").index[:top]
        hottest = window.loc[order].set_index("layer")["value"]
        # The latest value of each layer (NaN included), whatever step it was recorded at.
        now = window.sort_values("step", kind="stable").drop_duplicates("layer", keep="last")
        now = now.set_index("layer")["value"]
        out["hottest"] = [{"layer": name, "peak": _json_num(peak), "last": _json_num(now.get(name, math.nan))}
                          for name, peak in hottest.items()]
    if as_json:
        click.echo(json.dumps(out, indent=1))
        sys.exit(story.exit_code)
    click.echo(f"run        {run_dir}")
    click.echo(f"status     {story.status_line}")
    for inc in story.incidents:
        click.echo(f"  verdict  {inc.line}")
    for other in story.other:
        click.echo(f"  also     {other}")
    if out["last_step"] is None:
        click.echo("steps      none recorded yet")
        sys.exit(story.exit_code)
    click.echo(f"steps      {out['steps']} recorded, {out['first_step']}..{out['last_step']} "
               f"(attempts: {out['attempts']})")
    for key, v in out["scalars"].items():
        line = f"{key:<10} last {_fmt(_num(v['last']))}"
        if v["min"] is not None:
            line += f"   min {_fmt(v['min'])}   max {_fmt(v['max'])}"
        if v["nonfinite_steps"]:
            line += f"   non-finite steps {v['nonfinite_steps']}"
        click.echo(line)
    if out["hottest"]:
        click.echo(f"hottest layers by |{stat}| over the last 100 steps:")
        width = max(len(h["layer"]) for h in out["hottest"])
        click.echo(f"  {'layer':<{width}}  {'peak':>10}  {'last':>10}")
        for h in out["hottest"]:
            click.echo(f"  {h['layer']:<{width}}  {_fmt(_num(h['peak'])):>10}  {_fmt(_num(h['last'])):>10}")
    if len(run.events):
        click.echo(f"events     {len(run.events)}; latest:")
        for _, e in run.events.tail(5).iterrows():
            step = "" if e["step"] is None or e["step"] != e["step"] else f" step {int(e['step'])}"
            click.echo(f"  [{e['kind']}]{step}: {e['message']}")
    sys.exit(story.exit_code)


def _num(v) -> float:
    return float(v)  # _json_num's "nan"/"inf" strings parse back too


def _check_port_free(host: str, port: int) -> None:
    """One clear line for a taken port, before Dash starts (werkzeug would print its own)."""
    import errno
    import socket

    if not 0 < port < 65536:
        raise ValueError(f"--port must be 1..65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is already in use (another dashboard?); "
                                 f"choose another with --port, e.g. --port {port + 1}") from None
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; "
                             "check --host and --port") from None


_LAYOUT_HELP = ("Panel layout: a shipped one by name (default, attention, deep) or a JSON/YAML "
                "file of your own.")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--port", default=8050, show_default=True, help="TCP port to serve on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (keep the default and use an SSH tunnel to view remotely).")
@click.option("--layout", "layout_file", help=_LAYOUT_HELP)
def dashboard(run_dirs: tuple[Path, ...], port: int, host: str, layout_file: str | None):
    """Serve a live dashboard of RUN_DIRS that updates while they train (read-only). One run
    directory: its headline and panels; several: their headlines and loss and grad norm overlaid.

    Exit status: 0 when stopped with Ctrl-C, 2 on bad input (a bad layout, a taken port).
    """
    from thermo import plots

    layout = plots.load_layout(layout_file)  # a bad layout is one line, before anything starts
    try:
        from thermo.dashboard import serve
    except ImportError as e:  # Dash is an optional extra: say which one
        raise click.ClickException(str(e)) from None
    _check_port_free(host, port)
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            click.echo(f"thermo: note: {run_dir} does not exist yet; waiting for the run to create it",
                       err=True)
    click.echo(f"thermo dashboard: http://{host}:{port}/  (Ctrl-C to stop)", err=True)
    try:
        serve(list(run_dirs) if len(run_dirs) > 1 else run_dirs[0], host=host, port=port, layout=layout)
    except ImportError as e:  # Dash is an optional extra: say which one
        raise click.ClickException(str(e)) from None


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", default="report.html", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="HTML file to write.")
@click.option("--layout", "layout_file", help=_LAYOUT_HELP)
@click.option("--cdn", is_flag=True,
              help="Load plotly.js from its CDN (a small file that needs the network) instead of inlining it.")
def report(run_dirs: tuple[Path, ...], output: Path, layout_file: str | None, cdn: bool):
    """Write an HTML report of RUN_DIRS that opens offline; several run directories give one
    page comparing them (loss and grad norm overlaid, each run's headline and panels).

    Refuses an output that would overwrite a run's own files (e.g. -o RUN/thermo.db).
    Exit status: 0 written, 2 on bad input.
    """
    from thermo.report import write_report

    path = write_report(list(run_dirs) if len(run_dirs) > 1 else run_dirs[0], output,
                        layout=layout_file, cdn=cdn)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _sup(field: str):
    """A `SupervisorConfig` default, read when the command runs or shows its help (one default,
    one place; importing the supervisor at import time would slow every ``thermo --help``)."""

    def default():
        from thermo.supervisor import SupervisorConfig

        return getattr(SupervisorConfig, field)

    return default


class _SupOption(click.Option):
    """Shows the `SupervisorConfig` default its callable reads."""

    def get_help_record(self, ctx):
        self.show_default = str(self.default())
        return super().get_help_record(ctx)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("command", nargs=-1, required=True)
@click.option("--max-restarts", type=int, default=_sup("max_restarts"), cls=_SupOption,
              help="Give up after this many restarts.")
@click.option("--max-stalled", type=int, default=_sup("max_stalled"), cls=_SupOption,
              help="Give up after this many launches in a row that get no further than before.")
@click.option("--hang-timeout", type=float, default=_sup("hang_timeout"), cls=_SupOption,
              help="Seconds without a heartbeat or new metrics before the command counts as hung.")
@click.option("--startup-timeout", type=float, default=_sup("startup_timeout"), cls=_SupOption,
              help="Seconds a launch may take to its first step (0: no limit).")
@click.option("--grace", type=float, default=_sup("grace"), cls=_SupOption,
              help="Seconds between SIGTERM and SIGKILL.")
@click.option("--verdict-grace", type=float, default=_sup("verdict_grace"), cls=_SupOption,
              help="Seconds a Guard gets to roll back by itself before the supervisor acts.")
@click.option("--dtype", default=None, help="Compute dtype for the detector's overflow rule (float16, bfloat16).")
@click.option("--no-detect", is_flag=True, help="Do not run the detector over the metrics store.")
@click.option("--poll", type=float, default=_sup("poll"), cls=_SupOption, help="Seconds between looks.")
@click.option("--restart-delay", type=float, default=_sup("restart_delay"), cls=_SupOption,
              help="Seconds to wait before a restart.")
@click.option("--quiet", is_flag=True, help="No status line.")
def supervise(run_dir: Path, command: tuple[str, ...], max_restarts: int, max_stalled: int, hang_timeout: float,
              startup_timeout: float, grace: float, verdict_grace: float, dtype: str | None, no_detect: bool,
              poll: float, restart_delay: float, quiet: bool):
    """Run a training COMMAND and keep it healthy: restart it after crashes and hangs, roll back and
    blacklist the batches behind a divergence, give up clearly.

    Put the command after '--':

    \b
        thermo supervise runs/a --hang-timeout 300 -- \\
            torchrun --nproc_per_node=8 -m thermo.train_gpt --run-dir runs/a

    On several nodes (torchrun with --nnodes above 1), run it on every node around that node's
    torchrun, over one shared RUN_DIR: the first to start leads, the others follow and exit with
    its exit status (README: "On a cluster").

    The command gets THERMO_RUN_DIR=RUN_DIR and must resume from the run directory when restarted
    (the Guard does). Every decision is recorded as an event in RUN_DIR/thermo.db. Exit status: 0
    when the command finishes, 1 when the supervisor gives up, 2 on bad input, 128+N when stopped
    by signal N (SIGINT, SIGTERM or SIGUSR1: the command gets SIGTERM, and its Guard checkpoints
    within --grace). A command that exits after a preemption (code 87, or the Guard's preempt
    event under torchrun) is relaunched without counting against --max-restarts.
    """
    from thermo.detector import DetectorConfig
    from thermo.supervisor import Supervisor, SupervisorConfig, SupervisorError

    config = SupervisorConfig(
        max_restarts=max_restarts, max_stalled=max_stalled, hang_timeout=hang_timeout,
        startup_timeout=startup_timeout, grace=grace, verdict_grace=verdict_grace, poll=poll,
        detect=not no_detect, detector=DetectorConfig(dtype=dtype) if dtype else None,
        restart_delay=restart_delay, **({"status_every": 0.0} if quiet else {}))
    try:
        outcome = Supervisor(run_dir, list(command), config).run()
    except SupervisorError as e:
        click.echo(f"thermo: error: {e}", err=True)
        sys.exit(2)
    sys.exit(outcome.exit_code)


def _parse_ids(specs: tuple[str, ...]):
    """Ids and inclusive ranges ("17", "100-120", "3,5-9") as an IdSet, never a list: a range may
    hold a hundred billion ids."""
    from thermo.data.blacklist import MAX_ID, IdSet

    ranges = []
    for part in (p.strip() for spec in specs for p in spec.split(",")):
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise ValueError(f"{part!r} is not a sample id or a range like 100-120")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"the range {part!r} ends before it starts; write it as {last}-{first}")
        if last >= MAX_ID:
            raise ValueError(f"{part!r} goes past the largest sample id, 2**62 - 1")
        ranges.append((first, last))
    return IdSet.from_ranges(ranges)


def _ranges(ids) -> str:
    """'7 17 100-103' for an IdSet (or sorted ids); long lists are cut after 20 ranges."""
    from thermo.data.blacklist import IdSet

    rs = IdSet.from_ids(ids).ranges()
    text = " ".join(str(a) if a == b else f"{a}-{b}" for a, b in rs[:20])
    return text + (f" ... ({len(rs) - 20} more ranges)" if len(rs) > 20 else "")


def _ids_json(ids) -> dict:
    """An event's ids: the list itself when short, else the count and the ranges."""
    if len(ids) <= 10_000:
        return {"ids": list(ids)}
    return {"ids": len(ids), "ranges": [list(r) for r in ids.ranges()[:10_000]]}


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("action", type=click.Choice(["list", "add", "remove"]), default="list")
@click.argument("ids", nargs=-1)
@click.option("--reason", default="added by hand", show_default=True, help="Why (for add).")
@click.option("--json", "as_json", is_flag=True, help="List the entries as JSON.")
def blacklist(run_dir: Path, action: str, ids: tuple[str, ...], reason: str, as_json: bool):
    """List, add or remove the sample ids RUN_DIR skips.

    \b
        thermo blacklist runs/a                      # list, grouped by why
        thermo blacklist runs/a add 17 100-120 --reason "corrupt shard"
        thermo blacklist runs/a remove 17

    Edits are atomic (merged under the blacklist's file lock, so a running trainer or supervisor
    loses nothing) and recorded as `blacklist` events. A running trainer reads them at its next
    rollback or restart.
    """
    import json
    from dataclasses import asdict

    from thermo.data import Blacklist
    from thermo.store import Store

    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist (create it first to seed a blacklist)")
    if action == "list":
        if ids:
            raise ValueError("list takes no ids")
        bl = Blacklist.load(run_dir)
        if as_json:
            # One object per id while that stays printable; past a million, one per group with
            # its [first, last] ranges (a range may hold a hundred billion ids).
            rows = ([{"id": i, **asdict(e)} for i, e in sorted(bl.entries.items())] if len(bl) <= 1_000_000
                    else [{"ranges": [list(r) for r in ids.ranges()], **asdict(e)} for e, ids in bl.groups])
            click.echo(json.dumps(rows, indent=1))
            return
        click.echo(f"{len(bl)} blacklisted samples in {run_dir}")
        groups: dict[tuple, object] = {}
        for e, members in bl.groups:
            key = (e.source, e.reason)
            groups[key] = groups[key] | members if key in groups else members
        for (source, why), members in groups.items():
            click.echo(f"  [{source}] {len(members)}: {why}\n      {_ranges(members)}")
        return
    if not ids:
        raise ValueError(f"{action} needs sample ids, e.g. thermo blacklist {run_dir} {action} 17 100-120")
    wanted = _parse_ids(ids)
    bl = Blacklist.load(run_dir)  # a broken blacklist or store fails before anything is written
    with Store(run_dir, lock=False) as store:  # beside a running trainer: events only
        if action == "add":
            added, removed = bl.add_set(wanted, reason=reason, source="user"), wanted - wanted
        else:
            added, removed = wanted - wanted, bl.remove_set(wanted)
        a, r = _ids_json(added), _ids_json(removed)
        store.event("blacklist", f"{action} by hand: {len(added) or len(removed)} samples ({reason})"
                    if action == "add" else f"remove by hand: {len(removed)} samples",
                    added=a["ids"], removed=r["ids"], reason=reason if action == "add" else "removed by hand",
                    source="user", **({"added_ranges": a["ranges"]} if "ranges" in a else {}),
                    **({"removed_ranges": r["ranges"]} if "ranges" in r else {}))
    done = added if action == "add" else removed
    click.echo(f"{'added' if action == 'add' else 'removed'} {len(done)} of {len(wanted)} ids"
               + (f": {_ranges(done)}" if len(done) else " (nothing changed)"))


if __name__ == "__main__":
    main()
