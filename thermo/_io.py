"""Atomic file writes and strict JSON reads for the run directory's control files, and the
run directory's writer lock."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from thermo.rundir import RunDir


class RunDirError(RuntimeError):
    """A file in the run directory is missing, torn, foreign or of an incompatible version."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one.

    Temp file in the same folder, fsync, rename over the target, fsync the folder (so the rename
    itself survives a power cut on filesystems that need it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; teammates reading the run directory need what the umask
        # allows (or the mode the file had, if someone changed it).
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask, read without changing it (no race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the classic read, briefly racy
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON (see `atomic_write_bytes`)."""
    data = json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n"
    atomic_write_bytes(path, data.encode())


def read_json(path: str | os.PathLike, what: str, fix: str) -> Any:
    """Read a JSON control file, turning every way it can be broken into one clear `RunDirError`.

    Args:
        path: the file.
        what: what the file is, for the message ("checkpoint manifest").
        fix: what the user can do about it, appended to the message.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunDirError(f"{what} {path} does not exist. {fix}") from None
    except OSError as e:
        raise RunDirError(f"cannot read {what} {path}: {e.strerror}. {fix}") from None
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RunDirError(f"{what} {path} is not valid JSON ({e}). {fix}") from None
    except RecursionError:
        raise RunDirError(f"{what} {path} is nested too deeply to be a thermo file. {fix}") from None


# -- one writer per run directory ----------------------------------------------------------------

WRITER_TOKEN_ENV = "THERMO_WRITER_TOKEN"
_held: dict[str, tuple[int, int, str]] = {}  # run directory -> (lock fd, users in this process, token)


class WriterLock:
    """The one writer of a run directory: an ``fcntl.flock`` on ``RUN/.writer.lock``.

    A trainer's rank 0 takes it when it opens the store for writing; ``thermo supervise`` takes it
    before the first launch and hands it to its command (the command inherits the locked file,
    and ``THERMO_WRITER_TOKEN`` names the lock), so a trainer and its supervisor count as one
    writer, and a trainer orphaned by a killed supervisor still holds it. The kernel releases it
    when the last process holding it ends, however it ends: a dead writer never leaves a stale
    lock. The file records who took it (pid, host, when) for the error message only. Across
    hosts it relies on the filesystem's flock (NFSv4, Lustre mounted with ``-o flock``).

    Several `Store` writers in one process share it (the same writer).
    """

    def __init__(self, run_dir: str | os.PathLike, role: str):
        self.run_dir = Path(run_dir)
        self.key = os.path.realpath(self.run_dir)
        self.role = role
        self.fd: int | None = None
        self.token: str | None = None

    def acquire(self) -> WriterLock:
        """Take the lock (or share it: this process, or a supervisor whose token we were given).

        Raises:
            RunDirError: another process writes to the run directory; the message says which.
        """
        if self.key in _held:
            fd, n, token = _held[self.key]
            _held[self.key] = (fd, n + 1, token)
            self.fd, self.token = fd, token
            return self
        path = RunDir(self.run_dir).writer_lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _lock_info(fd)
            os.close(fd)
            given = os.environ.get(WRITER_TOKEN_ENV)
            if given and info.get("token") == given:
                return self  # our supervisor holds it for us
            raise RunDirError(f"another process is writing to {self.run_dir}: {_holder(info)}. Two writers "
                              "would overwrite each other's rows and checkpoints: stop it, or give this "
                              "run its own run directory") from None
        self.token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "role": self.role,
                "token": self.token}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[self.key] = (fd, 1, self.token)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, n, token = _held.get(self.key, (self.fd, 1, ""))
        if n > 1:
            _held[self.key] = (fd, n - 1, token)
        else:
            _held.pop(self.key, None)
            os.close(fd)  # the lock goes with the last descriptor (a child may still hold one)
        self.fd = None


def _lock_info(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError, RecursionError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder(info: dict) -> str:
    pid, host, role = info.get("pid"), info.get("host"), info.get("role", "a writer")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["time"])) \
        if isinstance(info.get("time"), (int, float)) else "an unknown time"
    if not isinstance(pid, int):
        return "a process that did not say who it is"
    if host == socket.gethostname() and not _alive(pid):
        return (f"{role} pid {pid} took the lock at {since} and has died, but a process it started "
                f"still holds it (an orphaned trainer?): find it with fuser -v {RunDir.WRITER_LOCK}")
    return f"{role} pid {pid} on host {host}, since {since}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
