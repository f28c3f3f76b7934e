"""The command's process tree: find it, signal it, terminate it, describe how it exited."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a pid from a later process reusing it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _tree(pid: int) -> dict[int, int]:
    """`pid` and its live descendants, pid -> start time (Linux /proc; elsewhere `pid` alone)."""
    children: dict[int, list[int]] = {}
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return {pid: 0}
    for name in names:
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        t = _start_time(p)
        if t is not None and p not in out:
            out[p] = t
            todo.extend(children.get(p, ()))
    return out


def _alive(pid: int, start: int) -> bool:
    t = _start_time(pid)
    if t is None and not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    return t == start


def _signal_tree(proc: subprocess.Popen, tree: dict[int, int], sig: int) -> None:
    live = {p for p, t in tree.items() if p != os.getpid() and _alive(p, t)}
    groups = {proc.pid}  # the command's own group (its session leader's pid)
    for p in live:
        try:
            groups.add(os.getpgid(p))
        except OSError:
            pass
    for g in groups - {os.getpgrp()}:  # never our own group
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    for p in live:  # members that left their group
        try:
            os.kill(p, sig)
        except OSError:
            pass


def _terminate(proc: subprocess.Popen, tree: dict[int, int], grace: float) -> None:
    """SIGTERM the command's whole process tree; SIGKILL what is left after `grace` seconds.

    Every process group in the tree is signalled, not only the command's: torchrun starts each
    worker in a session of its own, so a hung worker would outlive a signal to torchrun's group.
    `tree` holds every descendant seen while it ran, so orphans of a dead parent are found too.
    """
    if proc.poll() is None:
        tree.update(_tree(proc.pid))
    if proc.poll() is None or any(_alive(p, t) for p, t in tree.items() if p != proc.pid):
        _signal_tree(proc, tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while True:
        if proc.poll() is None:
            tree.update(_tree(proc.pid))
        left = [p for p, t in tree.items() if p != proc.pid and _alive(p, t)]
        if proc.poll() is not None and not left:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    _signal_tree(proc, tree, signal.SIGKILL)
    proc.wait()


def _marked(var: str, value: str) -> dict[int, int]:
    """Live processes whose environment holds ``var=value``, pid -> start time: the command's
    descendants even after they left its tree (a double-forked daemon is reparented to init and
    no longer a descendant, but it keeps the environment it was started with)."""
    if not value:
        return {}
    needle = f"{var}={value}".encode()
    out = {}
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return out
    for name in names:
        pid = int(name)
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        t = _start_time(pid)
        if needle in env and t is not None:
            out[pid] = t
    return out
