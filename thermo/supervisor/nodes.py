"""Several nodes, one job: a `thermo supervise` on every node, each around that node's torchrun
agent, over one shared run directory.

torchrun already restarts the workers of every node together when one fails (``--max-restarts``)
and re-forms the group when nodes come or go (``--nnodes=MIN:MAX``); thermo leaves that to it.
The supervisors act only where torchrun cannot: a divergence the Guard did not repair, a hung
rank, an agent that died or ran out of restarts. Each of those ends the job's *launch* on every
node together, and one supervisor repairs the run directory while no trainer runs, then starts
the next launch on every node, so every node resumes from the same checkpoint with the same
blacklist (the trainer's rank 0 picks them and broadcasts them):

* The **leader** is the supervisor that holds the run directory's writer lock (the first to
  start; when the leader is lost, its lock is free and the first follower to take it leads from
  the next launch). It alone writes the shared files (store events, manifest, blacklist) and
  decides; the trainer's rank 0, on whatever node it lands, writes as part of the same one writer
  (it is handed the leader's token). The others are **followers**: they start and stop their
  node's agent when the leader says so, and say how it ended.
* ``RUN/.supervise/job.json``, the leader's: the job (torchrun's ``--rdzv-id``), the leader's
  token, the launch number (``generation``) and its ``state``: ``run`` (every node runs its agent),
  ``stop`` (every node stops it), ``done`` (every node exits with ``exit_code``).
* ``RUN/.supervise/<host>-<pid>.json``, each follower's: the generation its agent belongs to and
  its ``state`` (``waiting``, ``running``, ``exited`` with its exit code, ``stopped``). Its
  ``.lock`` beside it is flocked while the follower lives: a lost node is told by its lock, which
  the kernel (or the NFS server's lease) drops, never by comparing clocks.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from thermo._io import RunDirError, WriterLock, _lock_info, atomic_write_json
from thermo.rundir import RunDir

JOB_FILE = "job.json"  # in RunDir.supervise_dir, beside the followers' <host>-<pid>.json and .lock

# torchrun's options that take no value (every other option before the script takes one).
_FLAGS = {"--standalone", "-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path"}


@dataclass(frozen=True)
class Nodes:
    """What a torchrun command says about its nodes.

    Attributes:
        min, max: ``--nnodes`` (``MIN:MAX`` when elastic; ``min == max`` otherwise).
        job: ``--rdzv-id``: the supervisors of one job share it (torchrun's default is "none").
    """

    min: int
    max: int
    job: str

    @property
    def elastic(self) -> bool:
        return self.min < self.max


def torchrun_nodes(command: list[str], env: dict[str, str] | None = None) -> Nodes | None:
    """The nodes of a torchrun command (``torchrun ...`` or ``python -m torch.distributed.run
    ...``), or None when it is not one or runs on one node only (``--nnodes`` at most 1). Reads
    torchrun's options before the script, then its ``PET_*`` environment variables.

    Example:
        >>> torchrun_nodes(["torchrun", "--nnodes=1:4", "--rdzv-id=7", "train.py"])
        Nodes(min=1, max=4, job='7')
    """
    env = os.environ if env is None else env
    args = _torchrun_args(command)
    if args is None:
        return None
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-"):
            break  # the script: its own options follow
        name, eq, value = a.partition("=")
        if not eq and name not in _FLAGS and i + 1 < len(args):
            value, i = args[i + 1], i + 1
        opts[name.lstrip("-").replace("_", "-")] = value
        i += 1
    nnodes = opts.get("nnodes", env.get("PET_NNODES", "1"))
    lo, _, hi = nnodes.partition(":")
    try:
        lo_n, hi_n = int(lo), int(hi or lo)
    except ValueError:
        return None  # torchrun itself will say what is wrong with it
    if hi_n <= 1:
        return None
    return Nodes(lo_n, hi_n, opts.get("rdzv-id", env.get("PET_RDZV_ID", "none")))


def _torchrun_args(command: list[str]) -> list[str] | None:
    if not command:
        return None
    if os.path.basename(command[0]) == "torchrun":
        return command[1:]
    for i, a in enumerate(command[:-1]):
        if a == "-m" and command[i + 1] in ("torch.distributed.run", "torch.distributed.launch"):
            return command[i + 2:]
    return None


class JobFile:
    """``RUN/.supervise/job.json``: written by the leader only, read by every supervisor."""

    def __init__(self, run_dir: Path):
        self.path = RunDir(run_dir).supervise_dir / JOB_FILE

    def write(self, **fields) -> None:
        self.path.parent.mkdir(exist_ok=True)
        atomic_write_json(self.path, fields)

    def read(self) -> dict | None:
        """The job file, or None if it is missing or not one (every field used is checked)."""
        try:
            with open(self.path, "rb") as f:
                job = json.loads(f.read(1 << 16))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(job, dict) or not isinstance(job.get("token"), str) \
                or not isinstance(job.get("generation"), int) \
                or job.get("state") not in ("start", "run", "stop", "done"):
            return None
        return job


class NodeFile:
    """A follower's ``RUN/.supervise/<host>-<pid>.json``, and the ``.lock`` it holds while it lives."""

    def __init__(self, run_dir: Path):
        folder = RunDir(run_dir).supervise_dir
        folder.mkdir(exist_ok=True)
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.path = folder / f"{self.name}.json"
        # Locked under a temporary name, then renamed into place (the lock follows the file): a
        # leader never finds this node's lock file unlocked and takes it for a lost node's.
        tmp = folder / f".{self.name}.lock.tmp"
        self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.replace(tmp, folder / f"{self.name}.lock")
        self.report(0, "waiting")

    def report(self, generation: int, state: str, exit_code: int | None = None, why: str = "") -> None:
        atomic_write_json(self.path, {"node": self.name, "host": socket.gethostname(), "pid": os.getpid(),
                                      "generation": generation, "state": state, "exit_code": exit_code,
                                      "why": why})

    def close(self) -> None:
        if self._fd is None:
            return
        for p in (self.path, self.path.with_suffix(".lock")):
            try:
                p.unlink()
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None


def live_nodes(run_dir: Path) -> list[dict]:
    """The followers alive now (their lock is held), with what each last reported. A lost one's
    files are removed."""
    out = []
    for lock in sorted(RunDir(run_dir).supervise_dir.glob("*.lock")):
        held = _held(lock)
        if held is None:
            continue  # gone meanwhile
        if not held:  # nobody holds it: that follower is gone
            for p in (lock.with_suffix(".json"), lock):
                try:
                    p.unlink()
                except OSError:
                    pass
            continue
        try:
            node = json.loads(lock.with_suffix(".json").read_bytes()[: 1 << 16])
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(node, dict) and isinstance(node.get("generation"), int):
            out.append(node)
    return out


def me() -> str:
    """This supervisor, as the job file names its leader."""
    return f"{socket.gethostname()} pid {os.getpid()}"


class Leader:
    """The leader's side of a job on several nodes: its job file, the launch number, the
    followers it saw last.

    Args:
        run_dir: the shared run directory.
        nodes: the job (`torchrun_nodes`).
        token: the leader's writer token (followers hand it to their command).
        generation: the launch number to continue from (a follower taking over from a lost leader).
    """

    def __init__(self, run_dir: Path, nodes: Nodes, token: str, generation: int = 0):
        self.run_dir, self.nodes, self.token, self.generation = Path(run_dir), nodes, token, generation
        self.file = JobFile(run_dir)
        self.seen: dict[str, dict] = {}  # followers alive at the last look, by name
        self._warned = False

    def write(self, state: str, **fields) -> None:
        self.file.write(job=self.nodes.job, token=self.token, leader=me(), generation=self.generation,
                        state=state, **fields)

    def state(self) -> str | None:
        return (self.file.read() or {}).get("state")

    def next_launch(self) -> None:
        """Start launch ``generation + 1`` on every node."""
        self.generation += 1
        self.write("run")

    def failed_node(self, event) -> tuple[str, str, int] | None:
        """A follower whose agent of this launch exited with an error: (node, why, exit code).
        Followers that came or went since the last look are recorded through `event` (the
        supervisor's ``_event(kind, message, **data)``)."""
        from thermo.supervisor.process import _describe_exit

        nodes = {n["node"]: n for n in live_nodes(self.run_dir) if isinstance(n.get("node"), str)}
        for name in nodes.keys() - self.seen.keys():
            event("node", f"node {name} joined", node=name, joined=True)
        for name in self.seen.keys() - nodes.keys():
            event("node", f"node {name} is gone (its supervisor ended)", node=name, joined=False)
        self.seen = nodes
        for name, n in nodes.items():
            rc = n.get("exit_code")
            if n["generation"] == self.generation and n.get("state") == "exited" and isinstance(rc, int) and rc:
                why = f"node {name}: its torchrun agent exited ({_describe_exit(rc)})"
                return name, why + (f": {n['why']}" if n.get("why") else ""), rc
        return None

    def rank0_elsewhere(self, host) -> str | None:
        """A warning, once, when the trainer's rank 0 runs on another host than the leader: both
        then open thermo.db, and SQLite's WAL does not work across hosts."""
        if self._warned or not isinstance(host, str) or host == socket.gethostname():
            return None
        self._warned = True
        return (f"the trainer's rank 0 runs on {host}, this leader on {socket.gethostname()}: both open "
                "thermo.db, which SQLite (WAL) supports on one host only. Start the first supervisor on "
                f"{host} (torchrun's c10d rendezvous gives rank 0 to the node whose name sorts first)")

    def stop_nodes(self, why: str, timeout: float, poll: float) -> list[str]:
        """Tell every node to stop this launch and wait until their agents are down (a lost node's
        lock is free: it is not waited for). Returns the nodes still running after `timeout`."""
        if self.state() != "stop":
            self.write("stop", why=why)
        deadline = time.monotonic() + timeout
        while True:
            busy = [n["node"] for n in live_nodes(self.run_dir)
                    if n["generation"] == self.generation and n.get("state") == "running"]
            if not busy or time.monotonic() > deadline:
                return busy
            time.sleep(poll)


def leader_token(run_dir: Path, nodes: Nodes) -> str | None:
    """The writer lock is held: by this job's leader (its token, to follow it), or not (None: a
    trainer, a tool, another job's leader). The leader writes its job file just after it takes
    the lock: give it a moment."""
    deadline = time.monotonic() + 30.0
    while True:
        info, job = writer_info(run_dir), JobFile(run_dir).read()
        if info.get("role", "thermo supervise") != "thermo supervise":
            return None
        if job is not None and job["token"] == info.get("token") and job["state"] != "done":
            return job["token"] if job.get("job") == nodes.job else None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def writer_info(run_dir: Path) -> dict:
    """What the run directory's writer lock file says of its holder (pid, host, role, token):
    a follower hands the leader's token to its command, so that rank 0, on whatever node it runs,
    writes as part of the leader's one writer."""
    try:
        fd = os.open(RunDir(run_dir).writer_lock, os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _lock_info(fd)
    finally:
        os.close(fd)


def _leader_alive(run_dir: Path, token: str) -> bool:
    """The leader (or the trainer it started on its node, which inherited the lock) still holds
    the writer lock it took with `token`."""
    return writer_info(run_dir).get("token") == token and bool(_held(RunDir(run_dir).writer_lock))


def _held(path: Path) -> bool | None:
    """Whether some process holds the ``flock`` on `path` (None: no such file). A free lock is
    taken for an instant to tell, and goes with the descriptor."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def follow(sup, token: str):
    """A follower's loop: run this node's agent for each launch the leader starts, stop it when
    the leader stops the launch, say how it ended, and exit with the job's exit code. The leader
    repairs the run directory; a follower writes nothing of it but its own node file.

    Args:
        sup: the `Supervisor` (its command, config, process handling).
        token: the leader's writer token, handed to the command.

    Returns:
        The job's `Outcome` as the leader decided it (``exit_code`` the leader's).
    """
    from thermo.supervisor.config import Outcome

    job_file, poll = JobFile(sup.run_dir), sup.config.poll
    sup._token = token
    mine = NodeFile(sup.run_dir)
    handlers = sup._install_signals()
    job = job_file.read() or {}
    sup._say(f"node {mine.name} follows the leader, {job.get('leader', '?')} (job {sup.nodes.job})")
    launched, lead = 0, None
    try:
        while True:
            job = job_file.read()
            if job is not None and job["token"] == token:
                if job["state"] == "done":
                    code = job.get("exit_code")
                    code = code if isinstance(code, int) else 1
                    sup._say(f"the leader ended the job (exit code {code}): {job.get('message', '')}")
                    return Outcome(str(job.get("status", "finished")), code, str(job.get("message", "")),
                                   sup.launches, [])
                if job["state"] == "run" and job["generation"] > launched:
                    launched = job["generation"]
                    mine.report(launched, "running")
                    # Said "running" before looking again: a leader that stops this launch meanwhile
                    # waits for this node, or this node sees the stop and never starts.
                    job = job_file.read()
                    if job is not None and job["state"] == "run" and job["generation"] == launched:
                        _run_launch(sup, mine, job_file, token, launched)
                    else:
                        mine.report(launched, "stopped")
                    continue
            if sup._stop is not None:
                sig = sup._stop
                return Outcome("stopped", 128 + sig, f"stopped by signal {sig}", sup.launches, [])
            if not _leader_alive(sup.run_dir, token):
                # The leader is gone (its node lost, it was killed): the first follower to take
                # the writer lock leads from here; the others follow it.
                gone = (job or {}).get("leader", "?")
                try:
                    lead = WriterLock(sup.run_dir, "thermo supervise").acquire()
                except RunDirError:
                    new = leader_token(sup.run_dir, sup.nodes)
                    if new is None:
                        msg = f"the leader ({gone}) is gone and no other took over; start the job again"
                        sup._say(msg)
                        return Outcome("gave_up", 1, msg, sup.launches, [])
                    token = sup._token = new
                    sup._say(f"the leader ({gone}) is gone; following its successor")
                    continue
                job = job_file.read()
                if job is not None and job["token"] == token and job["state"] == "done":
                    lead.release()  # it ended the job just before it went: follow that
                    lead = None
                    continue
                # Every node's next launch is newer than any the old leader started.
                launched = max(launched, job["generation"] if job is not None else 0)
                sup._say(f"the leader ({gone}) is gone; node {mine.name} leads from launch {launched + 1}")
                break
            time.sleep(poll)
    finally:
        if sup._proc is not None and sup._proc.poll() is None:
            sup._kill_tree()
        for sig, h in handlers.items():
            signal.signal(sig, h)
        mine.close()
    return sup._lead(lead, generation=launched)


def _run_launch(sup, mine: NodeFile, job_file: JobFile, token: str, generation: int) -> None:
    """Run this node's agent for launch `generation` until it exits or the leader stops it."""
    from thermo.supervisor.process import _describe_exit, _tree

    launch = sup._launch()
    while True:
        rc = sup._proc.poll()
        if rc is not None:
            sup._kill_tree()  # what it left behind
            sup._join_pumps()
            launch.exit_code, launch.end = rc, time.time()
            launch.ending = "finished" if rc == 0 else "crash"
            launch.why = f"this node's agent exited ({_describe_exit(rc)})"
            sup._say(launch.why)
            mine.report(generation, "exited", rc, "" if rc == 0 else sup._last_error())
            return
        job = job_file.read()  # None: unreadable for a moment; the leader's lock says if it is gone
        stop = job is not None and (job["token"] != token or job["generation"] != generation
                                    or job["state"] != "run")
        alive = _leader_alive(sup.run_dir, token)
        if stop or sup._stop is not None or not alive:
            why = ((job or {}).get("why") or "the leader ended the launch") if alive else "the leader is gone"
            sup._say(f"stopping this node's agent: {why}")
            sup._kill_tree(0.0 if alive and (job or {}).get("hard") is True else None)  # a hang: at once
            sup._join_pumps()
            launch.exit_code, launch.end, launch.ending, launch.why = sup._proc.returncode, time.time(), \
                "stopped", why
            mine.report(generation, "stopped", sup._proc.returncode)
            return
        sup._tree.update(_tree(sup._proc.pid))
        time.sleep(sup.config.poll)
