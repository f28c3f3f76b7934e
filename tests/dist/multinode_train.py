"""The reference loop (`thermo.train_gpt`) as one node's worker of a two-node test, saying on every
rank where it started: one JSON line per rank and launch in ``$THERMO_TEST_LOG`` (node, rank,
world size, torchrun's restart count and round, the checkpoint it resumed from, the data position and the
blacklist its sampler holds), so a test can check that every node resumed alike.

``THERMO_TEST_CRASH=STEP:RANK``: that rank alone exits hard (code 3) at the start of STEP, on the
first time only (a marker file beside the log remembers): a crash of one node's rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from thermo import _dist
from thermo.guard import guard as guard_mod
from thermo.train_gpt import _Faults, main

_init = guard_mod.Guard.__init__
_at_step = _Faults.at_step


def _record(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    sampler = self.data.data
    bl = sampler.blacklist
    line = {"node": os.environ.get("THERMO_TEST_NODE", "?"), "rank": _dist.rank(), "world": _dist.world_size(),
            "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), "pid": os.getpid(),
            # The rendezvous round's store (a new one each round): the workers started together.
            "round": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
            "resumed_from": self.step - 1, "data": self.data.state_dict(),
            "blacklist": [i for i in range(sampler.num_samples) if i in bl]}
    with open(os.environ["THERMO_TEST_LOG"], "a") as f:
        f.write(json.dumps(line) + "\n")  # one short line per append: lines of two nodes never mix


def _crash(self, step: int, ids: list[int]) -> None:
    spec = os.environ.get("THERMO_TEST_CRASH")
    if spec:
        at, rank = (int(x) for x in spec.split(":"))
        marker = Path(os.environ["THERMO_TEST_LOG"] + ".crashed")
        if step == at and _dist.rank() == rank and not marker.exists():
            marker.write_text(f"rank {rank} crashed at step {step}\n")
            print(f"multinode_train: rank {rank} crashes at step {step}", file=sys.stderr, flush=True)
            os._exit(3)
    _at_step(self, step, ids)


guard_mod.Guard.__init__ = _record
_Faults.at_step = _crash

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
