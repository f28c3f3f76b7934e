"""Step-time overhead of monitoring, on the machine it runs on.

Trains identical copies of a ~10M-parameter GPT (6 layers, d=384, seq 128, batch 8, fp32,
AdamW), one per configuration, interleaved step by step on the same batches, so that drift in the
machine's speed hits all of them alike; a second unmonitored copy shows the noise floor. Prints
the median and the mean step time of each (the mean includes thermo's flush every 10th step) and
their ratios to no monitoring:

  none           plain training step
  thermo         thermo.Thermometer with defaults
  thermo-all     every probe every step: exact attention logits every step, per head, grad amax
                 of every watched module, non-finite counts
  hand-.item()   what users write by hand: forward hooks on every Linear/LayerNorm/Embedding
                 calling .item() on amax and amin, plus loss.item() and the grad norm's .item()
  wandb.watch    wandb.watch(model, log="all", log_freq=1), WANDB_MODE=offline

and, with --attn-sweep, thermo's overhead for several `attn_every` values (the default's basis).

    python benchmarks/overhead.py --compile       # ~15 minutes on 2 CPU cores
    python benchmarks/overhead.py --steps 5 --quick
    python benchmarks/overhead.py --only "none, again (noise floor)" --only thermo --no-wandb --attn-sweep ''
"""

from __future__ import annotations

import argparse
import contextlib
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
        self.model = model
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

    def step(self, loss):
        self.stats["loss"] = loss.item()
        self.stats["grad_norm"] = torch.nn.utils.get_total_norm(
            [p.grad for p in self.model.parameters() if p.grad is not None]).item()

    def remove(self):
        for h in self.handles:
            h.remove()


class Config:
    """A way of monitoring, attached to its own copy of the model (same weights, same batches).

    On CUDA each step is timed between two ``torch.cuda.synchronize()`` calls, outside the step;
    `amp` runs the forward under autocast to that dtype."""

    def __init__(self, name, attach, compile: bool = False, model_fn=make_model,
                 device: torch.device = torch.device("cpu"), amp: torch.dtype | None = None):
        self.name = name
        self.model = model_fn().to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, fused=True if device.type == "cuda" else None)
        self.after_backward, self.detach = attach(self.model)
        self.forward = torch.compile(self.model) if compile else self.model
        self.device, self.amp = device, amp
        self.times: list[float] = []

    def step(self, x, y, timed: bool) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext():
            _, loss = self.forward(x, y)
        loss.backward()
        self.after_backward(loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        if timed:
            self.times.append(time.perf_counter() - t)


# attach(model) -> (after_backward(loss), detach()): the ways of monitoring compared.


def no_monitoring(model):
    return (lambda loss: None), (lambda: None)


def thermo_with(tmp: str, **kw):
    def attach(model):
        therm = thermo.Thermometer(model, run_dir=tempfile.mkdtemp(dir=tmp), **kw)
        return therm.step, therm.close

    return attach


def hand_hooks(model):
    hooks = HandHooks(model)
    return hooks.step, hooks.remove


def interleave(cfgs: list[Config], next_batch, warmup: int, steps: int) -> None:
    """Every configuration runs one step on the same batch (``next_batch()``), then the next
    batch; the order rotates each step. Speed that drifts in phases (this VM's moves by ±20% over
    tens of steps) hits all of them alike, where blocks of steps per configuration would turn it
    into fake differences. Detaches every configuration at the end."""
    for i in range(warmup + steps):
        x, y = next_batch()
        k = i % len(cfgs)
        for c in cfgs[k:] + cfgs[:k]:
            c.step(x, y, timed=i >= warmup)
        if (i + 1) % 10 == 0:
            print(f"step {i + 1}/{warmup + steps}", file=sys.stderr)
    for c in cfgs:
        c.detach()


def ratio_table(cfgs: list[Config], reference=lambda c: None) -> list[str]:
    """A line per configuration: its median step time, the median over steps of its step time
    over its reference's on the same batch, and the ratio of their mean step times.
    `reference(c)` names the configuration `c` is compared with (None: the first)."""
    by_name = {c.name: c for c in cfgs}
    lines = [f"{'configuration':<30} {'median ms':>10} {'ratio':>7} {'mean ratio':>11}"]
    for c in cfgs:
        ref = by_name[reference(c)].times if reference(c) else cfgs[0].times
        ratio = statistics.median(a / b for a, b in zip(c.times, ref))
        mean_ratio = statistics.fmean(c.times) / statistics.fmean(ref)
        lines.append(f"{c.name:<30} {statistics.median(c.times) * 1e3:>10.1f} {ratio:>6.3f}x {mean_ratio:>10.3f}x")
    return lines


def configs(tmp: str, attn_sweep: list[int], with_wandb: bool, compiled: bool) -> list[Config]:
    def wandb_watch(model):
        import wandb

        if wandb.run is None:  # wandb.watch logs through the global run: one for the process
            wandb.init(project="thermo-overhead", mode="offline", dir=tmp)
        wandb.watch(model, log="all", log_freq=1)
        return (lambda loss: wandb.log({"loss": loss.item()})), (lambda: wandb.unwatch(model))

    out = [
        Config("none", no_monitoring),
        Config("none, again (noise floor)", no_monitoring),
        Config("thermo", thermo_with(tmp)),
        Config("thermo-all", thermo_with(tmp, attn_every=1, attn_per_head=True, grad="all", count_nonfinite=True)),
        Config("hand-.item()", hand_hooks),
    ]
    if with_wandb:
        out.append(Config("wandb.watch", wandb_watch))
    if compiled:
        # torch.compile (inductor): thermo attaches first, then the model is compiled; the hooks'
        # reductions fuse into the kernels that produce the activations.
        out.append(Config("none (compiled)", no_monitoring, compile=True))
        out.append(Config("thermo (compiled)", thermo_with(tmp), compile=True))
    for k in attn_sweep:
        out.append(Config(f"thermo attn_every={k}", thermo_with(tmp, attn_every=k)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=80, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first")
    ap.add_argument("--attn-sweep", default="1,10,50",
                    help="attn_every values to time as well ('' for none)")
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time both under torch.compile")
    ap.add_argument("--quick", action="store_true", help="smaller data read, for a smoke run")
    ap.add_argument("--only", action="append", default=[],
                    help="a configuration to time (repeat for several; default: all); 'none' is always timed")
    args = ap.parse_args()
    if args.compile:  # the first steps compile (sampled and unsampled steps are two graphs)
        args.warmup = max(args.warmup, 12)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = TokenDataset(stdlib_bytes(400_000 if args.quick else 2_000_000), block_size=128)
    g = torch.Generator().manual_seed(0)
    sweep = [int(k) for k in args.attn_sweep.split(",") if k]
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = configs(tmp, sweep, with_wandb=not args.no_wandb, compiled=args.compile)
        if args.only:  # "none" stays first: the ratios are taken against it
            keep = {"none", *args.only}
            cfgs = [c for c in cfgs if c.name in keep]
        n_params = sum(p.numel() for p in cfgs[0].model.parameters())
        interleave(cfgs, lambda: data.batch(torch.randint(0, len(data), (8,), generator=g).tolist()),
                   args.warmup, args.steps)
    print(f"\nthermo overhead benchmark — {datetime.date.today()} — {platform.node()} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}")
    print(f"GPT {n_params / 1e6:.1f}M params, 6 layers, d=384, seq 128, batch 8, fp32, AdamW; "
          f"{args.steps} steps each, interleaved step by step")
    print("ratio: median over steps of (this step time / the unmonitored step time on the same batch);")
    print("mean ratio: the same over the mean step times (includes thermo's flush every 10th step)\n")
    for line in ratio_table(cfgs, lambda c: "none (compiled)" if c.name.endswith("(compiled)") else None):
        print(line)


if __name__ == "__main__":
    main()
