"""DeepSpeed ZeRO on 2 ranks (gloo, CPU), launched by tests/test_integration_deepspeed.py.

Two runs in one launch (DeepSpeed's import and engine set-up are the slow part):

1. guarded: a GPT whose batches at --poison-steps have their loss scaled by 1e4 (a gradient
   spike). DeepSpeedGuard detects it, rolls back through the engine's checkpoint, blacklists and
   skips the samples, and finishes.
2. clean: the same training with the guarded run's blacklist from the start.

Rank 0 writes what happened to --out; every rank reports its own view (steps, rollbacks, a
checksum of its weights) so the test can check that the ranks acted together.

With --snippets, the same launch also runs the FSDP2, ZeRO-1 and DeepSpeed snippets of
the README's "Use with your loop" section on both ranks (`snippets` extracts them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from thermo.checkpoints import CheckpointConfig  # noqa: E402
from thermo.corpus import TokenDataset, stdlib_bytes  # noqa: E402
from thermo.data import Blacklist, ResumableSampler  # noqa: E402
from thermo.gpt import GPT, GPTConfig  # noqa: E402
from thermo.guard import GuardConfig  # noqa: E402
from thermo.thermometer import ThermometerConfig  # noqa: E402


def snippets(markdown: str | Path) -> dict[str, str]:
    """The first ```python block after each ``###`` heading of a markdown file, by heading."""
    out: dict[str, str] = {}
    heading = None
    for m in re.finditer(r"^### ([^\n]+)$|^```python\n(.*?)^```", Path(markdown).read_text(), re.M | re.S):
        if m.group(1) is not None:
            heading = m.group(1).strip()
        elif heading is not None and heading not in out:
            out[heading] = m.group(2)
    return out


def snippet(markdown, prefix: str) -> str:
    found = [code for name, code in snippets(markdown).items() if name.startswith(prefix)]
    if len(found) != 1:
        raise KeyError(f"{markdown}: {len(found)} sections start with {prefix!r}")
    return found[0]


def run_snippets(markdown: str, root: str) -> dict:
    """Execute the distributed snippets of the docs as a user would, each on a fresh model."""
    done = {}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for prefix in ("FSDP2", "ZeRO-1", "DeepSpeed"):
            torch.manual_seed(0)
            model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32))
            ns = {"torch": torch, "model": model, "dataset": TokenDataset(stdlib_bytes(100_000), 32),
                  "max_steps": 12, "optimizer": torch.optim.AdamW(model.parameters(), lr=3e-3),
                  "ds_config": {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8,
                                "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}}
            exec(compile(snippet(markdown, prefix), f"{markdown}:{prefix}", "exec"), ns)
            done[prefix] = ns["guard"].step - 1
    finally:
        os.chdir(cwd)
    return done


def quiet_deepspeed():
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (~80-160 s) when
    its communication backend starts. gloo does the job here: mark the op unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def run(args, run_dir: str, poisoned: set[int]) -> dict:
    import deepspeed

    from thermo.integrations.deepspeed import DeepSpeedGuard

    world = dist.get_world_size()
    torch.manual_seed(0)
    data = TokenDataset(stdlib_bytes(300_000), 32)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    ds_config = {
        "train_batch_size": args.batch_size,
        "train_micro_batch_size_per_gpu": args.batch_size // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    sampler = ResumableSampler(data, args.batch_size, seed=0)
    guard = DeepSpeedGuard(
        engine, run_dir, data=sampler, fetch=lambda ids: data.batch(ids),
        config=GuardConfig(checkpoint_every=20, max_rollbacks=3),
        thermometer=ThermometerConfig(flush_every=10, attn_every=5),
        checkpoints=CheckpointConfig(keep_last=3, good_after=20),
    )
    steps_seen = []
    with guard:
        for step, (x, y) in guard.batches(max_steps=args.steps):
            steps_seen.append(step)
            _, loss = engine(x, y)
            bad = not poisoned.isdisjoint(guard.batch_ids)
            engine.backward(loss * 1e4 if bad else loss)  # the recorded loss stays the true one
            engine.step()
            guard.after_step(loss)
    checksum = float(sum(p.detach().double().sum() for p in engine.module.parameters()))
    views: list = [None] * world
    dist.all_gather_object(views, {"rank": dist.get_rank(), "steps": steps_seen,
                                   "rollbacks": guard.rollbacks, "checksum": checksum})
    return {"views": views, "rollbacks": guard.rollbacks}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--poison-steps", default="60-62")
    ap.add_argument("--snippets", default=None, help="also run the distributed snippets of this markdown file")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    quiet_deepspeed()
    t0 = time.time()
    lo, hi = map(int, args.poison_steps.split("-"))
    n = len(TokenDataset(stdlib_bytes(300_000), 32))
    batches = ResumableSampler(n, args.batch_size, seed=0).peek(hi)
    poisoned = {i for s in range(lo, hi + 1) for i in batches[s - 1]}

    guarded_dir = os.path.join(args.root, "guarded")
    guarded = run(args, guarded_dir, poisoned)
    clean_dir = os.path.join(args.root, "clean")
    if dist.get_rank() == 0:
        os.makedirs(clean_dir, exist_ok=True)
        Blacklist(clean_dir).add(Blacklist.load(guarded_dir).ids, reason="what the guarded run skipped")
    dist.barrier()
    clean = run(args, clean_dir, poisoned)
    ran = run_snippets(args.snippets, args.root) if args.snippets else {}
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"guarded": guarded, "clean": clean, "poisoned": sorted(poisoned), "snippets": ran,
                       "seconds": time.time() - t0}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
