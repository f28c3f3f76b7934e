"""Make the README's screenshots from real runs: docs/dashboard.png and docs/report.png (a run
that recovered), docs/gave-up.png (a run that gave up), docs/deep.png (a 24-layer model).

Trains the tiny GPT, provokes a real loss spike with a learning-rate burst, records the verdict
and the rollback a guard would, trains on from the restored step; a second run meets the burst
again after its rollback and gives up; a third is a 24-layer GPT seen through the ``deep``
layout. Then photographs the live dashboard and the static reports in headless chromium (the
test suite's tooling, ``tests/_viz.py``). Needs ``apt-get install -y chromium``; takes a few
minutes on 2 cores.

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


def _train(run_dir: Path, model, opt, first: int, last: int, burst=(), save_at=None, batch: int = 8,
           seq: int | None = None):
    import torch

    import thermo

    ds = _viz.dataset()
    therm = thermo.Thermometer(model, run_dir=run_dir, flush_every=10, start_step=first)
    saved = None
    for step in range(first, last + 1):
        for group in opt.param_groups:
            group["lr"] = 0.08 if step in burst else 3e-3
        x, y = ds.batch([(step * batch + i) % len(ds) for i in range(batch)])
        if seq:
            x, y = x[:, :seq], y[:, :seq]
        _, loss = model(x, y)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        therm.step(loss, grad_norm=gn)
        opt.step()
        opt.zero_grad()
        if step == save_at:
            saved = ({k: v.clone() for k, v in model.state_dict().items()},
                     {k: v for k, v in opt.state_dict().items()})
    therm.close()
    return saved


def make_gave_up_run(run_dir: Path) -> None:
    """The burst at 60..67 diverges; the rollback to 50 skips its batches, but the burst (the
    learning rate, not the data) comes back at 75..82 and the second verdict gives up."""
    import torch

    from thermo.store import Store

    torch.set_num_threads(1)
    model = _viz.tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    state, opt_state = _train(run_dir, model, opt, 0, 72, burst=range(60, 68), save_at=50)
    with Store(run_dir) as store:
        store.event("verdict", "act_max of h.1.mlp.c_fc grew 40x in 9 steps", step=70, kind="growth",
                    signal="act_max", layer="h.1.mlp.c_fc", onset_step=61, detection_step=70)
        store.event("rollback", "rolled back from step 70 to checkpoint 50; skipping 160 samples of steps 51..70",
                    step=70, from_step=70, to_step=50, onset_step=61, detection_step=70,
                    n_blacklisted=160, action="rollback")
        store.begin_attempt(50, "rollback")
    model = _viz.tiny_model()
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt.load_state_dict(opt_state)
    _train(run_dir, model, opt, 51, 90, burst=range(75, 83))
    with Store(run_dir) as store:
        store.event("verdict", "act_max of h.1.mlp.c_fc grew again", step=88, kind="growth",
                    signal="act_max", layer="h.1.mlp.c_fc", onset_step=76, detection_step=88,
                    cause="not the data: it came back with the samples skipped")
        store.event("give_up", "thermo gave up: 2 rollbacks (max_rollbacks=1)", step=88,
                    reason="2 rollbacks (max_rollbacks=1); try a lower learning rate or a longer warm-up")


def make_deep_run(run_dir: Path) -> None:
    import torch

    from thermo.gpt import GPT, GPTConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=24, n_head=2, n_embd=32, block_size=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _train(run_dir, model, opt, 0, 60, burst=range(40, 44), batch=4, seq=16)


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
        gave_up, deep = run_dir.parent / "gpt-gave-up", run_dir.parent / "gpt-24-layers"
        make_gave_up_run(gave_up)
        make_deep_run(deep)

        def dashboard(run, layout, name, size):
            app = create_app(run, layout)
            server = make_server("127.0.0.1", 0, app.server, threaded=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            try:
                shot = _viz.load(f"http://127.0.0.1:{server.server_port}/",
                                 screenshot=args.out / name, size=size)
            finally:
                server.shutdown()
            assert "main-svg" in shot

        dashboard(run_dir, None, "dashboard.png", (1000, 1250))
        dashboard(deep, "deep", "deep.png", (1000, 1700))
        report = write_report(run_dir, Path(tmp) / "report.html").resolve()
        _viz.load(report.as_uri(), screenshot=args.out / "report.png", size=(1000, 2800),
                  offline=True)
        report = write_report(gave_up, Path(tmp) / "gave-up.html").resolve()
        _viz.load(report.as_uri(), screenshot=args.out / "gave-up.png", size=(1000, 1300),
                  offline=True)
    for name in ("dashboard.png", "report.png", "gave-up.png", "deep.png"):
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
