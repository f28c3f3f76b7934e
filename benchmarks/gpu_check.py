"""The two checks a CPU cannot make: thermo's hot path never syncs a CUDA device, and its overhead there.

    python benchmarks/gpu_check.py                        # one GPU; not yet run on one (sized for minutes)
    python benchmarks/gpu_check.py --device cpu --tiny    # runs the script through on a CPU

1. Sync-free. A GPT (sdpa and explicit attention) trains under bf16 autocast with thermo's
   `Thermometer` at its defaults, with every probe on (exact logits every step, per head, the
   gradient amax of every module, non-finite counts), and inside the `Guard` (on-device skip,
   checkpoints, detection). `torch.cuda.set_sync_debug_mode("error")` is armed for the whole step
   (forward, backward, thermo's calls, the optimizer) of every step that is not a flush step or a
   checkpoint step, which are the only places thermo reads back; a synchronising CUDA call there
   raises, and the row shows where. The batch is moved to the GPU before arming (a pageable
   host-to-device copy is a sync of the loop's own).
2. Overhead. No monitoring, thermo's defaults, and the hand-written hooks that `.item()` every
   statistic (`benchmarks/overhead.py`'s `HandHooks`), one model copy each, interleaved step by
   step on the same batches; each step is timed between two `torch.cuda.synchronize()` calls
   (outside the step). Paired median ratio to no monitoring, and the mean ratio (which includes
   thermo's flush every 10th step). On a GPU `.item()` is a host sync per statistic: the hand
   hooks pay for it, thermo should not.

Exits 1 if any sync check fails.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import thermo  # noqa: E402
from benchmarks.overhead import (  # noqa: E402
    Config,
    hand_hooks,
    interleave,
    no_monitoring,
    ratio_table,
    thermo_with,
)
from thermo.checkpoints import CheckpointConfig  # noqa: E402
from thermo.corpus import TokenDataset, stdlib_bytes  # noqa: E402
from thermo.data import ResumableSampler  # noqa: E402
from thermo.gpt import GPT, GPTConfig  # noqa: E402
from thermo.guard import Guard, GuardConfig  # noqa: E402

ALL_PROBES = dict(attn_every=1, attn_per_head=True, grad="all", count_nonfinite=True)


class Armed:
    """`torch.cuda.set_sync_debug_mode("error")` for the block, when `on` (a no-op on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, on: bool):
        self.on = on and self.cuda
        return self

    def __enter__(self):
        if self.on:
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        if self.on:
            torch.cuda.set_sync_debug_mode("default")


def where(exc: BaseException) -> str:
    """The innermost thermo frame (or the innermost frame) of a sync error, in one line."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/thermo/" in f.filename] or frames
    f = ours[-1]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0]} at {Path(f.filename).name}:{f.lineno} ({f.line})"


def model_config(args, attn_impl: str) -> GPTConfig:
    if args.tiny:
        return GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, attn_impl=attn_impl)
    return GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, attn_impl=attn_impl)


def sync_check_thermometer(args, device, data, attn_impl: str, probes: dict) -> str:
    torch.manual_seed(0)
    model = GPT(model_config(args, attn_impl)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    armed = Armed(device)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, thermo.Thermometer(model, run_dir=tmp, **probes) as therm:
        flushed = 0
        for _ in range(args.sync_steps):
            x, y = (t.to(device) for t in data.batch(torch.randint(0, len(data), (args.batch,), generator=g).tolist()))
            with armed(not therm.flush_due):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    _, loss = model(x, y)
                loss.backward()
                flushed += len(therm.step(loss))
                opt.step()
                opt.zero_grad(set_to_none=True)
        flushed += len(therm.flush())
    if flushed != args.sync_steps:
        raise AssertionError(f"{flushed} records came back for {args.sync_steps} steps")
    return f"ok ({args.sync_steps} steps, {flushed} records)"


def sync_check_guard(args, device, data, attn_impl: str) -> str:
    torch.manual_seed(0)
    model = GPT(model_config(args, attn_impl)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    armed = Armed(device)
    every = 10

    def fetch(ids):
        return tuple(t.to(device) for t in data.batch(ids))

    with tempfile.TemporaryDirectory() as tmp:
        guard = Guard(model, opt, tmp, data=ResumableSampler(data, args.batch, seed=0), fetch=fetch,
                      config=GuardConfig(checkpoint_every=every), checkpoints=CheckpointConfig(good_after=every))
        try:
            for step, (x, y) in guard.batches(max_steps=args.sync_steps):
                with armed(not guard.therm.flush_due and step % every != 0):
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        _, loss = model(x, y)
                    loss.backward()
                    guard.after_backward(loss)
                    opt.step()
                    guard.after_step()
                    opt.zero_grad(set_to_none=True)
        finally:
            guard.close()
        rollbacks = guard.rollbacks
    return f"ok ({args.sync_steps} steps, {rollbacks} rollbacks)"


def overhead(args, device, data, tmp: str) -> list[str]:
    def model():  # the same weights in every copy
        torch.manual_seed(0)
        return GPT(model_config(args, "sdpa"))

    def cfg(name, attach):
        return Config(name, attach, model_fn=model, device=device, amp=torch.bfloat16)

    cfgs = [cfg("none", no_monitoring), cfg("none, again (noise floor)", no_monitoring),
            cfg("thermo", thermo_with(tmp)), cfg("hand-.item()", hand_hooks)]
    g = torch.Generator().manual_seed(1)

    def batch():
        return tuple(t.to(device) for t in data.batch(torch.randint(0, len(data), (args.batch,), generator=g).tolist()))

    interleave(cfgs, batch, args.warmup, args.steps)
    return ratio_table(cfgs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer d=64 model (smoke run)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sync-steps", type=int, default=30, help="steps of each sync check")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per overhead configuration")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per overhead configuration first")
    ap.add_argument("--skip-overhead", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device; pass --device cpu for a smoke run")
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU (the sync checks only run through: set_sync_debug_mode is CUDA's)"
    cfg = model_config(args, "sdpa")
    data = TokenDataset(stdlib_bytes(2_000_000), cfg.block_size)
    print(f"thermo GPU check — {datetime.date.today()} — {name}; torch {torch.__version__}; "
          f"GPT {cfg.n_layer} layers, d={cfg.n_embd}, seq {cfg.block_size}, batch {args.batch}, bf16 autocast")
    failed = 0
    print("\nsync-free (set_sync_debug_mode('error') on every non-flush, non-checkpoint step):")
    checks = [(f"Thermometer defaults, {a}", lambda a=a: sync_check_thermometer(args, device, data, a, {}))
              for a in ("sdpa", "explicit")]
    checks += [(f"Thermometer all probes, {a}", lambda a=a: sync_check_thermometer(args, device, data, a, ALL_PROBES))
               for a in ("sdpa", "explicit")]
    checks += [("Guard, sdpa", lambda: sync_check_guard(args, device, data, "sdpa"))]
    for label, check in checks:
        try:
            result = check()
        except Exception as exc:  # report every check, then exit 1
            failed += 1
            result = "FAIL " + where(exc)
        print(f"  {label:<34} {result}", flush=True)
    if not args.skip_overhead:
        print(f"\noverhead ({args.steps} steps each, interleaved; ratio: paired median over steps):")
        with tempfile.TemporaryDirectory() as tmp:
            for line in overhead(args, device, data, tmp):
                print("  " + line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
