"""Faults survived (issue 15): hangs under torchrun, orphans, a topology used after its block,
elastic restarts and several nodes. See docs/faults.md.

Every job here is a real ``torchdist launch`` (torchrun) or a real ``spawn`` parent, ended by
real signals. Starting a process that imports torch costs seconds on this machine, so one
module fixture starts every job at once in the background and each test waits for its own:
the wall time is the slowest job, not their sum. The reference of an uninterrupted run is the
same training loop in an in-process (threaded) world, which starts no process.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import torchdist as td
from torchdist import DistributedTimeoutError, Topology, TopologyError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(pathlib.Path(__file__).with_name("_fault_train.py"))
STEPS = 10
pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Job:
    """One background command; ``result()`` waits for it (bounded): rc, output, seconds it ran."""

    def __init__(self, argv: list[str], limit: float = 150.0) -> None:
        env = {**os.environ, "TORCH_DISTRIBUTED_DEBUG": "OFF", "PYTHONPATH": str(ROOT)}
        self.limit = limit
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self._out: list[str] = []
        self._ran = [0.0]
        self._reader = threading.Thread(target=self._read, args=(time.monotonic(),), daemon=True)
        self._reader.start()

    def _read(self, start: float) -> None:
        self._out.append(self.proc.stdout.read())
        self.proc.wait()
        self._ran[0] = time.monotonic() - start

    def result(self) -> tuple[int, str, float]:
        self._reader.join(self.limit)
        if self._reader.is_alive():
            self.proc.kill()
            self._reader.join()
            pytest.fail(f"job did not end within {self.limit} s:\n{''.join(self._out)[-4000:]}")
        return self.proc.returncode, "".join(self._out), self._ran[0]


def _launch(*args: str, limit: float = 150.0) -> _Job:
    return _Job([sys.executable, "-m", "torchdist.cli", "launch", *args], limit)


_ORPHAN_PARENT = """
import os, sys, time
import torchdist as td

def rank(topo, folder):
    open(os.path.join(folder, f"rank{topo.rank}.pid"), "w").write(str(os.getpid()))
    time.sleep(900)  # the test kills the parent long before; a loaded machine may reach it late

td.spawn(rank, 2, sys.argv[1], timeout=1200)
"""


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every background job of this module, started together."""
    tmp = tmp_path_factory.mktemp("faults")
    started = {}
    # three faults, one per attempt of one job (one agent instead of three)
    started["faults"] = _launch("-n", "2", "--timeout", "5", "--max-restarts", "2", SCRIPT,
                                str(tmp / "faults.pt"), "--scenarios", "sleep,save0,dtype",
                                "--root", str(tmp / "ckpt"))  # fmt: skip
    started["elastic"] = _launch("-n", "2", "--max-restarts", "1", SCRIPT, str(tmp / "el.pt"),
                                 "--root", str(tmp / "ckpt_elastic"), "--steps", str(STEPS),
                                 "--kill-at", "7")  # fmt: skip
    port = str(_free_port())
    for node in (0, 1):
        started[f"node{node}"] = _launch(
            "-n", "1", "--nnodes", "2", "--node-rank", str(node), "--master-port", port,
            "--rdzv-timeout", "120", SCRIPT, str(tmp / f"node{node}.pt"), "--steps", str(STEPS),
        )  # fmt: skip
    started["alone"] = _launch("-n", "1", "--nnodes", "2", "--node-rank", "0", "--master-port",
                               str(_free_port()), "--rdzv-timeout", "5", SCRIPT,
                               str(tmp / "alone.pt"))  # fmt: skip
    for sig in ("TERM", "KILL"):
        folder = tmp / f"orphans_{sig}"
        folder.mkdir()
        started[f"orphans_{sig}"] = _Job([sys.executable, "-c", _ORPHAN_PARENT, str(folder)])
        started[f"orphans_{sig}"].folder = folder
    yield tmp, started
    for job in started.values():  # a test that failed early: end its job (agents end ranks)
        if job.proc.poll() is None:
            job.proc.terminate()
            try:
                job.proc.wait(20)
            except subprocess.TimeoutExpired:
                job.proc.kill()
        job.result()


@pytest.fixture(scope="module")
def reference():
    """The weights of an uninterrupted 2-rank run, from an in-process world."""
    weights, resumed = td.in_process(_fault_train().train, 2, None, STEPS, timeout=120)[0]
    assert resumed == 0
    return weights


def _fault_train():
    sys.path.insert(0, str(pathlib.Path(SCRIPT).parent))
    try:
        import _fault_train
    finally:
        sys.path.pop(0)
    return _fault_train


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), (name, (got[name] - want[name]).abs().max())


# --------------------------------------------------------------------------- hangs, torchrun
def _attempt(jobs, kind: str) -> str:
    """The log of the job's attempt that ran ``kind``."""
    rc, out, ran = jobs[1]["faults"].result()
    assert rc == 1, out[-3000:]  # the last attempt fails too: the job fails
    assert ran < 150  # three attempts ended: not torch's 30 min, nor our 600 s default
    parts = out.split("[scenario] attempt ")
    mine = [p for p in parts[1:] if p.split("\n", 1)[0].endswith(f": {kind}")]
    assert len(mine) == 1, [p.split("\n", 1)[0] for p in parts[1:]]
    return mine[0]


def test_a_rank_that_sleeps_ends_the_job_within_the_timeout_with_its_stack(jobs):
    out = _attempt(jobs, "sleep")
    assert ("DistributedTimeoutError: rank 0 of 2 waited longer than the world's timeout (5 s) "
            "for its peers") in out
    assert "torchdist launch --timeout SECONDS" in out  # the fix
    # rank 1's own stack, printed by faulthandler when the agent sent it SIGTERM
    assert "most recent call first" in out and "in stuck_forever" in out, out[-3000:]
    assert "Traceback (most recent call last):\n  File \"<frozen runpy>\"" not in out  # no agent


def test_save_on_rank_0_only_under_torchrun_is_a_checkpoint_error(jobs):
    tmp, _ = jobs
    out = _attempt(jobs, "save0")
    assert ("CheckpointError: checkpoint.save(step 1) on rank 0: rank(s) [1] of 2 did not call "
            "save") in out
    assert "drop an `if rank == 0:`" in out
    assert not list((tmp / "ckpt_save0").glob("step_*"))


def test_a_dtype_mismatch_under_torchrun_is_a_collective_error_not_sigabrt(jobs):
    out = _attempt(jobs, "dtype")
    assert "SIGABRT" not in out and "exitcode  : -6" not in out and "(exitcode: -6)" not in out
    assert out.count("CollectiveError: all_reduce: leaf '<root>' differs across ranks in dtype "
                     "(rank 0: float32(4,), rank 1: int64(4,))") == 2  # fmt: skip


def test_an_mpi_world_larger_than_what_started_times_out_saying_so(capfd):
    port = str(_free_port())
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "MASTER_PORT": port}
    topo = Topology.from_env(env=env, device="cpu")
    start = time.monotonic()
    with pytest.raises(DistributedTimeoutError, match=r"rank 0: only 1 of 2 ranks joined the "
                       r"world at 127.0.0.1:\d+ within 2 s.*promised 2 processes"):  # fmt: skip
        with td.distributed(topo, timeout=600, join_timeout=2):
            pass
    assert time.monotonic() - start < 10
    assert "1 of 2 ranks have joined the world" in capfd.readouterr().err  # not a silent wait
    # the other side: rank 1 started, its rank 0 never
    lonely = Topology.from_env(env={**env, "OMPI_COMM_WORLD_RANK": "1"}, device="cpu")
    with pytest.raises(TopologyError, match=r"rank 1 could not reach the rendezvous store"):
        with td.distributed(lonely, timeout=1, join_timeout=1):
            pass


def _diverging_rank(rank: int, port: int, kind: str, debug: str, queue) -> None:
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
    import datetime

    import torch.distributed as dist

    dist.set_debug_level(getattr(dist.DebugLevel, debug))

    try:
        store = dist.TCPStore("127.0.0.1", port, 2, is_master=False,
                              timeout=datetime.timedelta(seconds=30))  # fmt: skip
        topo = Topology(world_size=2, rank=rank, local_rank=rank, master_port=port, timeout=1.5)
        with td.distributed(topo, store=store) as live:
            td.barrier(live)
            if rank == 1:
                if kind == "stall":
                    time.sleep(4)  # past rank 0's 1.5 s timeout
                return queue.put((rank, "left", ""))  # ends its block: skips what follows
            for _ in range(3):
                td.all_reduce(torch.ones(1), live)
        queue.put((rank, "finished", ""))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, type(exc).__name__, str(exc)))


@pytest.mark.parametrize(("kind", "debug", "error", "says"), [
    ("stall", "OFF", "DistributedTimeoutError", "waited longer than the world's timeout (1.5 s)"),
    ("leave", "OFF", "RankError", "a peer left the world while this rank waited for it"),
    ("stall", "DETAIL", "DistributedTimeoutError", "failed to pass monitoredBarrier"),
])  # fmt: skip
def test_a_peer_that_stalls_or_leaves_is_a_torchdist_error_at_the_block_exit(
    kind, debug, error, says
):
    """Forked ranks (cheap): rank 1 stops issuing collectives; rank 0's gloo error (torch's
    RuntimeError inside the block) leaves the block as torchdist's error, naming the fix. OFF
    is torchrun's default; DETAIL's wrapper reports the same stall through its barrier."""
    import gc
    import multiprocessing

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_diverging_rank, args=(r, store.port, kind, debug, queue))
             for r in range(2)]  # fmt: skip
    gc.freeze()  # as td.spawn does: no earlier world's garbage is finalised in a child
    try:
        for proc in procs:
            proc.start()
    finally:
        gc.unfreeze()
    try:
        reports = dict((r, (kind_, text)) for r, kind_, text in (queue.get(timeout=60),
                                                                   queue.get(timeout=60)))
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    assert reports[1][0] == "left"
    assert reports[0][0] == error and says in reports[0][1], reports[0]


# --------------------------------------------------------------------------- after the block
def test_a_topology_used_after_its_block_says_so():
    with td.distributed(Topology.single()) as live:
        assert live.is_live and td.all_reduce(torch.ones(1), live).item() == 1.0
    assert not live.is_live
    for call in (lambda: td.all_reduce(torch.ones(1), live), lambda: td.barrier(live),
                 lambda: live.submesh("dp"), lambda: td.gather(torch.ones(1), live)):  # fmt: skip
        with pytest.raises(TopologyError, match=r"belongs to a `with td.distributed\(topo\) as "
                           r"topo:` block that has ended"):  # fmt: skip
            call()
    ended = td.in_process(lambda topo: topo, 2, timeout=30)[1]  # a world of two, after it ended
    with pytest.raises(TopologyError, match=r"rank 1 of 2\) belongs to a .* block that has ended"):
        td.all_reduce(torch.ones(1), ended)
    with td.distributed(live.replace(mesh=None)) as again:  # a new block works as before
        assert td.all_reduce(torch.ones(1), again).item() == 1.0


# --------------------------------------------------------------------------- orphans
@pytest.mark.parametrize("sig", ["TERM", "KILL"])
def test_killing_the_process_that_runs_spawn_ends_its_ranks(jobs, sig):
    job = jobs[1][f"orphans_{sig}"]
    deadline = time.monotonic() + 120
    pids = []
    while len(pids) < 2:
        assert time.monotonic() < deadline and job.proc.poll() is None, job.proc.poll()
        time.sleep(0.1)
        pids = [int(p.read_text()) for p in job.folder.glob("rank*.pid") if p.read_text()]
    assert all(_alive(pid) for pid in pids)
    job.proc.send_signal(getattr(signal, f"SIG{sig}"))
    job.proc.wait(30)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"ranks {pids} outlived their parent ({sig})"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie is dead
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- elastic, nodes
def test_sigkill_mid_training_restarts_resumes_and_ends_with_the_uninterrupted_weights(
    jobs, reference
):
    tmp, started = jobs
    rc, out, _ = started["elastic"].result()
    assert rc == 0, out[-4000:]
    assert "exitcode  : -9" in out or "Signal 9" in out or "(exitcode: -9)" in out, out[-3000:]
    result = torch.load(tmp / "el.pt")
    assert result["attempt"] == 1 and result["resumed"] == 6  # restarted once, from step 6
    _assert_same_weights(result["weights"], reference)


def test_two_nodes_form_one_world_and_train_like_one_node(jobs, reference):
    tmp, started = jobs
    for node in (0, 1):
        rc, out, _ = started[f"node{node}"].result()
        assert rc == 0, out[-4000:]
    results = [torch.load(p) for p in sorted(tmp.glob("node*.pt"))]
    assert len(results) == 1 and results[0]["world"] == 2  # global rank 0 wrote it
    _assert_same_weights(results[0]["weights"], reference)


def test_a_node_that_never_joins_is_a_clear_error_within_the_rendezvous_timeout(jobs):
    rc, out, elapsed = jobs[1]["alone"].result()
    assert rc == 1
    assert "torchdist launch: error: not all 2 nodes joined the rendezvous at 127.0.0.1:" in out
    assert "within --rdzv-timeout 5 s" in out and "--node-rank I" in out
    assert "Traceback" not in out
    assert elapsed < 5 + 60  # the timeout, plus starting the agent on a loaded machine
