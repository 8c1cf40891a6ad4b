"""Start a world of ranks from one Python call: `spawn` (processes) and `in_process` (threads).

Both run ``fn(topo, *args)`` on every rank inside ``distributed(topo)`` and return the per-rank
results in rank order. Both turn failure into an error the caller can read:

* a rank that raises: the caller gets that rank's exception, annotated with the rank and the
  rank's own traceback, and the other ranks are ended;
* a rank that hangs (a skipped collective, a deadlock): after ``timeout`` seconds the caller gets
  ``DistributedTimeoutError`` naming the ranks still running, with their Python stacks.

``spawn`` starts real processes, which end with the process that started them, even if it is
killed (``SIGKILL``: no rank is left orphaned; ``_ranks``). It forks where that is safe (Linux,
CUDA not yet initialised in this process), as notebook launchers do, so a function defined in a
notebook or in ``__main__`` runs; elsewhere it uses the ``spawn`` start method, which needs a
picklable, importable ``fn``.
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

import multiprocessing
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from torchdist._compat import install_thread_world
from torchdist.errors import DistributedTimeoutError
from torchdist.runtime._distributed import distributed
from torchdist.runtime._forksafe import collector_frozen
from torchdist.runtime._ranks import (
    _GRACE_S,
    _collect_processes,
    _end_processes,
    _Outcome,
    _process_main,
    _results_or_raise,
    _run_rank,
)
from torchdist.topology import Topology

__all__ = ["spawn", "in_process"]

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
                    args=(fn, topo, args, writer, timeout, debug, stacks_dir, method == "fork",
                          os.getpid()),
                    name=f"torchdist-rank{rank}",
                    daemon=True,
                )
                # Freeze the collector across the fork: garbage this process still holds (an
                # earlier world's stores and gloo groups) must not be collected in the child,
                # where finalising it hangs or crashes the rank.
                with collector_frozen():
                    proc.start()
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


def _default_start_method() -> str:
    if sys.platform == "linux" and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"
