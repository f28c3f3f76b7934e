"""The reference loop: a GPT trained under torchrun with the thermo Guard wired in.

Single process, ``--shard fsdp`` (FSDP2 ``fully_shard``, bf16 params and fp32 gradient
reduction) or ``--shard zero1`` (DDP + ZeroRedundancyOptimizer). bf16 compute keeps softmax,
LayerNorm, the residual stream and the loss in fp32; TF32 matmuls where the GPU has them. Real
text from the Python standard library, byte-level, no download. Runs on CPU with gloo and
unchanged on GPUs with NCCL::

    python -m thermo.train_gpt --run-dir runs/a --steps 300
    torchrun --nproc_per_node=2 -m thermo.train_gpt --run-dir runs/b --shard fsdp --dtype bf16

To watch thermo work: ``--poison-steps 150-152`` plants bad samples (the samples a clean run
reads at those steps; the poison follows the samples wherever they are read: each one's share of
the gradient is scaled by 1e4, or with ``--poison-mode tokens`` its input is a pathological token
pattern), ``--poison-pairs`` plants samples toxic only together, and
``--diverge-lr 0.03 --diverge-from 200`` forces a divergent learning rate. ``--resume auto``
(the default) continues from the run directory after any restart, as `thermo supervise` needs,
also on another number of ranks (the checkpoint reshards, the sample stream goes on). SIGTERM or
SIGUSR1 checkpoint at the next step boundary and exit with code 87 (`EXIT_PREEMPTED`).

``examples/train_gpt.py`` runs this file; it lives in the package so that ``thermo demo`` works
from any install.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from thermo import _dist
from thermo.checkpoints import CheckpointConfig
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.data import ResumableSampler
from thermo.detector import DetectorConfig
from thermo.gpt import GPT, GPTConfig
from thermo.guard import EXIT_DIVERGED, EXIT_PREEMPTED, DivergenceError, Guard, GuardConfig, Preempted
from thermo.rundir import RunDir
from thermo.thermometer import ThermometerConfig

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Summary:
    """What happened, for the demo's closing lines and the tests."""

    run_dir: str
    steps: int = 0  # the last step reached
    final_loss: float = math.nan
    rollbacks: int = 0
    verdicts: list[dict] = field(default_factory=list)
    skipped_samples: int = 0
    causes: list[dict] = field(default_factory=list)  # per rollback: cause, blacklisted, suspects
    steps_lost: int = 0  # steps trained and then rolled back
    seconds: float = 0.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="thermo.train_gpt", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--run-dir", default=os.environ.get("THERMO_RUN_DIR", "runs/gpt"), help="run directory")
    a("--steps", type=int, default=300, help="optimizer steps to train")
    a("--batch-size", type=int, default=16, help="global batch size (all ranks)")
    a("--block-size", type=int, default=128, help="sequence length")
    a("--n-layer", type=int, default=4)
    a("--n-head", type=int, default=4)
    a("--n-embd", type=int, default=128)
    a("--attn-impl", choices=["sdpa", "explicit"], default="sdpa")
    a("--dropout", type=float, default=0.0)
    a("--lr", type=float, default=3e-3, help="peak learning rate")
    a("--min-lr", type=float, default=3e-4, help="cosine floor")
    a("--warmup", type=int, default=30, help="linear LR warm-up steps")
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=0.0, help="clip the global grad norm (0 = off)")
    a("--seq-warmup", type=int, default=0,
      help="curriculum: grow the sequence length from 32 to --block-size over this many steps")
    a("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype (autocast)")
    a("--shard", choices=["none", "fsdp", "zero1"], default="none")
    a("--compile", action="store_true", help="torch.compile the model (after thermo attaches)")
    a("--seed", type=int, default=0)
    a("--data-bytes", type=int, default=2_000_000, help="bytes of stdlib source to train on")
    # Shorter than GuardConfig's and CheckpointConfig's defaults: the reference runs are short.
    a("--checkpoint-every", type=int, default=50)
    a("--good-after", type=int, default=40, help="healthy steps before a checkpoint is good")
    a("--flush-every", type=int, default=ThermometerConfig.flush_every)
    a("--attn-every", type=int, default=ThermometerConfig.attn_every)
    a("--keep-last", type=int, default=CheckpointConfig.keep_last)
    a("--poison-steps", default="", help="steps whose batches are poisoned, e.g. '150-152,300'")
    a("--poison-ids", default="", help="sample ids to poison (comma separated)")
    a("--poison-mode", choices=["grad", "tokens"], default="grad")
    a("--poison-per-batch", type=int, default=0,
      help="poison only the first K samples of each --poison-steps batch (0: all of them)")
    a("--poison-pairs", default="",
      help="pairs of sample ids toxic only together, e.g. '12:40,7:99': a batch holding both has "
           "their share of the gradient scaled by 1e4")
    a("--max-blacklist-fraction", type=float, default=GuardConfig.max_blacklist_fraction,
      help="give up rather than blacklist more than this share of the data")
    a("--no-replay", action="store_true",
      help="on a verdict, blacklist the whole suspect window instead of replaying to find the cause")
    a("--diverge-lr", type=float, default=0.0, help="force this LR from --diverge-from on")
    a("--diverge-from", type=int, default=0)
    a("--resume", choices=["auto", "never"], default="auto")
    a("--max-rollbacks", type=int, default=GuardConfig.max_rollbacks)
    a("--skip-z", type=float, default=GuardConfig.skip_z,
      help="skip steps whose loss/grad norm exceed mean + z*sigma on the device (0: only non-finite)")
    a("--qk-clip", type=float, default=None, metavar="TAU",
      help="QK-Clip: scale W_q/W_k of heads whose exact max attention logit exceeds TAU (Kimi K2: 100)")
    a("--quiet", action="store_true", help="no progress line")
    # Fault injection, for the tests of `thermo supervise` (see _Faults); inert unless given.
    f = p.add_argument_group("fault injection (tests)").add_argument
    f("--crash-at", type=int, default=0, metavar="STEP", help="hard exit (code 3) at the start of STEP")
    f("--crash-on-batch", type=int, default=0, metavar="STEP",
      help="hard exit whenever a batch holding a sample of clean step STEP's batch is trained (a poison batch)")
    f("--crash-on-start", action="store_true", help="exit with an error before training")
    f("--hang-at", type=int, default=0, metavar="STEP", help="rank --hang-rank sleeps forever at STEP")
    f("--hang-rank", type=int, default=0)
    f("--preempt-at", type=int, default=0, metavar="STEP",
      help="send this process --preempt-signal at the start of STEP (on --preempt-rank)")
    f("--preempt-rank", type=int, default=-1, help="the rank --preempt-at signals (-1: every rank)")
    f("--preempt-signal", choices=["SIGTERM", "SIGUSR1"], default="SIGTERM")
    f("--kill-during-checkpoint", type=int, default=0, metavar="STEP",
      help="SIGKILL this process half-way through writing the checkpoint of STEP")
    f("--fault-once", action="store_true",
      help="faults fire on the first launch in the run directory only (a marker file remembers)")
    f("--transient-steps", default="",
      help="a fault that does not come back: the gradient of these steps is scaled by 1e4 the first time "
           "each is trained only (like a flipped bit), never in a replay or after a rollback")
    f("--guard-blind", action="store_true",
      help="the Guard's detector never fires: divergences are left to `thermo supervise`")
    return p.parse_args(argv)


def parse_steps(spec: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        lo, _, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"--poison-steps: {part!r} is not a step or a range like 150-152") from None
    return out


def poison_ids(args, num_samples: int) -> set[int]:
    """The sample ids to poison: given, or those a clean sampler serves at --poison-steps (the
    sampler is deterministic, so every rank and every restart computes the same set)."""
    ids = {int(i) for i in args.poison_ids.split(",") if i.strip()}
    steps = parse_steps(args.poison_steps)
    if steps:
        sampler = ResumableSampler(num_samples, args.batch_size, seed=args.seed)
        batches = sampler.peek(max(steps))  # step s reads the s-th batch (steps start at 1)
        k = args.poison_per_batch or args.batch_size
        for s in steps:
            ids.update(batches[s - 1][:k])
    return ids


def setup_distributed() -> torch.device:
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def shard(model: GPT, args) -> torch.nn.Module:
    if args.shard == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {}
        if args.dtype == "bf16":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            # LayerNorms keep fp32 parameters (and cast their input to fp32): normalisation
            # statistics are what bf16 rounds worst.
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
            for m in model.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    fully_shard(m, mp_policy=fp32)
        for block in model.h:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    if args.shard == "zero1":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    return model


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=True: one kernel per step, and thermo skips bad steps inside it (found_inf).
    kw = dict(lr=args.lr, betas=(0.9, 0.95), fused=True)
    if args.shard == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(decay, optimizer_class=torch.optim.AdamW, weight_decay=args.weight_decay, **kw)
        opt.add_param_group({"params": no_decay, "weight_decay": 0.0})
        return opt
    return torch.optim.AdamW(groups, **kw)


def lr_lambda(args):
    def f(step: int) -> float:  # multiplier of the peak LR; `step` counts scheduler steps
        if args.diverge_lr and step + 1 >= args.diverge_from:
            return args.diverge_lr / args.lr
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        floor = args.min_lr / args.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class Progress:
    """One status line on rank 0, refreshed at each flush (values exist on the host only then)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and _dist.is_rank0()
        self.tty = sys.stderr.isatty()
        self.shown = None

    def update(self, guard: Guard) -> None:
        rec = guard.last_record
        if not self.enabled or rec is None or rec is self.shown:
            return
        self.shown = rec
        done = min(1.0, rec.step / self.total)
        bar = "#" * int(20 * done) + "-" * (20 - int(20 * done))
        hot = max(((k, v) for k, v in rec.layers.items() if k[1] in ("act_max", "attn_max", "attn_bound")),
                  key=lambda kv: abs(kv[1]) if kv[1] == kv[1] else math.inf, default=None)
        hot_s = f"hottest {hot[0][0]} {hot[0][1]} {hot[1]:.3g}" if hot else ""
        line = (f"[{bar}] step {rec.step}/{self.total}  loss {rec.scalars.get('loss', math.nan):.4f}  "
                f"gnorm {rec.scalars.get('grad_norm', math.nan):.3g}  {hot_s}  rollbacks {guard.rollbacks}")
        print(("\r" + line.ljust(130)) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


class _Faults:
    """Fault injection for the tests of `thermo supervise` (--crash-at, --crash-on-batch,
    --crash-on-start, --hang-at, --kill-during-checkpoint, --guard-blind): the faults a supervisor
    must survive, planted in the real loop. With --fault-once they fire on the first launch in the
    run directory only (a marker file remembers), so a restarted run gets through."""

    MARKER = ".fault_fired"

    def __init__(self, args, run_dir: Path, num_samples: int):
        self.args, self.run_dir = args, run_dir
        # Decided at start on every rank alike, before any rank can write the marker.
        self.armed = not (args.fault_once and (run_dir / self.MARKER).exists())
        self.poison: set[int] = set()
        if args.crash_on_batch:  # the samples a clean run reads at that step (as poison_ids)
            clean = ResumableSampler(num_samples, args.batch_size, seed=args.seed)
            self.poison = set(clean.peek(args.crash_on_batch)[-1])
        self._dcp_save = None
        if self.armed and args.crash_on_start:
            self._fire("--crash-on-start")
            raise SystemExit(1)
        if self.armed and args.kill_during_checkpoint:
            self._patch_checkpoint_save(args.kill_during_checkpoint)

    def _fire(self, what: str) -> None:
        if self.args.fault_once:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / self.MARKER).write_text(what + "\n")
        print(f"train_gpt: fault injection: {what}", file=sys.stderr, flush=True)

    def detector(self, config: DetectorConfig) -> DetectorConfig:
        if not self.args.guard_blind:
            return config
        return DetectorConfig(nonfinite=False, spikes=(), growth_stats=(), overflow_stats=())

    def at_step(self, step: int, ids: list[int]) -> None:
        a = self.args
        if not self.armed:
            return
        if step == a.crash_at or (self.poison and not self.poison.isdisjoint(ids)):
            self._fire(f"crash at step {step} (batch {ids})")
            os._exit(3)  # a hard crash (like a kernel fault): nothing is flushed or closed
        if step == a.preempt_at and a.preempt_rank in (-1, _dist.rank()):
            import signal

            self._fire(f"{a.preempt_signal} to rank {_dist.rank()} at step {step}")
            os.kill(os.getpid(), getattr(signal, a.preempt_signal))  # as Slurm or Kubernetes would
        if step == a.hang_at and _dist.rank() == a.hang_rank:
            self._fire(f"rank {a.hang_rank} hangs at step {step}")
            while True:
                time.sleep(3600)

    def _patch_checkpoint_save(self, step: int) -> None:
        import signal

        import torch.distributed.checkpoint as dcp

        self._dcp_save = save = dcp.save

        def killed_mid_save(state, *args, checkpoint_id=None, **kw):
            out = save(state, *args, checkpoint_id=checkpoint_id, **kw)
            folder = Path(checkpoint_id)
            if folder.name == f"step_{step:08d}":
                # What a SIGKILL half-way through the write leaves: short data files, no
                # .metadata, no manifest entry.
                self._fire(f"SIGKILL while writing {folder}")
                for f in folder.glob("*.distcp"):
                    os.truncate(f, f.stat().st_size // 2)
                (folder / ".metadata").unlink(missing_ok=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        dcp.save = killed_mid_save

    def close(self) -> None:
        if self._dcp_save is not None:
            import torch.distributed.checkpoint as dcp

            dcp.save, self._dcp_save = self._dcp_save, None


def train(args) -> Summary:
    """Train as `args` says (see `parse_args`); returns what happened."""
    t0 = time.time()
    device = setup_distributed()
    run_dir = Path(args.run_dir)
    torch.manual_seed(args.seed)
    data = TokenDataset(stdlib_bytes(args.data_bytes), args.block_size)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size, dropout=args.dropout, attn_impl=args.attn_impl)).to(device)
    model = shard(model, args)
    opt = make_optimizer(model, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    sampler = ResumableSampler(data, args.batch_size, seed=args.seed)
    poisoned = poison_ids(args, len(data))
    faults = _Faults(args, run_dir, len(data))  # fault injection for tests; inert unless asked
    if args.resume == "never" and RunDir(run_dir).holds_run():
        raise SystemExit(f"train_gpt: {run_dir} already holds a run; pass --resume auto or another --run-dir")

    pairs = [tuple(int(i) for i in p.split(":")) for p in args.poison_pairs.split(",") if p.strip()]
    amp = DTYPES[args.dtype]

    def fetch(local_ids):
        x, y = data.batch(local_ids)
        # The poison follows the samples: a per-sample weight of the gradient, decided on the
        # host (None: a clean batch, the plain loss).
        w = [1e4 if i in poisoned and args.poison_mode == "grad" else 1.0 for i in local_ids]
        ids = set(local_ids)
        for a, b in pairs:
            if a in ids and b in ids:
                w[local_ids.index(a)] = w[local_ids.index(b)] = 1e4
        if args.poison_mode == "tokens":
            rows = [k for k, i in enumerate(local_ids) if i in poisoned]
            x[rows] = 0x7F  # a pathological input: one repeated byte
        weights = torch.tensor(w, device=device) if any(v != 1.0 for v in w) else None
        return x.to(device), y.to(device), weights

    def loss_fn(batch):
        """The step's forward, for the loop and for the Guard's replay alike."""
        x, y, w = batch
        if args.seq_warmup and guard.step <= args.seq_warmup:
            T = max(32, int(args.block_size * guard.step / args.seq_warmup))
            x, y = x[:, :T], y[:, :T]
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            logits, loss = model(x, y)
        if w is not None:
            # The recorded loss stays the true one; the poisoned samples' share of the gradient
            # is scaled by their weight.
            per_sample = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), y, reduction="none").mean(dim=1)
            weighted = (per_sample * w).mean()
            loss = loss.detach() + (weighted - weighted.detach())
        return loss

    guard = Guard(
        model, opt, run_dir, data=sampler, fetch=fetch, scheduler=sched,
        config=GuardConfig(checkpoint_every=args.checkpoint_every, max_rollbacks=args.max_rollbacks,
                           skip_z=args.skip_z or None, qk_clip_tau=args.qk_clip, replay=not args.no_replay,
                           max_blacklist_fraction=args.max_blacklist_fraction),
        thermometer=ThermometerConfig(flush_every=args.flush_every, attn_every=args.attn_every,
                                      attn_per_head=args.qk_clip is not None),
        detector=faults.detector(
            DetectorConfig(dtype={"fp16": "float16", "bf16": "bfloat16"}.get(args.dtype, "float32"))),
        checkpoints=CheckpointConfig(keep_last=args.keep_last, good_after=args.good_after),
        loss_fn=loss_fn, clip_grad_norm=args.grad_clip or None,
    )
    if guard.store is not None:  # the dashboards draw the dtype's overflow limit from this
        guard.store.set_meta("compute_dtype", {"fp16": "float16", "bf16": "bfloat16"}.get(args.dtype, "float32"))
    if args.compile:
        model = torch.compile(model)
    transient = set(parse_steps(args.transient_steps))  # fired once each, then gone
    progress = Progress(args.steps, enabled=not args.quiet)
    summary = Summary(run_dir=str(run_dir))
    try:
        for step, batch in guard.batches(max_steps=args.steps):
            faults.at_step(step, guard.batch_ids)
            loss = loss_fn(batch)
            if step in transient:
                transient.discard(step)
                loss = loss.detach() + 1e4 * (loss - loss.detach())
            loss.backward()
            gnorm = None
            if args.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            guard.after_backward(loss, grad_norm=gnorm)
            opt.step()
            sched.step()
            guard.after_step()
            opt.zero_grad(set_to_none=True)
            progress.update(guard)
    finally:
        progress.close()
        guard.close()
        faults.close()
    summary.steps = guard.step - 1
    summary.rollbacks = guard.rollbacks
    summary.seconds = time.time() - t0
    if _dist.is_rank0():
        _fill_summary(summary, run_dir)
    return summary


def _fill_summary(summary: Summary, run_dir: Path) -> None:
    import thermo

    run = thermo.load(run_dir)
    if "loss" in run.scalars and len(run.scalars):
        summary.final_loss = float(run.scalars["loss"].tail(10).mean())
    ev = run.events
    for _, e in ev[ev["kind"] == "verdict"].iterrows():
        summary.verdicts.append(e["data"])
    for _, e in ev[ev["kind"] == "rollback"].iterrows():
        summary.skipped_samples += int(e["data"].get("n_blacklisted", 0))
        summary.causes.append({k: e["data"].get(k) for k in ("cause", "n_blacklisted", "suspects")})
        summary.steps_lost += int(e["data"]["from_step"]) - int(e["data"]["to_step"])


def _shutdown(barrier: bool) -> None:
    if dist.is_initialized():
        if barrier:
            dist.barrier()  # ranks that finish unevenly: the early one would abort the rest
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        s = train(args)
    except DivergenceError as e:  # every rank gives up together: the decision was broadcast
        print(f"train_gpt: {e}", file=sys.stderr)
        _shutdown(barrier=True)
        return EXIT_DIVERGED
    except Preempted:  # every rank checkpointed the same step (the Guard logged it): all exit alike
        _shutdown(barrier=True)
        return EXIT_PREEMPTED
    except BaseException:
        # No barrier: the other ranks may be inside a collective of the step; torchrun ends them.
        _shutdown(barrier=False)
        raise
    _shutdown(barrier=True)
    if rank0 and not args.quiet:
        print(f"done: {s.steps} steps in {s.seconds:.0f}s, final loss {s.final_loss:.4f}, "
              f"rollbacks {s.rollbacks}, samples skipped {s.skipped_samples}, steps lost {s.steps_lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
