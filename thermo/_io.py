"""Atomic file writes and strict JSON reads for the run directory's control files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
