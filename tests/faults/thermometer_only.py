"""A loop that logs through a Thermometer only: no Guard, no checkpoints, no heartbeat.

On its first launch in the run directory the loss turns NaN from step ``--nan-at`` on and the loop
keeps going, as nothing inside it would stop it: `thermo supervise` must see the divergence in
the metrics store and act. Later launches train cleanly.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from thermo import Thermometer

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=60)
p.add_argument("--nan-at", type=int, default=25)
args = p.parse_args()
run_dir = Path(os.environ["THERMO_RUN_DIR"])
marker = run_dir / ".diverged_once"
first = not marker.exists()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
with Thermometer(model, run_dir, flush_every=5, attention=False) as therm:
    for step in range(args.steps):
        x = torch.randn(16, 8)
        if first and step >= args.nan_at:
            marker.touch()
            x = x * float("nan")
        loss = model(x).pow(2).mean()
        loss.backward()
        therm.step(loss)
        opt.step()
        opt.zero_grad()
        time.sleep(0.03)
