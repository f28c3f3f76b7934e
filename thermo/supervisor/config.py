"""How the supervisor is configured (`SupervisorConfig`) and what it reports (`Launch`, `Outcome`,
`SupervisorError`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from thermo.detector import DetectorConfig, Verdict
from thermo.guard.config import GuardConfig


class SupervisorError(RuntimeError):
    """A bad command, run directory or state: nothing was started or written."""


@dataclass(frozen=True)
class SupervisorConfig:
    """How the supervisor watches, judges and restarts.

    Attributes:
        max_restarts: give up after this many restarts.
        max_stalled: give up after this many launches in a row that got no further than the
            furthest step reached before (a crash loop, a divergence that always comes back).
        hang_timeout: seconds without a heartbeat or a new record before a running command is
            declared hung. Must cover the longest step plus a checkpoint save.
        startup_timeout: seconds a launch may take to its first sign of life (imports, rendezvous,
            restoring a checkpoint); 0 = no limit.
        grace: seconds between SIGTERM and SIGKILL when stopping the command.
        poll: seconds between looks at the heartbeat, the store and the process.
        detect: run the detector over the store (False: exit codes and hangs only).
        detector: the detector's configuration (defaults if None). Independent of the Guard's (which
            the store records in ``meta['detector']``): the supervisor is a second pair of eyes.
        verdict_grace: seconds a Guard gets to act on a verdict itself (roll back in process)
            before the supervisor acts. A command that writes no heartbeat has no Guard and gets
            none.
        rollback_margin, skip_before, skip_after: as in `thermo.guard.GuardConfig`: restart from a
            checkpoint at least `rollback_margin` steps before the onset; blacklist the batches
            of steps ``[onset - skip_before, detection + skip_after]`` that were read. None: the
            run's Guard's (recorded in the store's ``meta['guard']``), else `GuardConfig`'s: a
            verdict costs the same, repaired in process or from outside.
        restart_delay: seconds to wait before a restart (lets ports and GPU memory free up).
        status_every: seconds between status lines when stderr is not a terminal (a terminal gets
            one line refreshed in place); 0 = no status line.
    """

    max_restarts: int = 10
    max_stalled: int = 3
    hang_timeout: float = 600.0
    startup_timeout: float = 1800.0
    grace: float = 30.0
    poll: float = 1.0
    detect: bool = True
    detector: DetectorConfig | None = None
    verdict_grace: float = 10.0
    rollback_margin: int | None = None
    skip_before: int | None = None
    skip_after: int | None = None
    restart_delay: float = 1.0
    status_every: float = 60.0

    def __post_init__(self):
        for name in ("max_restarts", "rollback_margin", "skip_before", "skip_after"):
            v = getattr(self, name)
            if (v is not None or name == "max_restarts") and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"SupervisorConfig.{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.max_stalled, int) or self.max_stalled < 1:
            raise ValueError(f"SupervisorConfig.max_stalled must be an int >= 1, got {self.max_stalled!r}")
        for name in ("hang_timeout", "poll"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SupervisorConfig.{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for name in ("startup_timeout", "grace", "verdict_grace", "restart_delay", "status_every"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SupervisorConfig.{name} must be >= 0 seconds, got {getattr(self, name)!r}")
        if self.detector is not None and not isinstance(self.detector, DetectorConfig):
            raise ValueError(f"SupervisorConfig.detector must be a DetectorConfig or None, got {self.detector!r}")

    def guard_settings(self, recorded: dict | None) -> dict[str, int]:
        """``rollback_margin``, ``skip_before`` and ``skip_after`` as the supervisor acts with them:
        its own where set, else what the run's Guard recorded (`recorded`, the store's
        ``meta['guard']``), else `GuardConfig`'s defaults."""
        out = {}
        for name in ("rollback_margin", "skip_before", "skip_after"):
            v = getattr(self, name)
            if v is None:
                r = (recorded if isinstance(recorded, dict) else {}).get(name)
                v = r if isinstance(r, int) and not isinstance(r, bool) and r >= 0 else getattr(GuardConfig, name)
            out[name] = v
        return out


@dataclass
class Launch:
    """One run of the command, as the supervisor saw it (times are Unix seconds)."""

    number: int
    start: float
    pid: int = 0
    first_sign: float | None = None  # first heartbeat or record of this launch
    step: int | None = None  # furthest step reached (heartbeat or record)
    current: int | None = None  # the step in progress at the end (heartbeat, else last record)
    ids: list[int] = field(default_factory=list)  # its sample ids (heartbeat)
    guard: bool = False  # wrote a heartbeat: a Guard loop, which can act on a verdict itself
    records: int = 0  # records this launch wrote that the detector read
    end: float | None = None
    ending: str = ""  # finished | divergence | crash | hang | stopped | relaunch | preempted
    exit_code: int | None = None
    fault_time: float | None = None  # when the fault happened, as closely as can be told
    verdict: Verdict | None = None
    why: str = ""  # the ending in words
    node: str = ""  # several nodes: the node whose agent failed (``<host>-<pid>`` of its supervisor)


@dataclass
class Outcome:
    """What `Supervisor.run` ended with; `exit_code` is what ``thermo supervise`` exits with."""

    status: str  # finished | gave_up | stopped
    exit_code: int
    message: str
    launches: list[Launch]
    blacklisted: list[int]
