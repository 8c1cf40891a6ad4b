"""Worlds of ranks: `spawn` (processes), `in_process` (threads) and `distributed` (lifetime).

Failure semantics are the point here: a rank that raises, a rank that skips a collective and a
rank that hangs must each turn into an error the caller can read, within the timeout.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import multiprocessing
import os
import pickle
import queue as queue_module
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import torchdist as td
from torchdist import DistributedTimeoutError, RankError, Topology, TopologyError
from torchdist.topology import AXES


def _rank_threads() -> list[threading.Thread]:
    threads = threading.enumerate()
    return [t for t in threads if t.name.startswith("torchdist-rank") and t.is_alive()]


def _wait_for_rank_threads(limit: float = 30.0) -> None:
    """Wait until no in-process rank thread is left (a stuck one ends at its timeout)."""
    deadline = time.monotonic() + limit
    while _rank_threads():
        assert time.monotonic() < deadline, f"rank threads still running: {_rank_threads()}"
        time.sleep(0.05)


def _no_rank_processes_left() -> bool:
    return not [p for p in multiprocessing.active_children() if p.name.startswith("torchdist-rank")]


# --------------------------------------------------------------------------- spawn: results


def _describe(topo):
    tp = topo.mesh["tp"]
    return {
        "rank": topo.rank,
        "pid": os.getpid(),
        "live": topo.is_live,
        "initialized": dist.is_initialized(),
        "world": dist.get_world_size(),
        "backend": dist.get_backend(),
        "tp_ranks": tuple(dist.get_process_group_ranks(tp.get_group())),
        "dp_ranks": tuple(dist.get_process_group_ranks(topo.mesh["dp"].get_group())),
        "sizes": {name: topo.mesh[name].size() for name in (*AXES, "dp")},
        "fields": (topo.world_size, topo.rank, topo.local_rank, topo.device, topo.backend),
        "axes": topo.axes,
        "debug": os.environ.get("TORCH_DISTRIBUTED_DEBUG"),
    }


@pytest.mark.multiprocess
def test_spawn_results_in_rank_order_and_live_mesh():
    results = td.spawn(_describe, 4, timeout=60, dp_shard=2, tp=2)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    pids = {r["pid"] for r in results}
    assert len(pids) == 4 and os.getpid() not in pids  # real, separate processes
    for r, out in enumerate(results):
        expected = Topology(world_size=4, rank=r, local_rank=r, dp_shard=2, tp=2)
        assert out["live"] and out["initialized"]
        assert out["world"] == 4 and out["backend"] == "gloo"
        assert out["axes"] == expected.axes
        assert out["fields"] == (4, r, r, torch.device("cpu"), "gloo")
        assert out["tp_ranks"] == expected.group_ranks("tp")
        assert out["dp_ranks"] == expected.group_ranks("dp")
        assert out["sizes"] == {
            "pp": 1,
            "dp_replicate": 1,
            "dp_shard": 2,
            "cp": 1,
            "tp": 2,
            "dp": 2,
        }
        assert out["debug"] == "DETAIL"
    assert _no_rank_processes_left()


@pytest.mark.multiprocess
def test_spawn_runs_lambdas_and_closures():
    offset = 40
    assert td.spawn(lambda topo, k: topo.rank + k + offset, 2, 2, timeout=60) == [42, 43]


@pytest.mark.multiprocess
def test_spawn_runs_a_function_defined_in_main(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            import torchdist as td

            def work(topo, scale):
                total = td.all_reduce(torch.tensor([topo.rank + 1.0]), topo)
                return topo.rank * scale, total.item(), __name__

            if __name__ == "__main__":
                print("RESULT", td.spawn(work, 2, 10, timeout=60))
            """
        )
    )
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT [(0, 3.0, '__main__'), (10, 3.0, '__main__')]" in proc.stdout


def test_spawn_validates_before_starting():
    with pytest.raises(TopologyError, match=r"multiply to 2, but world_size is 4"):
        td.spawn(lambda topo: None, 4, dp_shard=2)
    with pytest.raises(TopologyError, match=r"multiply to 2, but world_size is 4"):
        td.in_process(lambda topo: None, 4, dp_shard=2)


# --------------------------------------------------------------------------- spawn: failures


def _raise_on_rank_one(topo):
    if topo.rank == 1:
        raise ValueError("boom on rank 1")
    td.barrier(topo)
    return "unreachable"


@pytest.mark.multiprocess
def test_spawn_rank_that_raises():
    start = time.monotonic()
    with pytest.raises(ValueError, match="boom on rank 1") as info:
        td.spawn(_raise_on_rank_one, 2, timeout=20)
    assert time.monotonic() - start < 15
    exc = info.value
    assert exc.rank == 1
    notes = "\n".join(exc.__notes__)
    assert "raised on rank 1 of 2" in notes
    assert "_raise_on_rank_one" in notes  # the remote traceback
    assert 'raise ValueError("boom on rank 1")' in notes
    assert _no_rank_processes_left()


def _skip_collective(topo):
    if topo.rank == 0:
        return td.all_reduce(torch.ones(3), topo)
    return None  # rank 1 never joins the all_reduce


@pytest.mark.multiprocess
def test_spawn_rank_that_skips_a_collective_errors_within_timeout():
    start = time.monotonic()
    with pytest.raises((RuntimeError, DistributedTimeoutError)) as info:
        td.spawn(_skip_collective, 2, timeout=5)
    elapsed = time.monotonic() - start
    assert elapsed < 20, elapsed
    exc = info.value
    if isinstance(exc, DistributedTimeoutError):
        assert 0 in exc.ranks
    else:
        assert exc.rank == 0
        assert "_skip_collective" in "\n".join(exc.__notes__)
    assert _no_rank_processes_left()


def _hang_on_rank_one(topo):
    if topo.rank == 1:
        time.sleep(60)
    return topo.rank


@pytest.mark.multiprocess
def test_spawn_rank_that_hangs_times_out_with_stacks():
    start = time.monotonic()
    with pytest.raises(DistributedTimeoutError, match=r"did not finish within 6.0 s") as info:
        td.spawn(_hang_on_rank_one, 2, timeout=6)  # rank 0 finishes well within 6 s, even loaded
    elapsed = time.monotonic() - start
    assert 5.5 < elapsed < 30, elapsed
    exc = info.value
    assert isinstance(exc, TimeoutError)
    assert 1 in exc.ranks and 0 not in exc.ranks, exc.stacks
    assert "rank 1" in exc.stacks
    assert "_hang_on_rank_one" in exc.stacks
    assert _no_rank_processes_left()  # the hung process was ended


def _unpicklable_failures(topo, kind):
    if topo.rank == 1:
        if kind == "result":
            return lambda: None  # cannot be pickled back
        if kind == "exception":

            class Local(Exception):  # a class pickle cannot find by name
                pass

            raise Local("local class")
        if kind == "exit":
            os._exit(3)
    return topo.rank


@pytest.mark.multiprocess
def test_spawn_rank_that_exits_becomes_rank_error():
    with pytest.raises(RankError, match=r"rank 1 exited \(exit code 3\) without reporting") as info:
        td.spawn(_unpicklable_failures, 2, "exit", timeout=20)
    assert info.value.rank == 1
    assert _no_rank_processes_left()


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("result", r"rank 1's result cannot be sent back"),
        ("exception", r"rank 1's exception Local cannot be sent back"),
    ],
)
def test_spawn_failures_that_cannot_travel_become_rank_errors(kind, match):
    """A result or exception that does not pickle comes back as RankError (worlds.py builds one
    in the child). RankError itself must survive the trip: see test_errors_survive_pickling."""
    with pytest.raises(RankError, match=match) as info:
        td.spawn(_unpicklable_failures, 2, kind, timeout=20)
    assert info.value.rank == 1
    if kind == "exception":
        assert "local class" in info.value.remote_traceback
    assert _no_rank_processes_left()


def test_errors_survive_pickling():
    """Errors cross process boundaries pickled (spawn sends them from rank to caller)."""
    error = pickle.loads(pickle.dumps(RankError("rank 1 failed", rank=1, remote_traceback="tb")))
    assert isinstance(error, RankError)
    assert (str(error), error.rank, error.remote_traceback) == ("rank 1 failed", 1, "tb")
    timeout = pickle.loads(pickle.dumps(DistributedTimeoutError("late", ranks=(1,), stacks="s")))
    assert (str(timeout), timeout.ranks, timeout.stacks) == ("late", (1,), "s")
    topo_error = pickle.loads(pickle.dumps(TopologyError("bad axes")))
    assert isinstance(topo_error, ValueError) and str(topo_error) == "bad axes"


def _collect_garbage(topo):
    gc.collect()
    return topo.rank


def _leave_failed_spawn_garbage():
    try:
        td.spawn(_raise_on_rank_one, 2, timeout=20)
    except ValueError:
        pass


def _leave_in_process_garbage():
    td.in_process(lambda topo: td.all_reduce(torch.ones(1), topo), 4, timeout=20, dp_shard=2, tp=2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("before", [_leave_failed_spawn_garbage, _leave_in_process_garbage])
def test_spawn_after_other_worlds_survives_gc_in_the_ranks(before):
    """spawn forks: every object of the caller is copied into the ranks, cyclic garbage included.

    After a spawn that raised, its frames (holding the master TCPStore it hosted) are cyclic
    garbage; after an in-process world, so are its gloo groups and meshes. A rank whose garbage
    collector then destroys those inherited objects hangs ("Garbage-collecting" in its stack) or
    segfaults. No gc.collect() in the caller on purpose: a user's script or notebook has none.
    """
    before()
    assert td.spawn(_collect_garbage, 2, timeout=60) == [0, 1]


# --------------------------------------------------------------------------- in_process


def test_in_process_results_and_live_mesh():
    results = td.in_process(_describe, 4, timeout=30, dp_shard=2, tp=2)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert {r["pid"] for r in results} == {os.getpid()}
    for r, out in enumerate(results):
        expected = Topology(world_size=4, rank=r, local_rank=r, dp_shard=2, tp=2)
        assert out["live"] and out["initialized"] and out["world"] == 4
        assert out["axes"] == expected.axes
        assert out["fields"] == (4, r, r, torch.device("cpu"), "gloo")
        assert out["tp_ranks"] == expected.group_ranks("tp")
        assert out["dp_ranks"] == expected.group_ranks("dp")
        assert out["sizes"]["tp"] == 2 and out["sizes"]["dp"] == 2 and out["sizes"]["pp"] == 1
    # the caller's own torch.distributed state is untouched
    assert not dist.is_initialized()


def test_in_process_rank_that_raises():
    start = time.monotonic()
    with pytest.raises(ValueError, match="boom on rank 1") as info:
        td.in_process(_raise_on_rank_one, 2, timeout=1)
    assert time.monotonic() - start < 10
    assert info.value.rank == 1
    assert "_raise_on_rank_one" in "\n".join(info.value.__notes__)
    _wait_for_rank_threads()  # rank 0 leaves its barrier at the 1 s timeout
    assert not dist.is_initialized()


def _short_hang(topo):
    if topo.rank == 1:
        time.sleep(5)
    return topo.rank


def test_in_process_rank_that_hangs_times_out_and_next_world_waits():
    start = time.monotonic()
    match = r"ranks \[1\] of an in-process world of 2"
    with pytest.raises(DistributedTimeoutError, match=match) as info:
        td.in_process(_short_hang, 2, timeout=2)
    assert time.monotonic() - start < 5
    assert isinstance(info.value, TimeoutError)
    assert info.value.ranks == (1,)
    # the stacks of the hung rank name the function and the call it is stuck in
    assert "_short_hang" in info.value.stacks and "time.sleep(5)" in info.value.stacks

    # a hung thread cannot be killed: a world started meanwhile cannot get going ...
    with pytest.raises(DistributedTimeoutError, match=r"another in-process world is still running"):
        td.in_process(lambda topo: topo.rank, 2, timeout=0.5)
    # ... and one with a long enough timeout waits for the stuck thread, then runs
    assert td.in_process(lambda topo: topo.rank * 2, 2, timeout=20) == [0, 2]
    assert time.monotonic() - start >= 4.9
    _wait_for_rank_threads()


def test_in_process_rank_that_skips_a_collective_times_out():
    start = time.monotonic()
    with pytest.raises((RuntimeError, DistributedTimeoutError)):
        td.in_process(_skip_collective, 2, timeout=1)
    assert time.monotonic() - start < 10
    _wait_for_rank_threads()


# --------------------------------------------------------------------------- distributed()


def test_distributed_tears_down_when_the_body_raises():
    _wait_for_rank_threads()
    assert not dist.is_initialized()
    with pytest.raises(ZeroDivisionError):
        with td.distributed(Topology.single()) as live:
            assert dist.is_initialized()
            assert live.is_live and live.mesh["tp"].size() == 1 and live.mesh["dp"].size() == 1
            raise ZeroDivisionError("in the body")
    assert not dist.is_initialized()
    # and the process can bring a world up again
    with td.distributed(Topology.single(), timeout=30) as live:
        assert td.all_reduce(torch.tensor([2.0]), live).tolist() == [2.0]
        assert td.gather(torch.tensor([1, 2]), live).tolist() == [1, 2]
    assert not dist.is_initialized()


def test_distributed_refuses_to_nest():
    _wait_for_rank_threads()
    with td.distributed(Topology.single()) as live:
        with pytest.raises(TopologyError, match=r"already live"):
            with td.distributed(live):
                pass
        with pytest.raises(TopologyError, match=r"a default process group already exists"):
            with td.distributed(Topology.single()):
                pass
        assert dist.is_initialized()  # the refused attempts did not tear the outer one down
    assert not dist.is_initialized()


def test_distributed_refuses_to_nest_in_a_world():
    def fn(topo):
        messages = []
        for attempt in (topo, topo.replace(mesh=None)):
            try:
                with td.distributed(attempt):
                    pass
            except TopologyError as exc:
                messages.append(str(exc))
        # still usable afterwards
        return messages, td.all_reduce(torch.ones(1), topo).item()

    for messages, total in td.in_process(fn, 2, timeout=30):
        assert len(messages) == 2
        assert "already live" in messages[0]
        assert "default process group already exists" in messages[1]
        assert total == 2.0


def test_distributed_rejects_bad_timeout():
    with pytest.raises(TopologyError, match=r"timeout must be positive"):
        with td.distributed(Topology.single(), timeout=0):
            pass
    assert not dist.is_initialized()


def _teardown_child(rank, port, queue):
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
    try:
        store = dist.TCPStore(
            "127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=60)
        )
        topo = Topology(world_size=2, rank=rank, local_rank=rank, master_port=port)
        with td.distributed(topo, store=store, timeout=60) as live:
            td.barrier(live)
            raise ValueError(f"body on rank {rank}")
    except ValueError as exc:
        queue.put((rank, str(exc), dist.is_initialized()))
    except BaseException:  # report it: a silent child would only show up as a queue timeout
        queue.put((rank, traceback.format_exc(), dist.is_initialized()))


@pytest.mark.multiprocess
def test_distributed_tears_down_on_raise_in_real_processes():
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_teardown_child, args=(r, store.port, queue)) for r in range(2)]
    # As td.spawn does: garbage of earlier worlds (gloo groups, stores) in this pytest worker
    # must not be finalised in a forked child, where that crashes it.
    gc.freeze()
    try:
        for p in procs:
            p.start()
    finally:
        gc.unfreeze()
    reports = []
    try:
        deadline = time.monotonic() + 120
        while len(reports) < len(procs) and time.monotonic() < deadline:
            try:
                reports.append(queue.get(timeout=1))
            except queue_module.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"a child died without reporting: exit codes {dead}"
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    assert sorted(reports) == [(0, "body on rank 0", False), (1, "body on rank 1", False)]
    assert [p.exitcode for p in procs] == [0, 0]


# --------------------------------------------------------------------------- live topology


def test_live_topology_replace_and_equality():
    def fn(topo):
        plain = Topology(world_size=4, rank=topo.rank, local_rank=topo.rank, dp_shard=2, tp=2)
        replaced = topo.replace(tp=1, dp_shard=-1)
        return {
            "equal": topo == plain and hash(topo) == hash(plain),
            "mesh_names": topo.mesh.mesh_dim_names,
            "tp": topo.mesh["tp"].size(),
            "dp": topo.mesh["dp"].size(),
            "mesh_only": topo.replace(mesh=topo.mesh).is_live,
            "replaced_live": replaced.is_live,
            "replaced_axes": replaced.axes,
        }

    for out in td.in_process(fn, 4, timeout=30, dp_shard=2, tp=2):
        assert out["equal"]
        assert out["mesh_names"] == AXES
        assert out["tp"] == 2 and out["dp"] == 2
        assert out["mesh_only"]
        assert not out["replaced_live"]  # the method drops a mesh that no longer fits
        assert out["replaced_axes"]["dp_shard"] == 4 and out["replaced_axes"]["tp"] == 1


def test_dataclasses_replace_on_a_live_topology_does_not_keep_a_stale_mesh():
    """DESIGN.md: `dataclasses.replace` makes variants. A variant whose axes changed must not
    carry the old DeviceMesh (tp=2) while saying tp=1: collectives over axis="tp" would still run
    over two ranks. Expected: the mesh is dropped, or the construction raises TopologyError."""

    def fn(topo):
        try:
            variant = dataclasses.replace(topo, tp=1, dp_shard=-1)
        except TopologyError:
            return "raised"
        if not variant.is_live:
            return "dropped"
        return tuple(variant.mesh.mesh.shape), variant.mesh_shape

    for out in td.in_process(fn, 4, timeout=30, dp_shard=2, tp=2):
        assert out in ("raised", "dropped"), f"stale mesh kept: mesh {out[0]} vs axes {out[1]}"


# --------------------------------------------------------------------------- costs


def _trivial(topo):
    return topo.rank


@pytest.mark.multiprocess
def test_report_world_costs():
    def median_of_3(call):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    # spawns first: an in-process world leaves garbage that forked ranks must not collect
    # (see test_spawn_after_other_worlds_survives_gc_in_the_ranks)
    spawn_2 = median_of_3(lambda: td.spawn(_trivial, 2, timeout=60))
    spawn_4 = median_of_3(lambda: td.spawn(_trivial, 4, timeout=60))
    in_process_4 = median_of_3(lambda: td.in_process(_trivial, 4, timeout=30))
    in_process_4_mesh = median_of_3(
        lambda: td.in_process(_trivial, 4, timeout=30, dp_shard=2, tp=2)
    )
    print(
        f"\n[world costs, median of 3] in_process N=4: {in_process_4 * 1e3:.0f} ms; "
        f"in_process N=4 dp_shard=2 tp=2: {in_process_4_mesh * 1e3:.0f} ms; "
        f"spawn N=2: {spawn_2 * 1e3:.0f} ms; spawn N=4: {spawn_4 * 1e3:.0f} ms "
        f"(start method {multiprocessing.get_start_method(allow_none=True) or 'default'}, "
        f"torch {torch.__version__})"
    )
    assert td.in_process(_trivial, 4, timeout=30) == [0, 1, 2, 3]
