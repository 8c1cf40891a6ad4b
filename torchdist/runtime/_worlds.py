"""Start a world of ranks from one Python call: `spawn` (processes) and `in_process` (threads).

Both run ``fn(topo, *args)`` on every rank inside ``distributed(topo)`` and return the per-rank
results in rank order. Both turn failure into an error the caller can read:

* a rank that raises: the caller gets that rank's exception, annotated with the rank and the
  rank's own traceback, and the other ranks are ended;
* a rank that hangs (a skipped collective, a deadlock): after ``timeout`` seconds the caller gets
  ``DistributedTimeoutError`` naming the ranks still running, with their Python stacks.

``spawn`` starts real processes. It forks where that is safe (Linux, CUDA not yet initialised in
this process), as notebook launchers do, so a function defined in a notebook or in ``__main__``
runs; elsewhere it uses the ``spawn`` start method, which needs a picklable, importable ``fn``.
Forked ranks run with one intra-op thread each (the parent's OpenMP pool does not survive a
fork), as torchrun does by default; pass ``start_method="spawn"`` for more. For the same reason a
forked rank drops inductor's compile thread pool inherited from a parent that already ran
``torch.compile`` (its first compile would otherwise wait forever). Every rank gets torchrun's
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), so libraries that read it (transformers' ``from_pretrained(tp_plan="auto")``)
see the world they run in; ``in_process`` ranks share one environment and get none.
Cost on a 2-core CPU machine: about 0.1 s (N=2) to 0.2 s (N=4) with fork, since the children
inherit the imported torch; several seconds with the ``spawn`` start method.

``in_process`` runs each rank as a thread of this process, each with its own real gloo process
group over an in-memory store: the same kernels and collectives as separate processes, at a
fraction of the cost (30-110 ms to start a 4-rank world with its mesh here). It is for
tests and notebook cells. Ranks share the process: the global RNG (build random tensors outside
``fn``, or from a ``torch.Generator``), ``os.environ`` and the GIL (no speed-up; numerics only).
Only one in-process world runs at a time. A hung rank thread cannot be killed; it ends when its
collective times out.

Both set ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` (``debug="DETAIL"``) so that gloo reports a
mismatched collective at once; pass ``debug="OFF"`` for timing. torch 2.13's own
``DistributedDataParallel`` constructor crashes on CPU under DETAIL: a rank function that builds
DDP by hand needs ``debug="INFO"`` (``torchdist.sharding.replicate`` works either way).

Example::

    def check(topo, x):
        return td.all_reduce(x, topo, op="sum")

    assert td.in_process(check, 4, torch.ones(2))[0].tolist() == [4.0, 4.0]
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchdist._compat import install_thread_world, reset_inductor_thread_pool
from torchdist.errors import DistributedTimeoutError, RankError, TopologyError
from torchdist.runtime._distributed import distributed
from torchdist.topology import Topology

__all__ = ["spawn", "in_process"]

_GRACE_S = 0.5  # after the first failure, how long to wait for an earlier-timestamped one


@dataclass(frozen=True)
class _Outcome:
    rank: int
    ok: bool
    value: Any = None  # the result, or the exception
    traceback: str = ""
    at: float = 0.0  # time.time() when the rank finished, to order failures


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    start_method: str | None = None,
    debug: str = "DETAIL",
    **axes: int,
) -> list[Any]:
    """Run ``fn(topo, *args)`` on ``world_size`` local CPU processes; return results in rank order.

    Communicates: whatever ``fn`` does, over a gloo group whose rendezvous store this process
    hosts on a free loopback port. ``axes`` lay out the mesh (``dp_shard=2, tp=2``).

    Results and exceptions travel back pickled. ``timeout`` bounds the whole run and every
    collective inside it.

    Example::

        ranks = td.spawn(lambda topo: topo.rank, 2)     # [0, 1]
    """
    import torch.distributed as dist

    Topology(world_size=world_size, **axes)  # validate before starting anything
    method = start_method or _default_start_method()
    ctx = multiprocessing.get_context(method)
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="torchdist-spawn-") as stacks_dir:
        readers, procs = [], []
        try:
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                topo = Topology(
                    world_size=world_size,
                    rank=rank,
                    local_rank=rank,
                    master_port=store.port,
                    **axes,
                )
                proc = ctx.Process(
                    target=_process_main,
                    args=(fn, topo, args, writer, timeout, debug, stacks_dir, method == "fork"),
                    name=f"torchdist-rank{rank}",
                    daemon=True,
                )
                # Freeze the collector across the fork: garbage this process still holds (an
                # earlier world's stores and gloo groups) must not be collected in the child,
                # where finalising it hangs or crashes the rank.
                gc.freeze()
                try:
                    proc.start()
                finally:
                    gc.unfreeze()
                writer.close()
                readers.append(reader)
                procs.append(proc)
            outcomes = _collect_processes(readers, procs, timeout, stacks_dir)
        finally:
            _end_processes(procs)
    return _results_or_raise(outcomes, world_size)


def in_process(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    debug: str | None = "DETAIL",
    **axes: int,
) -> list[Any]:
    """Run ``fn(topo, *args)`` on ``world_size`` ranks that are threads of this process.

    Each thread holds a real gloo process group and a live mesh (see the module docstring for
    what threads share). ``timeout`` bounds the run and every collective.

    Example::

        def grads_agree(topo):
            g = torch.full((3,), float(topo.rank))
            return td.all_reduce(g, topo, op="mean")

        td.in_process(grads_agree, 4, dp_shard=2, tp=2)
    """
    import torch.distributed as dist

    Topology(world_size=world_size, **axes)
    timeout = float(timeout)
    uninstall = install_thread_world(acquire_timeout=timeout)
    previous_debug = dist.get_debug_level()
    if debug is not None:
        dist.set_debug_level(getattr(dist.DebugLevel, debug))
    store = dist.HashStore()
    outcomes: dict[int, _Outcome] = {}
    finished = threading.Condition()
    running = [world_size]

    def rank_main(rank: int) -> None:
        topo = Topology(world_size=world_size, rank=rank, local_rank=rank, **axes)
        try:
            with distributed(topo, timeout=timeout, store=store) as live:
                outcome = _run_rank(rank, fn, live, args)
        except BaseException as exc:  # noqa: BLE001 - carried to the caller (setup, teardown)
            outcome = _Outcome(rank, False, exc, traceback.format_exc(), time.time())
        with finished:
            outcomes[rank] = outcome
            running[0] -= 1
            if running[0] == 0:
                dist.set_debug_level(previous_debug)
                uninstall()
            finished.notify_all()

    threads = [
        threading.Thread(target=rank_main, args=(r,), name=f"torchdist-rank{r}", daemon=True)
        for r in range(world_size)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    with finished:
        while len(outcomes) < world_size:
            failed = [o for o in outcomes.values() if not o.ok]
            if failed and time.time() - min(o.at for o in failed) > _GRACE_S:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            finished.wait(min(left, _GRACE_S / 2))
        snapshot = dict(outcomes)
    if len(snapshot) < world_size and not any(not o.ok for o in snapshot.values()):
        frames = sys._current_frames()
        stuck = tuple(r for r in range(world_size) if r not in snapshot)
        stacks = "\n".join(
            f"--- rank {r} (thread {threads[r].name}) ---\n"
            + "".join(traceback.format_stack(frames[threads[r].ident]))
            for r in stuck
            if threads[r].ident in frames
        )
        raise DistributedTimeoutError(
            f"ranks {list(stuck)} of an in-process world of {world_size} did not finish within "
            f"{timeout:.1f} s; a rank is probably waiting on a collective another rank skipped. "
            f"Their stacks:\n{stacks}",
            ranks=stuck,
            stacks=stacks,
        )
    return _results_or_raise(snapshot, world_size)


# --------------------------------------------------------------------------- process internals
def _default_start_method() -> str:
    if sys.platform == "linux" and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _run_rank(rank: int, fn, live: Topology, args) -> _Outcome:
    """``fn(live, *args)`` as an outcome, stamped when it returned or raised. Not after teardown:
    the first failure is the one reported, and a loaded rank's teardown can outlast a peer's
    collective timeout, which would make the peer's consequence look like the cause."""
    try:
        return _Outcome(rank, True, fn(live, *args), at=time.time())
    except BaseException as exc:  # noqa: BLE001 - carried to the caller
        return _Outcome(rank, False, exc, traceback.format_exc(), time.time())


def _process_main(fn, topo, args, writer, timeout, debug, stacks_dir, forked) -> None:
    import torch.distributed as dist

    if forked:
        # The parent's OpenMP thread pool does not survive fork: a forked rank that runs a
        # parallel op hangs. One intra-op thread per rank, as torchrun sets by default.
        torch.set_num_threads(1)
        # Nor does inductor's compile thread pool, once the parent has compiled: without this
        # the rank's first torch.compile waits forever for the parent's (absent) threads.
        reset_inductor_thread_pool()
    # Look like a torchrun rank, so that libraries which read the environment (transformers'
    # from_pretrained(tp_plan=...), Accelerate) see the world they run in.
    os.environ.update(_torchrun_environment(topo))
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = debug
    dist.set_debug_level(getattr(dist.DebugLevel, debug))
    stack_file = open(os.path.join(stacks_dir, f"rank{topo.rank}.txt"), "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    try:
        store = dist.TCPStore(
            topo.master_addr,
            topo.master_port,
            topo.world_size,
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout),
        )
        with distributed(topo, timeout=timeout, store=store) as live:
            outcome = _run_rank(topo.rank, fn, live, args)
    except BaseException as exc:  # noqa: BLE001 - carried to the parent (setup, teardown)
        outcome = _Outcome(topo.rank, False, exc, traceback.format_exc(), time.time())
    try:
        payload = pickle.dumps(outcome)
    except Exception as exc:  # noqa: BLE001 - the result or exception does not pickle
        kind = "result" if outcome.ok else f"exception {type(outcome.value).__name__}"
        error = RankError(
            f"rank {topo.rank}'s {kind} cannot be sent back: {exc}",
            rank=topo.rank,
            remote_traceback=outcome.traceback,
        )
        payload = pickle.dumps(_Outcome(topo.rank, False, error, outcome.traceback, outcome.at))
    writer.send_bytes(payload)
    writer.close()


def _torchrun_environment(topo: Topology) -> dict[str, str]:
    """The variables torchrun sets for a rank on one host (not TORCHELASTIC_*: no agent runs)."""
    return {
        "WORLD_SIZE": str(topo.world_size),
        "RANK": str(topo.rank),
        "LOCAL_RANK": str(topo.local_rank),
        "LOCAL_WORLD_SIZE": str(topo.world_size),
        "GROUP_RANK": "0",
        "GROUP_WORLD_SIZE": "1",
        "ROLE_RANK": str(topo.rank),
        "ROLE_WORLD_SIZE": str(topo.world_size),
        "MASTER_ADDR": topo.master_addr,
        "MASTER_PORT": str(topo.master_port),
    }


def _collect_processes(readers, procs, timeout: float, stacks_dir: str) -> dict[int, _Outcome]:
    from multiprocessing.connection import wait

    outcomes: dict[int, _Outcome] = {}
    pending = dict(enumerate(readers))
    deadline = time.monotonic() + timeout
    first_failure_at = None
    while pending:
        now = time.monotonic()
        if first_failure_at is not None and now - first_failure_at > _GRACE_S:
            break
        if now >= deadline:
            raise _process_timeout(sorted(pending), procs, timeout, stacks_dir)
        ready = wait(list(pending.values()), timeout=min(deadline - now, _GRACE_S / 2))
        for rank, reader in list(pending.items()):
            if reader not in ready:
                continue
            del pending[rank]
            try:
                outcomes[rank] = pickle.loads(reader.recv_bytes())
            except (EOFError, OSError):
                procs[rank].join(1.0)
                code = procs[rank].exitcode
                outcomes[rank] = _Outcome(
                    rank,
                    False,
                    RankError(
                        f"rank {rank} exited (exit code {code}) without reporting a result; "
                        "it was killed or crashed in native code.",
                        rank=rank,
                    ),
                    at=time.time(),
                )
            if not outcomes[rank].ok and first_failure_at is None:
                first_failure_at = time.monotonic()
    return outcomes


def _process_timeout(stuck, procs, timeout, stacks_dir) -> DistributedTimeoutError:
    for rank in stuck:
        if procs[rank].is_alive():
            os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(0.5)
    stacks = []
    for rank in stuck:
        path = os.path.join(stacks_dir, f"rank{rank}.txt")
        text = open(path).read() if os.path.exists(path) else "(no stack: the rank did not start)"
        stacks.append(f"--- rank {rank} (pid {procs[rank].pid}) ---\n{text}")
    stacks_text = "\n".join(stacks)
    return DistributedTimeoutError(
        f"ranks {stuck} of {len(procs)} did not finish within {timeout:.1f} s; a rank is probably "
        f"waiting on a collective another rank skipped. Their stacks:\n{stacks_text}",
        ranks=tuple(stuck),
        stacks=stacks_text,
    )


def _end_processes(procs) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _results_or_raise(outcomes: dict[int, _Outcome], world_size: int) -> list[Any]:
    failures = sorted((o for o in outcomes.values() if not o.ok), key=lambda o: o.at)
    if failures:
        first = failures[0]
        exc = first.value
        others = ", ".join(f"rank {o.rank}: {type(o.value).__name__}" for o in failures[1:])
        exc.add_note(
            f"[torchdist] raised on rank {first.rank} of {world_size}"
            + (f" (then {others})" if others else "")
            + f"; traceback on that rank:\n{first.traceback}"
        )
        if not hasattr(exc, "rank"):
            try:
                exc.rank = first.rank
            except AttributeError:  # an exception type with __slots__
                pass
        raise exc
    if len(outcomes) != world_size:
        raise TopologyError(f"only {len(outcomes)} of {world_size} ranks reported a result.")
    return [outcomes[rank].value for rank in range(world_size)]
