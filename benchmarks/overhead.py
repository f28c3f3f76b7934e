"""Step-time overhead of monitoring, on the machine it runs on.

Trains identical copies of a ~10M-parameter GPT (6 layers, d=384, seq 128, batch 8, fp32,
AdamW), one per configuration, and alternates configurations in rounds so that drift in the
machine's speed hits all of them alike. Prints the median step time of each and its ratio to
no monitoring:

  none           plain training step
  thermo         thermo.Thermometer with defaults
  thermo-all     every probe every step: exact attention logits every step, per head, grad amax
                 of every watched module, non-finite counts
  hand-.item()   what users write by hand: forward hooks on every Linear/LayerNorm/Embedding
                 calling .item() on amax and amin, plus loss.item() and the grad norm's .item()
  wandb.watch    wandb.watch(model, log="all", log_freq=1), WANDB_MODE=offline

and, with --attn-sweep, thermo's overhead for several `attn_every` values (the default's basis).

    python benchmarks/overhead.py                 # ~5 minutes on 2 CPU cores
    python benchmarks/overhead.py --rounds 3 --steps 5 --quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn

import thermo
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.gpt import GPT, GPTConfig


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=128))


class HandHooks:
    """The common hand-written monitor: one host read per statistic per layer per step."""

    def __init__(self, model: nn.Module):
        self.stats: dict[str, float] = {}
        self.handles = [
            m.register_forward_hook(self._hook(n))
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding))
        ]

    def _hook(self, name):
        def hook(module, args, out):
            self.stats[f"{name}/max"] = out.detach().amax().item()
            self.stats[f"{name}/min"] = out.detach().amin().item()

        return hook

    def step(self, model, loss):
        self.stats["loss"] = loss.item()
        self.stats["grad_norm"] = torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None]).item()


class Config:
    def __init__(self, name, setup):
        self.name = name
        self.model = make_model()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4)
        self.after_backward = setup(self.model)
        self.times: list[float] = []

    def run(self, batches):
        for x, y in batches:
            t = time.perf_counter()
            _, loss = self.model(x, y)
            loss.backward()
            self.after_backward(loss)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.times.append(time.perf_counter() - t)


def configs(tmp: str, attn_sweep: list[int], with_wandb: bool):
    def none(model):
        return lambda loss: None

    def thermo_with(**kw):
        def setup(model):
            therm = thermo.Thermometer(model, run_dir=tempfile.mkdtemp(dir=tmp), **kw)
            return lambda loss: therm.step(loss)

        return setup

    def hand(model):
        hooks = HandHooks(model)
        return lambda loss: hooks.step(model, loss)

    def wandb_watch(model):
        import wandb

        # wandb.watch logs through the global run, so this is the one wandb run of the process.
        wandb.init(project="thermo-overhead", mode="offline", dir=tmp)
        wandb.watch(model, log="all", log_freq=1)
        return lambda loss: wandb.log({"loss": loss.item()})

    out = [
        Config("none", none),
        Config("thermo", thermo_with()),
        Config("thermo-all", thermo_with(attn_every=1, attn_per_head=True, grad="all", count_nonfinite=True)),
        Config("hand-.item()", hand),
    ]
    if with_wandb:
        out.append(Config("wandb.watch", wandb_watch))
    for k in attn_sweep:
        out.append(Config(f"thermo attn_every={k}", thermo_with(attn_every=k)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="rounds of alternation")
    ap.add_argument("--steps", type=int, default=10, help="steps per configuration per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    ap.add_argument("--attn-sweep", default="1,5,10,20,50",
                    help="attn_every values to time as well ('' for none)")
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smaller data read, for a smoke run")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = TokenDataset(stdlib_bytes(400_000 if args.quick else 2_000_000), block_size=128)
    g = torch.Generator().manual_seed(0)
    sweep = [int(k) for k in args.attn_sweep.split(",") if k]
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = configs(tmp, sweep, with_wandb=not args.no_wandb)
        n_params = sum(p.numel() for p in cfgs[0].model.parameters())

        def draw(n):
            return [data.batch(torch.randint(0, len(data), (8,), generator=g).tolist()) for _ in range(n)]

        for c in cfgs:
            c.run(draw(args.warmup))
            c.times.clear()
        for r in range(args.rounds):
            batches = draw(args.steps)  # every configuration trains on the same batches
            order = cfgs if r % 2 == 0 else cfgs[::-1]
            for c in order:
                c.run(batches)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(cfgs[0].times)
    print(f"\nthermo overhead benchmark — {datetime.date.today()} — {platform.node()} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}")
    print(f"GPT {n_params / 1e6:.1f}M params, 6 layers, d=384, seq 128, batch 8, fp32, AdamW; "
          f"{args.rounds} rounds x {args.steps} steps, medians")
    print(f"{'configuration':<24} {'median ms/step':>15} {'ratio':>8}")
    for c in cfgs:
        med = statistics.median(c.times)
        print(f"{c.name:<24} {med * 1e3:>15.1f} {med / base:>7.3f}x")


if __name__ == "__main__":
    main()
