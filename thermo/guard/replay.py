"""Cause attribution by replay: after a verdict, replay the steps since the restored checkpoint
and find what carries the anomaly (specific samples, the optimizer's numerics, or nothing that
reproduces), so that the remedy fits the cause.

The replay runs the Guard's own step (``loss_fn``, backward, rung-1 skip, record, optimizer and
scheduler step) on the batches the ledger says each step read, and judges every replayed step at
once with a copy of the detector. A replayed step is *anomalous* when the detector gives a verdict
on it, or when rung 1 skips it inside the suspect window. At an anomalous step, with the weights
the original run had before it:

1. every sample of the step's batch is evaluated alone (a micro-batch of one): a sample whose loss
   or gradient norm is non-finite, or lies ``replay_outlier_z`` robust σ above the batch median
   (log scale, and at least twice the median), is a suspect;
2. the step is redone without the suspects and judged again (the leave-out test); if it passes,
   the suspects are toxic, after dropping each one whose return does not bring the anomaly back;
3. otherwise (no suspect, or the step still fails without them), delta debugging (ddmin) looks for
   a smallest subset of the batch whose share of the step alone reproduces the anomaly (two
   samples toxic only together), then the leave-out test again.

Found toxic samples stay out of the rest of the replay. The cause:

- *data*: every anomaly was carried by samples, and the replay without them reaches the detection
  step cleanly: those samples, and only those, are blacklisted;
- *numerics*: a verdict that no sample carries (it happens without the suspects, e.g. a too-high
  learning rate), a growth verdict (sustained over many steps: no one step's samples carry it),
  three anomalies no sample carries, or more toxic samples than ``replay_max_toxic_share`` of the
  suspect steps' (an unstable model makes every batch look toxic): nothing is blacklisted;
- *transient*: the identical replay reaches the detection step without any verdict: nothing is
  blacklisted (the hosts are recorded);
- *unattributed*: the replay could not run within its budget; the Guard falls back to the window.

Every rank runs the replay together (the same forwards, the same collectives); decisions are taken
on rank 0 and broadcast.
"""

from __future__ import annotations

import math
import resource
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.tensor import DTensor

from thermo import _dist
from thermo.detector import Verdict
from thermo.guard.watch import Plan
from thermo.probes import grad_norm_and_nonfinite

if TYPE_CHECKING:
    from thermo.guard.guard import Guard


@dataclass
class Finding:
    """What a replay found.

    Attributes:
        cause: ``"data"``, ``"numerics"``, ``"transient"`` or ``"unattributed"``.
        toxic: the sample ids found toxic (blacklisted only when the cause is data).
        anomalies: one dict per anomalous replayed step: step, what (``"verdict"`` or
            ``"skip"``), signal, the ids found to carry it and how (``"outliers"``,
            ``"bisection"``) or None.
        steps_replayed: replayed steps (a step redone without some samples counts again).
        evals: per-sample and subset forward/backward passes.
        seconds: wall time of the replay.
        peak_memory_mb: peak accelerator memory during the replay (CUDA), else the process's
            peak resident memory so far.
        hosts: every rank's host name (for a transient: where it may have come from).
        summary: one line, in words.
    """

    cause: str
    toxic: list[int] = field(default_factory=list)
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    steps_replayed: int = 0
    evals: int = 0
    seconds: float = 0.0
    peak_memory_mb: float | None = None
    hosts: list[str] | None = None
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Anomalies of the replay that no sample carries before the cause is called the optimizer's.
_MAX_MISSES = 3


class _OverBudget(Exception):
    pass


class Replay:
    """One verdict's replay (see the module docstring). Built and run by `Guard._rollback` with
    the model restored to `plan.target`; leaves the model wherever the replay ended (the Guard
    restores the checkpoint again)."""

    def __init__(self, guard: Guard, plan: Plan, batches: dict[int, list[int]], last_step: int):
        self.g = guard
        self.cfg = guard.config
        self.plan = plan
        self.verdict: Verdict = plan.verdict
        self.batches = batches
        self.first = plan.target.step + 1
        self.last = last_step
        # Skips before onset - skip_before are rung 1's business (an isolated skip long before
        # the onset was harmless); those after it, up to the last step read, are attributed too:
        # toxic samples read after the detection step would be read again after the rollback.
        # Verdicts are attributed wherever the replay meets them.
        self.suspect_from = plan.first
        self.suspect_to = last_step
        self.suspect_samples = sum(len(b) for s, b in batches.items() if self.suspect_from <= s <= self.suspect_to)
        self.evals = 0
        self.steps = 0
        self.toxic: set[int] = set()
        self.anomalies: list[dict[str, Any]] = []
        self.global_batch = max((len(b) for b in batches.values()), default=1)
        self.chunk = max(1, self.global_batch // max(1, _dist.world_size()))

    # -- the replay ----------------------------------------------------------------------------

    def run(self) -> Finding:
        t0 = time.time()
        cuda = torch.cuda.is_available() and self.g.therm.buffer.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        missing = [s for s in range(self.first, self.last + 1) if s not in self.batches]
        if self.last - self.first + 1 > self.cfg.replay_max_steps or missing:
            why = (f"{self.last - self.first + 1} steps to replay, over replay_max_steps="
                   f"{self.cfg.replay_max_steps}" if not missing else
                   f"the ledger no longer holds the batches of {len(missing)} steps")
            return self._finish(Finding("unattributed", summary=f"not replayed: {why}"), t0, cuda)
        try:
            finding = self._replay()
        except _OverBudget:
            finding = Finding("unattributed", summary=f"replay stopped: over replay_max_evals="
                                                      f"{self.cfg.replay_max_evals} passes")
        except Exception as e:  # e.g. a loss_fn that cannot take one sample (BatchNorm in train mode)
            warnings.warn(f"thermo: the replay failed ({type(e).__name__}: {e}); blacklisting the suspect "
                          "window instead. Give the Guard a loss_fn that takes any number of samples, or "
                          "GuardConfig(replay=False)", RuntimeWarning, stacklevel=3)
            finding = Finding("unattributed", summary=f"replay failed: {type(e).__name__}: {e}")
        return self._finish(finding, t0, cuda)

    def _finish(self, f: Finding, t0: float, cuda: bool) -> Finding:
        f.anomalies = self.anomalies
        f.steps_replayed, f.evals, f.seconds = self.steps, self.evals, time.time() - t0
        if cuda:
            f.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            f.peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if f.cause == "transient":
            f.hosts = _all_hosts()
        return f

    def _replay(self) -> Finding:
        g, watch = self.g, self.g.watch
        reproduced = False
        too_many = False
        misses = 0
        unexplained: dict[str, Any] | None = None
        skip_state = g.skip.state_dict()
        try:
            with watch.replaying(self.first - 1):
                for step in range(self.first, self.last + 1):
                    ids = [i for i in self.batches[step] if i not in self.toxic]
                    outcome = self._step(step, ids, identical=len(ids) == len(self.batches[step]))
                    if self._anomalous(step, outcome):
                        reproduced = True
                        carried = self._attribute(step, ids, outcome)
                        if carried is None:
                            misses += 1
                            # A verdict no sample carries, or skips piling up that none does:
                            # the optimizer's (a data cause shows as a few anomalies, each
                            # carried by its samples).
                            if outcome["verdict"] is not None or misses >= _MAX_MISSES:
                                unexplained = self.anomalies[-1]
                                break
                        else:
                            self.toxic.update(carried)
                            if len(self.toxic) > self.cfg.replay_max_toxic_share * self.suspect_samples:
                                too_many = True
                                break
                            outcome = self._redo(step, [i for i in ids if i not in self.toxic])
                            if outcome["verdict"] is not None:  # cannot happen after a passed leave-out
                                unexplained = self.anomalies[-1]
                                break
                    self._update()
        finally:
            g.skip.load_state_dict(skip_state)
            g.optimizer.zero_grad(set_to_none=True)
        toxic = sorted(self.toxic)
        if too_many:
            return Finding("numerics", toxic, summary=(
                f"{len(toxic)} samples would carry the anomalies, over replay_max_toxic_share="
                f"{self.cfg.replay_max_toxic_share:g} of the {self.suspect_samples} samples of the suspect steps: "
                "the model is unstable, not the data"))
        if unexplained is not None:
            what = unexplained["signal"] + (f" of {unexplained['layer']}" if unexplained.get("layer") else "")
            many = f"{misses} anomalies up to replayed step {unexplained['step']} are" if misses > 1 else \
                f"the {what} anomaly at replayed step {unexplained['step']} is"
            return Finding("numerics", toxic, summary=f"{many} carried by no sample of the batch: not the data")
        if not reproduced:
            return Finding("transient", summary=(
                f"an identical replay of steps {self.first}..{self.last} showed no anomaly: not reproducible"))
        if not toxic:
            return Finding("transient", summary=(
                "the replay showed only anomalies that rung 1 skips and no sample carries: nothing to blacklist"))
        return Finding("data", toxic, summary=(
            f"{len(toxic)} samples carry the anomaly; the replay without them reaches step {self.last} cleanly"))

    # -- one step ----------------------------------------------------------------------------------

    def _step(self, step: int, ids: list[int], identical: bool) -> dict:
        """Forward, backward and judge `step` on `ids` as the loop would; the update is not
        applied yet (`_update`)."""
        g = self.g
        g.optimizer.zero_grad(set_to_none=True)
        g.step = step  # a loss_fn that depends on the step (a curriculum) reads guard.step
        # The thermometer at `step`: its sampled (exact-logit) steps as in training, and nothing
        # accumulated from the single-sample forwards of an attribution.
        g.therm.load_state_dict({"step": step, "attempt": g.therm.attempt})
        if not ids:  # every sample of the step taken out: nothing to train on, nothing to judge
            return {"loss": None, "grad_norm": None, "skipped": False, "verdict": None}
        if identical:  # exactly the training step: each rank its slice
            loss = g.loss_fn(g.data.fetch(g.data.local(ids)))
            loss.backward()
        else:  # samples taken out: every rank computes the whole rest (the mean gradient is the same)
            loss = self._accumulate(ids)
        gn = g.clip_and_norm()
        self.steps += 1
        _, scalars = g.decide(loss, gn)
        return g.watch.replay_record(step, loss, gn, **scalars)

    def _redo(self, step: int, ids: list[int]) -> dict:
        self.g.watch.replay_forget(step)
        return self._step(step, ids, identical=ids == self.batches[step])

    def _update(self) -> None:
        g = self.g
        g.optimizer.step()
        if g.scheduler is not None:
            g.scheduler.step()
        g.after_update()

    def _anomalous(self, step: int, outcome: dict) -> bool:
        if outcome["verdict"] is not None:
            return True
        return outcome["skipped"] and self.suspect_from <= step <= self.suspect_to

    # -- attribution -------------------------------------------------------------------------------

    def _attribute(self, step: int, ids: list[int], outcome: dict) -> list[int] | None:
        """The samples of `step`'s batch that carry its anomaly, or None. The model holds the
        weights before `step` (its update was not applied)."""
        v: Verdict | None = outcome["verdict"]
        record = {"step": step, "what": "verdict" if v is not None else "skip",
                  "signal": v.signal if v is not None else _skip_signal(outcome, self.g.skip.limits()),
                  "layer": v.layer if v is not None else None, "ids": None, "how": None}
        self.anomalies.append(record)
        if v is not None and v.kind == "growth":
            # Growth is sustained over `growth_recent` steps: no one step's samples carry it (one
            # sample can tip the last step over the line, which proves nothing about the data).
            self._redo(step, ids)
            return None
        limits = self._limits(outcome)
        stats = [self._eval([i]) for i in ids]  # (loss, grad norm) of each sample alone
        suspects = self._suspects(ids, stats, limits)
        found, how = None, None
        if suspects:
            found, how = self._leave_out(step, ids, suspects), "samples"
        if found is None and limits is not None and len(ids) > 1:
            part = self._ddmin(ids, lambda sub: self._share_anomalous(sub, len(ids), limits))
            if part is not None and len(part) < len(ids) and self._passes_without(step, ids, part):
                found, how = part, "bisection"
        if found is None:  # back to the step as it was, so the replay goes on from the same state
            self._redo(step, ids)
            return None
        record["ids"], record["how"] = sorted(found), how
        return sorted(found)

    def _suspects(self, ids: list[int], stats: list[tuple[float, float]],
                  limits: dict[str, float] | None) -> list[int]:
        """Rank 0 picks the samples that look toxic alone, most extreme first: a non-finite loss or
        grad norm; a loss above the anomaly's limit, or a share of the step's gradient (its own
        norm / batch size) above it; or a log loss or grad norm `replay_outlier_z` robust σ above
        the batch's median (and at least twice it)."""
        picked = None
        if _dist.is_rank0():
            z0, n = self.cfg.replay_outlier_z, len(ids)
            limits = limits or {}
            score: dict[int, float] = {}

            def hit(i: int, s: float) -> None:
                score[i] = max(score.get(i, -math.inf), s)

            for col, name, share in ((0, "loss", 1.0), (1, "grad_norm", 1.0 / n)):
                vals = [st[col] for st in stats]
                logs = [math.log(x) for x in vals if math.isfinite(x) and x > 0]
                med, sigma = _median_sigma(logs) if len(logs) >= 3 else (0.0, math.inf)
                limit = limits.get(name)
                for i, x in zip(ids, vals):
                    if not math.isfinite(x):
                        hit(i, math.inf)
                        continue
                    if x <= 0:
                        continue
                    if limit is not None and x * share > limit:
                        hit(i, z0 + math.log(x * share / limit))
                    z = (math.log(x) - med) / sigma
                    if z >= z0 and math.log(x) - med >= math.log(2.0):
                        hit(i, z)
            picked = [i for i, _ in sorted(score.items(), key=lambda kv: -kv[1])]
        return _dist.from_rank0(picked)

    def _leave_out(self, step: int, ids: list[int], suspects: list[int]) -> list[int] | None:
        """The suspects, if the step passes without them, less each one whose return does not
        make it fail again (so no innocent outlier is kept); else None."""
        if not self._passes_without(step, ids, suspects):
            return None
        kept = list(suspects)
        if len(kept) > 1 and len(kept) <= 16:
            for i in reversed(suspects):  # least extreme first
                trial = [k for k in kept if k != i]
                if trial and self._passes_without(step, ids, trial):
                    kept = trial
        return kept

    def _passes_without(self, step: int, ids: list[int], out: list[int]) -> bool:
        """Redo `step` without `out` and judge it as training would (verdict, or a skip inside
        the suspect window)."""
        self._spend(1)
        outcome = self._redo(step, [i for i in ids if i not in set(out)])
        return not self._anomalous(step, outcome)

    def _share_anomalous(self, sub: list[int], batch: int, limits: dict[str, float]) -> bool:
        """Does `sub`'s share of the step alone show the anomaly? Its share of the mean loss and
        of the gradient is ``len(sub) / batch`` of its own mean's."""
        loss, gn = self._eval(sub)
        share = len(sub) / batch
        verdict = None
        if _dist.is_rank0():
            verdict = (not math.isfinite(loss) or not math.isfinite(gn)
                       or loss * share > limits.get("loss", math.inf)
                       or gn * share > limits.get("grad_norm", math.inf))
        return _dist.from_rank0(verdict)

    def _ddmin(self, items: list[int], fails) -> list[int] | None:
        """Zeller's delta debugging: a 1-minimal subset of `items` for which `fails` holds (None
        if the whole does not)."""
        if not fails(items):
            return None
        n = 2
        while len(items) >= 2:
            size = math.ceil(len(items) / n)
            parts = [items[k:k + size] for k in range(0, len(items), size)]
            for part in parts:
                if fails(part):
                    items, n = part, 2
                    break
            else:
                for k in range(len(parts)):
                    rest = [i for j, p in enumerate(parts) if j != k for i in p]
                    if len(parts) > 2 and fails(rest):
                        items, n = rest, max(n - 1, 2)
                        break
                else:
                    if n >= len(items):
                        break
                    n = min(len(items), 2 * n)
        return items

    def _limits(self, outcome: dict) -> dict[str, float] | None:
        """The values above which a loss or grad norm is the anomaly, for the share test: the
        spike verdict's threshold, or rung 1's; None for a per-layer signal (no share test)."""
        v: Verdict | None = outcome["verdict"]
        limits = None
        if _dist.is_rank0():
            if v is None:
                limits = self.g.skip.limits()
            elif v.kind == "spike" and "threshold" in v.evidence:
                limits = {v.signal: v.evidence["threshold"]}
            elif v.kind == "nonfinite" and v.signal in ("loss", "grad_norm", "grad_nonfinite"):
                limits = {}
        return _dist.from_rank0(limits)

    # -- forward/backward on chosen samples ---------------------------------------------------------

    def _eval(self, ids: list[int]) -> tuple[float, float]:
        """(mean loss, grad norm of the mean loss) of `ids`, every rank computing the same
        samples; gradients are cleared before and left in place after."""
        self._spend(math.ceil(len(ids) / self.chunk))
        self.g.optimizer.zero_grad(set_to_none=True)
        loss = self._accumulate(ids)
        gn, _ = grad_norm_and_nonfinite(self.g.params)
        # note: host syncs, off the hot path (the replay)
        return float(loss.detach().float()), float(gn) if gn is not None else 0.0

    def _accumulate(self, ids: list[int]) -> torch.Tensor:
        """Backward of the mean loss over `ids`, in chunks of at most one rank's batch; returns
        the mean loss."""
        g, total = self.g, None
        for k in range(0, len(ids), self.chunk):
            part = ids[k:k + self.chunk]
            loss = g.loss_fn(g.data.fetch(part))
            (loss * (len(part) / len(ids))).backward()
            term = loss.detach().float() * (len(part) / len(ids))
            total = term if total is None else total + term
        if isinstance(total, DTensor):
            total = total.full_tensor()
        return total

    def _spend(self, passes: int) -> None:
        self.evals += passes
        if self.evals > self.cfg.replay_max_evals:
            raise _OverBudget


def _skip_signal(outcome: dict, limits: dict[str, float]) -> str:
    for name in ("loss", "grad_norm"):
        v = outcome.get(name)
        if v is not None and (not math.isfinite(v) or v > limits.get(name, math.inf)):
            return name
    return "loss"


def _median_sigma(vals: list[float]) -> tuple[float, float]:
    s = sorted(vals)
    med = s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])
    dev = sorted(abs(x - med) for x in s)
    mad = dev[len(dev) // 2] if len(dev) % 2 else 0.5 * (dev[len(dev) // 2 - 1] + dev[len(dev) // 2])
    return med, max(1.4826 * mad, 0.05)  # σ floor: log values 5% apart are not outliers


def _all_hosts() -> list[str]:
    return _dist.gather(socket.gethostname())
