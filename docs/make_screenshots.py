"""Make the README's screenshots (docs/dashboard.png, docs/report.png) from a real run.

Trains the tiny GPT, provokes a real loss spike with a learning-rate burst, records the verdict
and the rollback a guard would, trains on from the restored step, then photographs the live
dashboard and the static report in headless chromium (the test suite's tooling,
``tests/_viz.py``). Needs ``apt-get install -y chromium``; takes about a minute on 2 cores.

    python docs/make_screenshots.py [--out docs] [--keep RUN_DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import _viz  # noqa: E402


def make_run(run_dir: Path) -> None:
    """Attempt 0 blows up after an lr burst at steps 120..127; the verdict (onset 121, detected
    130) rolls back to step 110 and attempt 1 trains on to step 200 with the burst skipped."""
    import torch

    import thermo
    from thermo.store import Store

    torch.set_num_threads(1)
    ds = _viz.dataset()

    def run(model, opt, first, last, burst=()):
        therm = thermo.Thermometer(model, run_dir=run_dir, flush_every=10, start_step=first)
        for step in range(first, last + 1):
            for group in opt.param_groups:
                group["lr"] = 0.08 if step in burst else 3e-3
            x, y = ds.batch([(step * 8 + i) % len(ds) for i in range(8)])
            _, loss = model(x, y)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
            therm.step(loss, grad_norm=gn)
            opt.step()
            opt.zero_grad()
            if step == 110:
                saved = ({k: v.clone() for k, v in model.state_dict().items()},
                         {k: v for k, v in opt.state_dict().items()})
                torch.save(saved, run_dir / "ckpt110.pt")
        therm.close()

    model = _viz.tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    run(model, opt, 0, 135, burst=range(120, 128))
    with Store(run_dir) as store:
        store.event("verdict", "loss spike: 4.1 sigma above the running mean", step=130,
                    kind="spike", signal="loss", layer="h.1.attn", onset_step=121, detection_step=130,
                    evidence={"zscore": 4.1})
        store.event("rollback", "restored checkpoint of step 110", step=130, from_step=130,
                    to_step=110, onset_step=121, detection_step=130,
                    blacklisted=list(range(968, 1048)), n_blacklisted=80)
        store.event("blacklist", "80 samples of steps 121..130", step=130,
                    added=list(range(968, 1048)), removed=[], reason="verdict")
        store.begin_attempt(110, "rollback")
    state, opt_state = torch.load(run_dir / "ckpt110.pt")
    model = _viz.tiny_model()
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt.load_state_dict(opt_state)
    run(model, opt, 111, 200)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--keep", type=Path, help="write the run here and keep it (default: a temp dir)")
    args = p.parse_args()
    if _viz.chromium() is None:
        sys.exit("chromium is not installed: apt-get update && apt-get install -y chromium")
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log per refresh

    from thermo.dashboard import create_app
    from thermo.report import write_report

    args.out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="thermo-shots-") as tmp:
        if args.keep is None:
            os.chdir(tmp)  # so the pages name the run "runs/gpt-tiny", not a temp path
        run_dir = args.keep or Path("runs/gpt-tiny")
        run_dir.mkdir(parents=True, exist_ok=True)
        make_run(run_dir)
        args.out.mkdir(parents=True, exist_ok=True)
        app = create_app(run_dir)
        server = make_server("127.0.0.1", 0, app.server, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            shot = _viz.load(f"http://127.0.0.1:{server.server_port}/",
                             screenshot=args.out / "dashboard.png", size=(1000, 1150))
        finally:
            server.shutdown()
        assert "main-svg" in shot
        report = write_report(run_dir, Path(tmp) / "report.html").resolve()
        _viz.load(report.as_uri(), screenshot=args.out / "report.png", size=(1000, 2600),
                  offline=True)
    for name in ("dashboard.png", "report.png"):
        path = args.out / name
        _shrink(path)
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def _shrink(path: Path) -> None:
    """Quantize to 256 colours when Pillow is around (about 3x smaller); plots need no more."""
    try:
        from PIL import Image
    except ImportError:
        return
    img = Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    img.save(path, optimize=True)


if __name__ == "__main__":
    main()
