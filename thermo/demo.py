"""`thermo demo`: train the reference GPT on CPU, hit a planted divergence, recover, report.

Two samples in each of three batches are poisoned (their share of the gradient scaled by 1e4,
with the on-device spike skip turned off so the bad updates really land). The detector sees the
gradient-norm spike, the guard rolls back to the newest good checkpoint from before the onset,
replays the steps since to find the samples that carry it, blacklists those six and nothing else,
and training carries on. The run directory ends with ``report.html``.
"""

from __future__ import annotations

import math
from pathlib import Path

from thermo.rundir import RunDir
from thermo.train_gpt import Summary, parse_args, train


def fresh_dir(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`... if it already holds something: never overwrite a run."""
    if not base.exists() or not any(base.iterdir()):
        return base
    n = 2
    while (base.parent / f"{base.name}-{n}").exists():
        n += 1
    return base.parent / f"{base.name}-{n}"


def demo_args(run_dir: Path, steps: int, quick: bool) -> list[str]:
    # Poison a few steps past a flush boundary, about 60% into the run: some bad updates land
    # before the next flush, so the divergence is visible in the loss curve before it is undone.
    first = (int(steps * 0.6) // 10) * 10 + 3
    size = (["--n-layer", "2", "--n-embd", "64", "--block-size", "64", "--batch-size", "8",
             "--data-bytes", "500000", "--checkpoint-every", "20", "--good-after", "20"]
            if quick else
            ["--n-layer", "4", "--n-embd", "128", "--block-size", "64", "--batch-size", "16",
             "--data-bytes", "2000000", "--checkpoint-every", "50", "--good-after", "40"])
    return ["--run-dir", str(run_dir), "--steps", str(steps), *size,
            "--poison-steps", f"{first}-{first + 2}", "--poison-per-batch", "2", "--skip-z", "0"]


def run_demo(run_dir: Path, steps: int, quick: bool, echo=print) -> Summary:
    """Train, recover, write the report and print what happened. Returns the run's summary."""
    echo(f"thermo demo: training a GPT on the Python standard library's sources in {run_dir}")
    echo("  a divergence is planted about 60% of the way in; watch it get caught and undone\n")
    summary = train(parse_args(demo_args(run_dir, steps, quick)))
    from thermo.report import write_report

    report = write_report(run_dir, run_dir / "report.html")
    echo(f"\ntrained {summary.steps} steps in {summary.seconds:.0f} s")
    for v in summary.verdicts:
        echo(f"  verdict    {v['message']}")
        echo(f"  onset      step {v['onset_step']}, detected at step {v['detection_step']}")
    if summary.rollbacks:
        echo(f"  rollbacks  {summary.rollbacks}; {summary.steps_lost} steps redone")
        for c in summary.causes:
            if c.get("cause"):
                echo(f"  cause      {c['cause']}: the replay blacklisted {c['n_blacklisted']} of the "
                     f"{c['suspects']} samples of the suspect steps")
        echo(f"  skipped    {summary.skipped_samples} samples, listed in {RunDir(run_dir).blacklist}")
    else:
        echo("  no divergence was detected")
    loss = "n/a" if math.isnan(summary.final_loss) else f"{summary.final_loss:.3f}"
    echo(f"  final loss {loss} (mean of the last 10 steps)")
    echo(f"  report     {report}")
    echo(f"  live view  thermo dashboard {run_dir}")
    return summary
