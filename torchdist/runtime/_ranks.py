"""Rank processes of `spawn`: what runs in each child, and how the parent collects outcomes.

A child runs ``fn`` inside ``distributed``, sends back a pickled ``_Outcome`` (result, or
exception with its traceback), dumps its stacks on ``SIGUSR1`` (the parent's timeout), and ends
when the parent does: ``PR_SET_PDEATHSIG`` (Linux) sends it ``SIGKILL`` when the parent dies,
also of ``SIGKILL``, and a watcher thread checks ``os.getppid()`` twice a second where that is
missing (and for a parent that died before the child set it up). So killing the process that
runs ``spawn`` (a notebook kernel restarted, a test runner's timeout) leaves no rank behind.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from torchdist._compat import reset_inductor_thread_pool
from torchdist.errors import DistributedTimeoutError, RankError, TopologyError
from torchdist.runtime._distributed import distributed
from torchdist.topology import Topology

_GRACE_S = 0.5  # after the first failure, how long to wait for an earlier-timestamped one


@dataclass(frozen=True)
class _Outcome:
    rank: int
    ok: bool
    value: Any = None  # the result, or the exception
    traceback: str = ""
    at: float = 0.0  # time.time() when the rank finished, to order failures


def _run_rank(rank: int, fn, live: Topology, args) -> _Outcome:
    """``fn(live, *args)`` as an outcome, stamped when it returned or raised. Not after teardown:
    the first failure is the one reported, and a loaded rank's teardown can outlast a peer's
    collective timeout, which would make the peer's consequence look like the cause."""
    try:
        return _Outcome(rank, True, fn(live, *args), at=time.time())
    except BaseException as exc:  # noqa: BLE001 - carried to the caller
        return _Outcome(rank, False, exc, traceback.format_exc(), time.time())


def _process_main(fn, topo, args, writer, timeout, debug, stacks_dir, forked, parent) -> None:
    import torch.distributed as dist

    _end_with_parent(parent)
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


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _end_with_parent(parent: int) -> None:
    """End this rank when the process that ran ``spawn`` (pid ``parent``) dies, however it dies."""
    if sys.platform == "linux":
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbol: the watcher below still works
            pass
    if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="torchdist-parent-watch", daemon=True).start()


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
