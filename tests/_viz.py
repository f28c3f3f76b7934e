"""Shared by the plots/report/dashboard/sinks tests and ``docs/make_screenshots.py``: real tiny
training runs, and headless Debian chromium (``apt-get install -y chromium``).

Also a script: ``python tests/_viz.py train RUN --steps N --sleep S --stop-file F`` trains into
RUN in its own process (what the live-dashboard test watches).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--mute-audio",
]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run_chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed: apt-get update && apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="thermo-chromium-") as profile:
        return subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout,
        )


def load(url: str, screenshot: str | os.PathLike | None = None, size: tuple[int, int] = (1100, 1400),
         offline: bool = False, budget_ms: int = 15000, timeout: float = 90) -> str:
    """Open `url`, let its scripts run, and return the DOM (``--dump-dom``); also write a PNG of
    the window (`size`: width, height) to `screenshot` if given, in the same page load.
    `offline` points chromium at a closed proxy, so any fetch off the page itself fails.
    `budget_ms` is the page's virtual time: timers (a dashboard's refresh) fire within it."""
    args = [f"--virtual-time-budget={budget_ms}", "--run-all-compositor-stages-before-draw",
            f"--window-size={size[0]},{size[1]}"]
    if offline:
        args += ["--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
    if screenshot is not None:
        screenshot = Path(screenshot).resolve()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        args.append(f"--screenshot={screenshot}")
    out = _run_chromium([*args, "--dump-dom", url], timeout)
    if "<html" not in out.stdout:
        raise RuntimeError(f"chromium dumped no DOM for {url}: {out.stderr[-2000:]}")
    if screenshot is not None and not screenshot.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {url}: {out.stderr[-2000:]}")
    return out.stdout


def element_text(dom: str, element_id: str) -> str | None:
    """Text of the element with `element_id` (one leaf element, as the status line uses)."""
    m = re.search(rf'id="{re.escape(element_id)}"[^>]*>([^<]*)<', dom)
    return m.group(1) if m else None


def section(dom: str, section_id: str) -> str:
    """The HTML of ``<section id=section_id>`` (sections are not nested)."""
    start = dom.find(f'id="{section_id}"')
    if start < 0:
        return ""
    end = dom.find("</section>", start)
    return dom[start:end]


# -- real runs ---------------------------------------------------------------------------------


def tiny_model(seed: int = 0):
    import torch

    from thermo.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))


_DATASET = None


def dataset():
    global _DATASET
    if _DATASET is None:
        from thermo.corpus import TokenDataset, stdlib_bytes

        _DATASET = TokenDataset(stdlib_bytes(300_000), 32)
    return _DATASET


def train(run_dir, model, opt, steps: int, start_step: int = 0, sleep: float = 0.0,
          nan_grad_norm_at: int | None = None, stop_file: str | None = None, sinks=(),
          flush_every: int = 5, sync_flush: bool = False):
    """Train `model` for `steps` steps from `start_step`, recorded by a Thermometer into run_dir."""
    import thermo

    ds = dataset()
    therm = thermo.Thermometer(model, run_dir=run_dir, flush_every=flush_every,
                               start_step=start_step, sinks=sinks, sync_flush=sync_flush)
    try:
        for step in range(start_step, start_step + steps):
            if stop_file and os.path.exists(stop_file):
                break
            ids = [(step * 4 + i) % len(ds) for i in range(4)]
            x, y = ds.batch(ids)
            _, loss = model(x, y)
            loss.backward()
            if step == nan_grad_norm_at:
                therm.step(loss, grad_norm=math.nan)  # what a blown-up step reports
            else:
                therm.step(loss)
            opt.step()
            opt.zero_grad()
            if sleep:
                time.sleep(sleep)
    finally:
        therm.close()
    return therm


def incident_run(run_dir, steps: int = 40, rollback_to: int = 20, onset: int = 25, detect: int = 30):
    """A real run with a history: attempt 0 trains `steps` steps, a verdict at `detect` (onset
    `onset`) rolls back to `rollback_to`, attempt 1 trains on (with one NaN grad norm), and the
    other event kinds are recorded. Returns the run directory."""
    import torch

    from thermo.store import Store

    torch.set_num_threads(1)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train(run_dir, model, opt, steps)
    with Store(run_dir) as store:
        store.event("verdict", f"loss spike from step {onset}", step=detect, kind="spike", signal="loss",
                    layer="h.1.attn", onset_step=onset, detection_step=detect,
                    evidence={"zscore": 9.1})
        store.event("rollback", f"restored step {rollback_to}", step=detect, from_step=detect,
                    to_step=rollback_to, onset_step=onset, detection_step=detect,
                    blacklisted=list(range(100, 120)), n_blacklisted=20)
        store.event("blacklist", "20 samples", step=detect, added=list(range(100, 120)),
                    removed=[], reason="verdict")
        store.begin_attempt(rollback_to, "rollback")
    model = tiny_model()  # stands in for the restored checkpoint
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(run_dir, model, opt, steps - rollback_to + 5, start_step=rollback_to + 1,
          nan_grad_norm_at=rollback_to + 8)
    with Store(run_dir) as store:
        store.event("skip_step", "non-finite grad norm", step=rollback_to + 8,
                    reason="nonfinite")
        store.event("restart", "trainer exited", step=steps + 2, reason="signal", exit_code=-9)
    return Path(run_dir)


def shared_incident_run(tmp_path_factory) -> Path:
    """One `incident_run` per pytest session, shared read-only by the test modules that need it."""
    run_dir = tmp_path_factory.getbasetemp() / "incident" / "run"
    done = run_dir.parent / "done"
    if not done.exists():
        incident_run(run_dir)
        done.touch()
    return run_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("run_dir")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--sleep", type=float, default=0.1)
    t.add_argument("--stop-file")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # sync_flush: each flush lands in the store at once, so the dashboard sees steady progress.
    train(args.run_dir, model, opt, args.steps, sleep=args.sleep, stop_file=args.stop_file,
          sync_flush=True)


if __name__ == "__main__":
    main()
