"""Two simulated nodes: two torchrun agents on localhost (c10d rendezvous, gloo, one worker each),
each under its own `thermo supervise`, over one run directory: the layout of a Slurm job that runs
``srun thermo supervise RUN -- torchrun --nnodes=2 ...`` on every node. The worker is the reference
loop (`thermo.train_gpt`) wrapped to say, on every rank, where each start of it resumed
(`tests/dist/multinode_train.py`). Each scenario checks what a user relies on: every node resumed
from the same checkpoint, at the same data position, with the same blacklist; the exit codes of
both supervisors; the events in the store. Plus heartbeats judged without comparing clocks."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import thermo
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.data import Blacklist, ResumableSampler
from thermo.store import Store
from thermo.supervisor import Supervisor, SupervisorConfig, SupervisorError
from thermo.supervisor.nodes import JobFile, Nodes, torchrun_nodes
from thermo.supervisor.process import _tree

WORKER = Path(__file__).parent / "dist" / "multinode_train.py"
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--checkpoint-every", "10", "--good-after", "10", "--flush-every", "10",
        "--attn-every", "5", "--lr", "3e-3", "--warmup", "10", "--quiet", "--shard", "fsdp"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One job on two simulated nodes, "a" and "b": a `thermo supervise` process per node, each
    around its own torchrun agent. "a" starts first and so leads (it takes the writer lock)."""

    def __init__(self, tmp_path: Path, *train_args: str, nnodes: str = "2", max_restarts: int = 0,
                 hang_timeout: float = 60.0, rdzv_conf: str = "", env: dict | None = None):
        self.tmp, self.run, self.log = tmp_path, tmp_path / "run", tmp_path / "ranks.jsonl"
        port = free_port()
        self.command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
                        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test{port}",
                        f"--max-restarts={max_restarts}", *([f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []),
                        "--monitor-interval=0.2", str(WORKER), *TINY, *train_args]
        self.options = ["--poll", "0.2", "--restart-delay", "0", "--grace", "3", "--hang-timeout", str(hang_timeout),
                        "--startup-timeout", "180", "--verdict-grace", "1", "--quiet"]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "THERMO_TEST_LOG": str(self.log), **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self):
        self.start("a")
        deadline = time.time() + 60
        while JobFile(self.run).read() is None:  # "a" leads
            assert time.time() < deadline and self.procs["a"].poll() is None, self.output("a")
            time.sleep(0.1)
        self.start("b")
        return self

    def __exit__(self, *exc):
        for name in self.procs:
            self.kill(name)

    def start(self, name: str) -> None:
        out = open(self.tmp / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "thermo.cli", "supervise", str(self.run), *self.options, "--", *self.command],
            env={**self.env, "THERMO_TEST_NODE": name}, stdout=out, stderr=subprocess.STDOUT)

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.out").read_text(errors="replace")[-4000:]

    def wait(self, timeout: float = 300) -> dict[str, int]:
        deadline = time.time() + timeout
        for name, p in self.procs.items():
            try:
                p.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"node {name} did not finish in {timeout}s:\n{self.output(name)}")
        return {name: p.returncode for name, p in self.procs.items()}

    def kill(self, name: str, supervisor: bool = True) -> None:
        """SIGKILL node `name`: its supervisor and everything under it (a lost node), or only
        its torchrun agent and the agent's workers (an agent that died; the supervisor lives)."""
        sup = self.procs[name].pid
        tree = _tree(sup)
        if not supervisor:
            agents = [p for p in tree if p != sup and _ppid(p) == sup]
            tree = {p: t for a in agents for p, t in _tree(a).items()}
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait_for(self, what, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not what():
            assert time.time() < deadline, f"timed out\n--- a:\n{self.output('a')}\n--- b:\n{self.output('b')}"
            time.sleep(0.2)

    def step(self) -> int:
        try:
            return int(json.loads((self.run / "heartbeat.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return 0

    def starts(self) -> list[list[dict]]:
        """Every start of the workers, in order: the ranks of one rendezvous round each."""
        rounds: dict[str, list[dict]] = {}
        for line in (self.log.read_text() if self.log.exists() else "").splitlines():
            r = json.loads(line)
            rounds.setdefault(r["round"], []).append(r)
        return list(rounds.values())


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def events(run: Path, kind: str) -> list[dict]:
    ev = thermo.load(run).events
    ev = ev[ev["kind"] == kind]
    return [{**d, "at_step": s} for d, s in zip(ev["data"], ev["step"])]


def assert_alike(start: list[dict], nodes: set[str]) -> dict:
    """The ranks of one start: one per node, every one resumed from the same checkpoint, at the
    same data position, with the same blacklist. Returns one of them."""
    assert {r["node"] for r in start} == nodes and len(start) == len(nodes) == start[0]["world"], start
    first = start[0]
    for r in start:
        assert (r["resumed_from"], r["data"], r["blacklist"]) == \
            (first["resumed_from"], first["data"], first["blacklist"]), (first, r)
    return first


def assert_contiguous(run: Path, last_step: int) -> None:
    with Store(run, readonly=True) as s:
        assert s.scalars()["step"].tolist() == list(range(1, last_step + 1))


def clean_batch(step: int) -> list[int]:
    n = len(TokenDataset(stdlib_bytes(300000), 32))
    return ResumableSampler(n, 8).peek(step)[-1]


# -- 1. a crashed rank (torchrun restarts every node) and a divergence (the leader repairs) -------


def test_a_crashed_rank_and_a_divergence_on_two_nodes_resume_every_node_alike(tmp_path):
    """Rank 1 crashes at step 15: torchrun (--max-restarts=1) restarts the workers of both nodes,
    which resume from checkpoint 10; no supervisor acts. Then poisoned steps 30-32 that only the
    supervisors' detector sees (--guard-blind): the leader stops both nodes, rolls back,
    blacklists, and both nodes resume from its checkpoint with its blacklist."""
    with Job(tmp_path, "--steps", "45", "--poison-steps", "30-32", "--guard-blind", max_restarts=1,
             env={"THERMO_TEST_CRASH": "15:1"}) as job:
        codes = job.wait()
    assert codes == {"a": 0, "b": 0}, (job.output("a"), job.output("b"))
    starts = [assert_alike(s, {"a", "b"}) for s in job.starts()]
    assert [s["resumed_from"] for s in starts[:2]] == [0, 10]  # fresh; torchrun's restart
    assert starts[0]["blacklist"] == starts[1]["blacklist"] == []

    (restart,) = [d for d in events(job.run, "restart") if d["reason"] != "resume"]  # the leader's only
    assert restart["reason"] == "divergence" and restart["checkpoint"] < 30
    (verdict,) = events(job.run, "verdict")
    assert verdict["source"] == "supervisor" and 30 <= verdict["onset_step"] <= verdict["detection_step"] <= 40
    blacklist = sorted(Blacklist.load(job.run).ids)
    assert set(clean_batch(30) + clean_batch(31) + clean_batch(32)) <= set(blacklist)
    assert starts[-1]["resumed_from"] == restart["checkpoint"] and starts[-1]["blacklist"] == blacklist
    # The Guard's rank 0 said the same for each start.
    resumes = [d["checkpoint"] for d in events(job.run, "restart") if d["reason"] == "resume"]
    assert resumes == [s["resumed_from"] for s in starts[1:]]
    (started,) = [d for d in events(job.run, "supervise") if "nodes" in d]
    assert started["nodes"]["min"] == started["nodes"]["max"] == 2
    assert_contiguous(job.run, 45)


# -- 2. a hung rank on one node, then a node whose agent dies ------------------------------------


def test_a_hung_rank_and_a_dead_agent_on_one_node_restart_every_node_from_one_checkpoint(tmp_path):
    """Rank 1 hangs at step 12: the leader sees the heartbeat stop changing, stops both nodes
    (the hung worker too) and both resume from checkpoint 10. Then node b's torchrun agent is
    SIGKILLed with its worker at step 22 or later: the job waits for it (b's supervisor starts it
    again with the others) and both resume from checkpoint 20."""
    with Job(tmp_path, "--steps", "30", "--hang-at", "12", "--hang-rank", "1", "--fault-once",
             hang_timeout=6.0) as job:
        job.wait_for(lambda: len(job.starts()) >= 2 and job.step() >= 22)
        job.kill("b", supervisor=False)
        codes = job.wait()
    assert codes == {"a": 0, "b": 0}, (job.output("a"), job.output("b"))
    starts = [assert_alike(s, {"a", "b"}) for s in job.starts()]
    assert [s["resumed_from"] for s in starts] == [0, 10, 20]
    restarts = [d for d in events(job.run, "restart") if d["reason"] != "resume"]
    assert [d["reason"] for d in restarts] == ["hang", "crash"]
    assert [d["checkpoint"] for d in restarts] == [10, 20]
    assert restarts[0]["at_step"] == 12
    assert_contiguous(job.run, 30)


# -- 3. a lost node, with elasticity ----------------------------------------------------------------


def test_with_elastic_nnodes_the_job_goes_on_without_the_lost_leader_node(tmp_path):
    """--nnodes=1:2: node a, the leader's (supervisor, agent, worker), is SIGKILLed at step 12 or
    later. Node b's supervisor takes the writer lock and leads from the next launch: node b goes on
    alone (world size 1) from the newest checkpoint and finishes."""
    # torchrun drops a node whose keep-alive is 3 s old (default 15 s) and waits 2 s for late ones.
    with Job(tmp_path, "--steps", "30", nnodes="1:2", max_restarts=1,
             rdzv_conf="last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3") as job:
        job.wait_for(lambda: any(len(s) == 2 for s in job.starts()) and job.step() >= 12)
        job.kill("a")
        job.procs["a"].wait()
        codes = job.wait()
    assert codes["b"] == 0, job.output("b")
    starts = job.starts()
    together = [s for s in starts if len(s) == 2]
    assert together, starts
    for s in together:
        assert_alike(s, {"a", "b"})
    alone = assert_alike(starts[-1], {"b"})
    assert alone["world"] == 1 and alone["resumed_from"] >= 10
    leaders = [d["nodes"]["leader"] for d in events(job.run, "supervise") if "nodes" in d]
    assert leaders == [f"{socket.gethostname()} pid {job.procs['a'].pid}",
                       f"{socket.gethostname()} pid {job.procs['b'].pid}"]
    assert JobFile(job.run).read()["state"] == "done"
    assert_contiguous(job.run, 30)


_FOLLOWER = r"""
import sys, time
from thermo.supervisor.nodes import NodeFile
node = NodeFile(sys.argv[1])
node.report(3, "running")
print(node.name, flush=True)
time.sleep(600)
"""


def test_the_leader_tells_a_lost_follower_by_its_free_lock(tmp_path):
    """A follower holds a flock on its node file's lock while it lives: once it is SIGKILLed (no
    clean-up), the leader no longer counts it and removes its files."""
    from thermo.supervisor.nodes import live_nodes

    p = subprocess.Popen([sys.executable, "-c", _FOLLOWER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    name = p.stdout.readline().strip()
    try:
        (node,) = live_nodes(tmp_path)
        assert (node["node"], node["generation"], node["state"]) == (name, 3, "running")
    finally:
        p.kill()
        p.wait()
    assert live_nodes(tmp_path) == []
    assert sorted(f.name for f in (tmp_path / ".supervise").iterdir()) == []


# -- the leader, the followers, the one writer -----------------------------------------------------


def test_torchrun_nodes_reads_nnodes_and_the_rendezvous_id():
    assert torchrun_nodes(["torchrun", "--nnodes=2", "--nproc_per_node", "8", "--rdzv-id", "j1", "t.py",
                           "--nnodes", "9"]) == Nodes(2, 2, "j1")
    assert torchrun_nodes([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:4", "--standalone",
                           "-m", "pkg.train"], {}) == Nodes(1, 4, "none")
    assert torchrun_nodes(["torchrun", "t.py"], {"PET_NNODES": "2", "PET_RDZV_ID": "7"}) == Nodes(2, 2, "7")
    for single in (["torchrun", "--nproc_per_node=2", "--standalone", "t.py"], ["python", "train.py"],
                   ["torchrun", "--nnodes=1", "t.py"]):
        assert torchrun_nodes(single, {}) is None


def test_a_supervisor_of_another_job_is_refused_by_the_leader_of_this_one(tmp_path):
    """Two jobs (rendezvous ids) on one run directory would be two writers: the second job's
    supervisor is refused in one line; this job's second node follows."""
    run = tmp_path / "run"
    # A leader whose agent waits in the rendezvous for its second node.
    leader = subprocess.Popen([sys.executable, "-m", "thermo.cli", "supervise", str(run), "--poll", "0.1", "--quiet",
                               "--", sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--rdzv-id=one",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(WORKER)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while (JobFile(run).read() or {}).get("state") != "run":
            assert time.time() < deadline and leader.poll() is None
            time.sleep(0.1)
        other = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--rdzv-id=two", str(WORKER)]
        cfg = SupervisorConfig(poll=0.1, status_every=0.0)
        t0 = time.time()
        with pytest.raises(SupervisorError, match=f"another process is writing to {run}"):
            Supervisor(run, other, cfg).run()
        assert time.time() - t0 < 5
    finally:
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(60) == 128 + signal.SIGTERM


# -- heartbeats without synchronised clocks ----------------------------------------------------------

_SKEWED_BEATS = r"""
import json, os, sys, time
from pathlib import Path
run = Path(os.environ["THERMO_RUN_DIR"])
when = float(sys.argv[1])  # the writer's clock: far off the supervisor's
for step in range(1, 31):
    beat = {"pid": os.getpid(), "seq": step, "step": step, "attempt": 1, "ids": [], "time": when}
    (run / "heartbeat.tmp").write_text(json.dumps(beat))
    os.replace(run / "heartbeat.tmp", run / "heartbeat.json")
    time.sleep(0.1)
if sys.argv[2] == "hang":
    time.sleep(600)
"""


@pytest.mark.parametrize("skew", [-86400.0 * 365, 86400.0 * 365], ids=["a year behind", "a year ahead"])
def test_heartbeats_are_judged_by_change_never_by_their_timestamp(tmp_path, skew):
    """A heartbeat written by a host whose clock is a year off (and stamps every beat with the
    same time) is a sign of life while its counter moves, and a hang once it stops moving."""
    cfg = SupervisorConfig(poll=0.05, hang_timeout=1.5, startup_timeout=30, grace=1, restart_delay=0,
                           max_restarts=0, status_every=0, detect=False)
    run = tmp_path / "ok"
    out = Supervisor(run, [sys.executable, "-c", _SKEWED_BEATS, str(time.time() + skew), "ok"], cfg).run()
    assert out.status == "finished", out.message
    assert out.launches[0].step == 30 and out.launches[0].guard
    run = tmp_path / "hang"
    out = Supervisor(run, [sys.executable, "-c", _SKEWED_BEATS, str(time.time() + skew), "hang"],
                     dataclasses.replace(cfg, max_stalled=1)).run()
    (launch,) = out.launches
    assert launch.ending == "hang" and launch.current == 30 and "no heartbeat for" in launch.why


def test_a_heartbeat_left_by_the_last_launch_is_no_sign_of_life(tmp_path):
    """The heartbeat a killed launch left behind (its clock, its counter) does not count for the
    next launch, which stays silent: a startup timeout, not progress."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "heartbeat.json").write_text(json.dumps({"pid": 1, "seq": 9, "step": 9, "attempt": 1, "ids": [],
                                                    "time": time.time() + 3600}))
    cfg = SupervisorConfig(poll=0.05, startup_timeout=1.0, grace=1, restart_delay=0, max_restarts=0,
                           status_every=0, detect=False)
    out = Supervisor(run, [sys.executable, "-c", "import time; time.sleep(60)"], cfg).run()
    (launch,) = out.launches
    assert launch.ending == "hang" and launch.first_sign is None and "no sign of life" in launch.why


def test_sigterm_to_the_leader_stops_every_node_and_each_exits_with_its_code(tmp_path):
    """scancel sends SIGTERM: the leader stops its node, tells the followers to stop theirs, waits
    for them, and every supervisor exits 128 + SIGTERM (the workers here are `sleep`)."""
    run, port = tmp_path / "run", free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test{port}", "--no-python", "sleep", "600"]
    sup = [sys.executable, "-m", "thermo.cli", "supervise", str(run), "--poll", "0.1", "--grace", "3", "--quiet", "--"]
    procs = [subprocess.Popen([*sup, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while (JobFile(run).read() or {}).get("state") != "run":
            assert time.time() < deadline and procs[0].poll() is None
            time.sleep(0.1)
        procs.append(subprocess.Popen([*sup, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from thermo.supervisor.nodes import live_nodes

        while not [n for n in live_nodes(run) if n["state"] == "running"]:  # the follower's agent runs
            assert time.time() < deadline and procs[1].poll() is None
            time.sleep(0.1)
        procs[0].send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in procs] == [128 + signal.SIGTERM] * 2
        job = JobFile(run).read()
        assert (job["state"], job["exit_code"], job["status"]) == ("done", 128 + signal.SIGTERM, "stopped")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
