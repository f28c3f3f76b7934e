"""`thermo supervise`: the rollback-and-skip daemon around a training command.

The Guard repairs a run from inside the process; the supervisor covers what the process cannot
survive: a crash (a kernel fault, an OOM, a lost node), a hang (a rank stuck in a collective), or
a loop without a Guard at all. It starts the command in a process group of its own with
``THERMO_RUN_DIR`` set, streams its output, and watches three things:

============== ====================================================================================
signal         source
============== ====================================================================================
exit code      0: done. `EXIT_DIVERGED` (or a ``give_up`` event: torchrun turns every failure into
               exit 1): the Guard gave up. Anything else: a crash.
heartbeat      ``RUN/heartbeat.json`` (the Guard writes it at every step, with a counter), or new
               rows in the store: no change seen for ``hang_timeout`` seconds, by this process's
               clock, is a hang (the heartbeat's own timestamp, maybe another host's clock, is
               never compared with it).
metrics store  the same `Detector` the Guard runs, fed with the store's records as they arrive
               (replayed per attempt, like `detect_run`), so a loop that only logs through a
               Thermometer is protected too.
============== ====================================================================================

Decisions, each recorded as an event in the store (``verdict``, ``blacklist``, ``restart``,
``give_up``, plus ``supervise`` when it starts and ends and ``stop`` on SIGINT/SIGTERM):

* divergence: give a Guard ``verdict_grace`` seconds to roll back in process; if it does not (or it
  gave up), terminate the process tree (SIGTERM, SIGKILL after ``grace``), mark the checkpoints
  after the rollback target bad, blacklist the sample ids of steps ``[onset - skip_before,
  detection + skip_after]`` (the store's ledger, plus the heartbeat's step in progress) and restart:
  the command resumes from the newest good checkpoint. A divergence seen only in the last look at
  the store after the command exited 0 (a run faster than the polls, or a verdict the Guard
  recorded at close) gets the same repair: the command finished, but not healthy.
* crash: restart (the Guard resumes from the newest intact checkpoint). A second crash in a row at
  the same step blacklists that step's batch as poison.
* hang: terminate and restart.
* give up (exit 1) after ``max_restarts`` restarts, or after ``max_stalled`` launches in a row that
  got no further than the furthest step reached before.

One writer: the supervisor takes the run directory's writer lock (``RUN/.writer.lock``) and its
command inherits it (with ``THERMO_WRITER_TOKEN``), so the two count as one writer and a command
orphaned by a killed supervisor keeps a new one out. Stopping the command stops every process
that carries this supervisor's id (``THERMO_SUPERVISOR_ID``) in its environment, double-forked
daemons included.

Several nodes: when the command is torchrun with ``--nnodes`` above 1, run one supervisor per node,
each around its node's agent, over one shared run directory (`thermo.supervisor.nodes`). The one
holding the writer lock leads: it decides, repairs while every node's agent is stopped, and starts
each launch on every node; the others follow it and exit with its exit code (when the leader is
lost, the first follower to take the writer lock leads from the next launch). torchrun keeps doing
what it does (restart every node's workers after a rank's crash, re-form the group when nodes come
and go).

Example::

    $ thermo supervise runs/a --hang-timeout 600 -- torchrun --nproc_per_node=8 -m thermo.train_gpt
    $ srun thermo supervise runs/a -- torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d \
          --rdzv-endpoint=$HEAD:29500 --rdzv-id=$SLURM_JOB_ID -m thermo.train_gpt   # every node
"""

from __future__ import annotations

# `_lock`, `_start_time` (`_x as _x`): private, re-exported because the tests import them from here.
from thermo.supervisor.checks import check_command, check_run_dir
from thermo.supervisor.checks import _lock as _lock
from thermo.supervisor.config import Launch, Outcome, SupervisorConfig, SupervisorError
from thermo.supervisor.process import _start_time as _start_time
from thermo.supervisor.supervisor import Supervisor, supervise

__all__ = [
    "Launch",
    "Outcome",
    "Supervisor",
    "SupervisorConfig",
    "SupervisorError",
    "check_command",
    "check_run_dir",
    "supervise",
]
