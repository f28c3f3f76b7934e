"""What the model reads: the blacklist, a resumable sampler that skips it, and the batch ledger.

Everything here speaks in **sample ids** (an index into the dataset), never in iteration numbers:
iteration numbers shift as soon as anything is skipped, while a sample id names the same tokens
whatever the batch size, the number of ranks or the order of reading (see `thermo.corpus`).

============== ===================================================================================
piece          role
============== ===================================================================================
`Blacklist`    ``RUN/blacklist.json``: sample id -> why it is skipped (reason, verdict, time, who).
               Edited by the trainer, the supervisor and ``thermo blacklist`` at once, merged
               under a file lock so nobody loses an entry.
`ResumableSampler` global batches from a seeded per-epoch permutation, blacklisted ids left out;
               its state is a raw cursor, so a restored run reads exactly what a run that had the
               new blacklist from the start would have read.
`BatchLedger`  step -> the global batch's sample ids, to blacklist the batches around a divergence.
`StatefulLoader` the same skipping for any loader with ``state_dict``/``load_state_dict``
               (torchdata's StatefulDataLoader protocol), at whole-batch granularity.
============== ===================================================================================
"""

from __future__ import annotations

from thermo.data.blacklist import (
    BLACKLIST_FORMAT,
    BLACKLIST_VERSION,
    SOURCES,
    Blacklist,
    BlacklistEntry,
)
from thermo.data.ledger import BatchLedger
from thermo.data.loader import StatefulLoader, StatefulLoaderProtocol
from thermo.data.sampler import SAMPLER_STATE_VERSION, ResumableSampler

__all__ = [
    "BLACKLIST_FORMAT",
    "BLACKLIST_VERSION",
    "SAMPLER_STATE_VERSION",
    "SOURCES",
    "BatchLedger",
    "Blacklist",
    "BlacklistEntry",
    "ResumableSampler",
    "StatefulLoader",
    "StatefulLoaderProtocol",
]
