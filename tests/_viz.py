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


# Scripts a test puts in a page (``app.index_string`` or the report) to act like a user: real
# mouse events on plotly's drag layer, so zoom and click go through plotly's own handlers.
USER_JS = r"""
window.thermoUser = (function () {
  function mouse(type, x, y) {
    var el = document.elementFromPoint(x, y) || document.body;
    el.dispatchEvent(new MouseEvent(type, {bubbles: true, cancelable: true, view: window,
      clientX: x, clientY: y, button: 0, buttons: type === 'mouseup' ? 0 : 1}));
  }
  function graph(id) { return document.querySelector('#' + id + ' .js-plotly-plot'); }
  function box(gd) { return gd.querySelector('.nsewdrag').getBoundingClientRect(); }
  return {
    graph: graph,
    // Drag across the middle of the plot from fraction a to b of its width: an x zoom.
    zoom: function (gd, a, b) {
      var r = box(gd), y = r.top + r.height / 2;
      var x0 = r.left + a * r.width, x1 = r.left + b * r.width;
      mouse('mousemove', x0, y); mouse('mousedown', x0, y);
      for (var i = 1; i <= 10; i++) mouse('mousemove', x0 + (x1 - x0) * i / 10, y + i * 0.2);
      mouse('mouseup', x1, y + 2);
    },
    // Click the heatmap row holding category `name` (its middle column).
    clickRow: function (gd, name) {
      var ya = gd._fullLayout.yaxis, r = box(gd);
      var y = r.top + ya.l2p(ya.d2l(name));
      var x = r.left + r.width / 2;
      mouse('mousemove', x, y); mouse('mousedown', x, y); mouse('mouseup', x, y);
      document.elementFromPoint(x, y).dispatchEvent(new MouseEvent('click', {bubbles: true,
        clientX: x, clientY: y, view: window}));
    },
    // Click the `label` button of the figure's first button menu (linear/log).
    button: function (gd, label) {
      var b = Array.prototype.filter.call(gd.querySelectorAll('.updatemenu-button'),
        function (g) { return g.textContent.trim() === label; })[0];
      b.dispatchEvent(new MouseEvent('click', {bubbles: true, view: window}));
    },
    report: function (obj) {
      var out = document.getElementById('thermo-test-result');
      if (!out) { out = document.createElement('pre'); out.id = 'thermo-test-result'; document.body.appendChild(out); }
      out.textContent = JSON.stringify(obj);
    }
  };
})();
"""


def page_result(dom: str):
    """What the page's script reported with ``thermoUser.report`` (None if it never did)."""
    import html
    import json

    text = element_text(dom, "thermo-test-result")
    return None if text is None else json.loads(html.unescape(text))


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
