"""`RunDir`: the run directory's layout, and the one place that names the files in it.

The run directory is the contract between the training loop, the supervisor, the dashboard, the
report and the CLI. Every module reaches a file in it through a `RunDir` (``RunDir(path).manifest``)
or opens what it holds through one (``RunDir(path).store()``); no other module spells a file name.

=================== ============================ ==========================================
file                written by                   read by
=================== ============================ ==========================================
``thermo.db``       rank 0 of the trainer;       everyone, read-only (WAL: readers never
                    events also by the           block the writer)
                    supervisor, ``thermo
                    blacklist``
``manifest.json``   rank 0 (saves, health);      the trainer when it resumes, the supervisor
                    the supervisor (marks bad)   (JSON, sizes and checksums; never a pickle)
``checkpoints/``    every rank (DCP shards)      the trainer when it resumes (DCP; its
                                                 ``.metadata`` is a pickle)
``blacklist.json``  rank 0, supervisor, CLI,     every rank's sampler, the supervisor, the CLI
                    under ``.blacklist.lock``
``config.json``     rank 0 at start              people
``heartbeat.json``  rank 0 every step boundary   the supervisor (hang detection)
``.writer.lock``    the one writer (flock)       a second writer, to refuse itself
``.supervise.lock`` the one supervisor (flock)   a second supervisor, to refuse itself
``.supervise/``     several nodes: the leading   every node's supervisor (``job.json``), the
                    supervisor (``job.json``),   leader (the nodes' files; a node's ``.lock``
                    each follower its own node   is flocked while it lives)
                    file (``<host>-<pid>.json``)
=================== ============================ ==========================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from thermo.checkpoints import CheckpointConfig, Checkpoints
    from thermo.data import Blacklist
    from thermo.plots.reader import RunReader
    from thermo.store import Run, Store


class RunDir(os.PathLike):
    """A run directory: where each of its files lives, and how each is opened.

    Cheap to build (no I/O) and usable wherever a path is (``os.fspath(RunDir(p)) == str(p)``).

    Args:
        path: the run directory (it may not exist yet).

    Example:
        >>> run = RunDir("runs/exp1")
        >>> with run.store(readonly=True) as store:
        ...     store.scalars()
    """

    DB = "thermo.db"
    MANIFEST = "manifest.json"
    CHECKPOINTS = "checkpoints"
    BLACKLIST = "blacklist.json"
    BLACKLIST_LOCK = ".blacklist.lock"
    CONFIG = "config.json"
    HEARTBEAT = "heartbeat.json"
    WRITER_LOCK = ".writer.lock"
    SUPERVISE_LOCK = ".supervise.lock"
    SUPERVISE_DIR = ".supervise"  # several nodes: the leader's job.json, each follower's node file
    # SQLite's companions of the store in WAL mode.
    DB_SIDECARS = ("thermo.db-wal", "thermo.db-shm", "thermo.db-journal")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path.path if isinstance(path, RunDir) else path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # -- where things are --------------------------------------------------------------------

    @property
    def db(self) -> Path:
        return self.path / self.DB

    @property
    def manifest(self) -> Path:
        return self.path / self.MANIFEST

    def checkpoints_dir(self, folder: str = CHECKPOINTS) -> Path:
        """The checkpoint folders' parent (``CheckpointConfig.folder``, relative to the run)."""
        return self.path / folder

    @property
    def blacklist(self) -> Path:
        return self.path / self.BLACKLIST

    @property
    def blacklist_lock(self) -> Path:
        return self.path / self.BLACKLIST_LOCK

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def heartbeat(self) -> Path:
        return self.path / self.HEARTBEAT

    @property
    def writer_lock(self) -> Path:
        return self.path / self.WRITER_LOCK

    @property
    def supervise_lock(self) -> Path:
        return self.path / self.SUPERVISE_LOCK

    @property
    def supervise_dir(self) -> Path:
        """Several nodes: how their supervisors agree (`thermo.supervisor.nodes`)."""
        return self.path / self.SUPERVISE_DIR

    @classmethod
    def file_names(cls) -> frozenset[str]:
        """The names of the files thermo keeps at the top of a run directory (what an output
        such as a report must never overwrite)."""
        return frozenset({cls.DB, *cls.DB_SIDECARS, cls.MANIFEST, cls.BLACKLIST, cls.BLACKLIST_LOCK,
                          cls.CONFIG, cls.HEARTBEAT, cls.WRITER_LOCK, cls.SUPERVISE_LOCK, cls.SUPERVISE_DIR})

    def holds_run(self) -> bool:
        """Whether anything of a run is here (a store, a manifest or checkpoint folders)."""
        return self.db.exists() or self.manifest.exists() or self.checkpoints_dir().is_dir()

    # -- what is in it -----------------------------------------------------------------------

    def store(self, readonly: bool = False, *, lock: bool = True) -> Store:
        """The metrics store (see `thermo.store.Store`)."""
        from thermo.store import Store

        return Store(self, readonly, lock=lock)

    def reader(self) -> RunReader:
        """An incremental, read-only reader of the store for display (dashboard, W&B figures)."""
        from thermo.plots.reader import RunReader

        return RunReader(self)

    def read(self) -> Run:
        """Every attempt's rows, read once (what the report draws)."""
        from thermo.plots.reader import read_run

        return read_run(self)

    def checkpoints(self, config: CheckpointConfig | None = None, backend=None) -> Checkpoints:
        """The checkpoints and their manifest (see `thermo.checkpoints.Checkpoints`)."""
        from thermo.checkpoints import Checkpoints

        return Checkpoints(self, config, backend=backend)

    def load_blacklist(self) -> Blacklist:
        """The blacklist (a missing file is an empty one)."""
        from thermo.data import Blacklist

        return Blacklist.load(self)
