"""`distributed(topo)`: the lifetime of a process group and its named device mesh.

Nothing here is module state: the process group belongs to the ``with`` block that made it, and
the live topology it yields is the only handle to it.

Example::

    topo = td.Topology.from_env(dp_shard=-1)
    with td.distributed(topo) as topo:
        dp = topo.submesh("dp")         # flattened dp_replicate x dp_shard
        tp = topo.mesh["tp"]            # size-1 axes exist too
        ...
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import signal
import sys
import time
from collections.abc import Iterator

import torch

from torchdist._compat import flatten_mesh, release_mesh
from torchdist.errors import DistributedTimeoutError, RankError, TopologyError
from torchdist.runtime._forksafe import collect_before_next_fork
from torchdist.topology import ALIASES, AXES, ENDED, Topology

__all__ = ["distributed", "as_timedelta"]

_LEFT = "torchdist/left"  # in a rank-0-hosted store: how many ranks left its world
_JOINED = "torchdist/joined"  # in a world's store: how many ranks arrived
_ALL_JOINED = "torchdist/all_joined"  # set by the last rank to arrive
_SAY_WAITING_AFTER_S = 10.0  # a rendezvous still short of ranks after this says so on stderr
_MIN_JOIN_S = 60.0  # the default join_timeout is never shorter


def as_timedelta(timeout: float | datetime.timedelta) -> datetime.timedelta:
    """Seconds or a ``timedelta``, as a ``timedelta``."""
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if timeout <= 0:
        raise TopologyError(f"timeout must be positive, got {timeout} s.")
    return datetime.timedelta(seconds=float(timeout))


@contextlib.contextmanager
def distributed(
    topo: Topology,
    *,
    timeout: float | datetime.timedelta | None = None,
    store: torch.distributed.Store | None = None,
    join_timeout: float | None = None,
) -> Iterator[Topology]:
    """Bring up the process group and the named ``DeviceMesh``; yield the live topology.

    Communicates: the rendezvous (a TCP store hosted by rank 0, or torchrun's agent store, or the
    ``store`` given; each world uses its own key prefix in it, so several ``distributed`` blocks
    one after another in one job do not see each other's keys), ``init_process_group`` on
    ``topo.backend``, and one sub-group per mesh axis plus the flattened ``"dp"`` axis. On exit,
    also when the body raises, every group is destroyed and released, and garbage still holding
    one is collected before this process next forks (see ``torchdist/runtime/_forksafe.py``: a
    forked DataLoader worker must not be the one to free it).

    ``timeout`` (default ``topo.timeout``: 600 s, or ``torchdist launch --timeout``) bounds the
    rendezvous and every collective: a rank that waits longer for its peers raises
    ``DistributedTimeoutError`` when the block ends (inside it, torch's ``RuntimeError``), one
    whose peer left mid-collective ``RankError``, and a
    rendezvous short of ranks says on stderr how many arrived, then raises. Under torchrun, a rank
    that the agent ends (because a peer failed) prints its Python stack first. The rules are in
    ``docs/faults.md``. ``join_timeout`` bounds only the wait for every rank to arrive (default:
    ``timeout``, but at least 60 s: ranks that a launcher starts together can still be seconds
    apart importing torch on a loaded machine, and a short collective timeout must not turn
    that into a failure). After the block, the live topology refuses collectives with a
    ``TopologyError`` saying the block ended. A one-process topology needs no network (an
    in-memory store) but is still live, so ``topo.mesh["tp"]`` works the same everywhere.

    Example::

        with td.distributed(td.Topology.from_env(tp=2)) as topo:
            td.all_reduce(loss, topo, op="mean", axis="dp")
    """
    import torch.distributed as dist

    if topo.is_live:
        raise TopologyError(
            "this topology is already live (it carries a mesh); use it directly instead of "
            "entering distributed() again."
        )
    if dist.is_initialized():
        raise TopologyError(
            "a default process group already exists in this process (created outside this "
            "`with distributed(...)` block). Let torchdist own the process group, or destroy the "
            "existing one with torch.distributed.destroy_process_group() first."
        )
    timeout = as_timedelta(topo.timeout if timeout is None else timeout)
    hosted = None  # the store rank 0 hosts for this block alone (no torchrun agent store)
    if store is None:
        store = _rendezvous_store(topo, timeout)
        if topo.world_size > 1 and not topo.agent_store:
            hosted = store
    store = _world_store(store, topo.rank)
    if topo.world_size > 1:
        join = max(timeout.total_seconds(), _MIN_JOIN_S) if join_timeout is None else join_timeout
        _await_ranks(store, topo, as_timedelta(join))
    excepthook = sys.excepthook  # init_process_group wraps it with a "[rankN]:" prefix
    device_id = topo.device if topo.device.type == "cuda" else None
    if device_id is not None:
        torch.cuda.set_device(device_id)
    dist.init_process_group(
        topo.backend,
        rank=topo.rank,
        world_size=topo.world_size,
        store=store,
        timeout=timeout,
        device_id=device_id,
    )
    mesh, flattened, clean = None, {}, False
    handler = signal.getsignal(signal.SIGTERM)
    stacks_on_sigterm = topo.agent_store and _dump_stacks_on_sigterm()
    try:
        mesh = _build_mesh(topo)
        flattened = {alias: flatten_mesh(mesh, names, alias) for alias, names in ALIASES.items()}
        yield topo.replace(mesh=mesh, flattened=flattened, timeout=timeout.total_seconds())
        clean = True
    except RuntimeError as exc:
        if _is_timeout(exc):
            raise _collective_timeout(topo, timeout, exc) from exc
        if _peer_left(exc):
            raise _peer_left_error(topo, exc) from exc
        raise
    finally:
        if stacks_on_sigterm and signal.getsignal(signal.SIGTERM) is handler:
            faulthandler.unregister(signal.SIGTERM)  # not if the body installed its own
        dist.destroy_process_group()
        if mesh is not None:
            setattr(mesh, ENDED, True)  # the live topology now says so (Topology.is_live)
            for each in flattened.values():
                setattr(each, ENDED, True)
            release_mesh(mesh)  # the groups go now, not when the collector finds the mesh
        mesh = store = flattened = None
        if hosted is not None and clean:
            _leave_hosted_store(hosted, topo, timeout)
        hosted = None
        collect_before_next_fork()  # what still holds a group (a model's hooks) goes before a fork
        sys.excepthook = excepthook


def _rendezvous_store(topo: Topology, timeout: datetime.timedelta) -> torch.distributed.Store:
    import torch.distributed as dist

    if topo.world_size == 1:
        return dist.HashStore()
    hosted_by_rank0 = not topo.agent_store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            store = dist.TCPStore(
                topo.master_addr,
                topo.master_port,
                topo.world_size,
                is_master=topo.rank == 0 and hosted_by_rank0,
                timeout=timeout,
                wait_for_workers=False,  # _await_ranks waits, and says how many came
            )
            # a store an earlier world checked out of (see _leave_hosted_store): rank 0 is about
            # to close it and host a new one, so connect again
            if not hosted_by_rank0 or topo.rank == 0 or not store.check([_LEFT]):
                return store
            del store
        except (RuntimeError, OSError) as exc:
            # the previous world's store closing under a rank that connected to it: retry
            if not hosted_by_rank0 or topo.rank == 0 or time.monotonic() > deadline:
                raise _unreachable(topo, exc) from exc
        if time.monotonic() > deadline:
            raise _unreachable(topo, TimeoutError("rank 0 still serves an earlier world's store"))
        time.sleep(0.02)


def _unreachable(topo: Topology, exc: BaseException) -> TopologyError:
    role = "host" if topo.rank == 0 else "reach"
    return TopologyError(
        f"rank {topo.rank} could not {role} the rendezvous store at "
        f"{topo.master_addr}:{topo.master_port}: {exc}. Check MASTER_ADDR/MASTER_PORT, "
        "that the port is free on rank 0's host, and that every rank was started."
    )


def _leave_hosted_store(store, topo: Topology, timeout: datetime.timedelta) -> None:
    """Check out of a rank-0-hosted store so that the next world on the same port meets a new one.

    Without an agent, rank 0 hosts a new store on ``MASTER_PORT`` per world. Every rank adds
    itself to ``torchdist/left``; rank 0 waits for all (bounded: ``timeout``, at most 60 s), then
    drops its store and collects what may still hold it. A rank that connects while the old
    store still listens sees ``torchdist/left`` there and connects again (``_rendezvous_store``).
    Skipped when the body raised: a peer may be gone.
    """
    import gc
    import time

    deadline = time.monotonic() + min(timeout.total_seconds(), 60.0)
    try:
        store.add(_LEFT, 1)
        while topo.rank == 0 and store.add(_LEFT, 0) < topo.world_size:
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
    except (RuntimeError, OSError):  # a peer's store went away first: nothing left to wait for
        pass
    del store
    if topo.rank == 0:
        gc.collect()  # a cycle (a model's hooks, a mesh) may still hold the server


def _await_ranks(store, topo: Topology, timeout: datetime.timedelta) -> None:
    """Return once every rank of ``topo`` has entered this world, or raise
    ``DistributedTimeoutError`` after ``timeout`` saying how many did.

    A launcher that promises more processes than start (``mpirun`` with a stale
    ``OMPI_COMM_WORLD_SIZE``, a wrong ``WORLD_SIZE``) would otherwise wait in gloo's connect for
    the whole timeout, silently. Short of ranks after 10 s (or half the timeout, if shorter),
    this rank says so on stderr.
    Communicates: two store operations per rank, plus one ``wait``.
    """
    if store.add(_JOINED, 1) == topo.world_size:
        store.set(_ALL_JOINED, "1")
    total = timeout.total_seconds()
    first = min(_SAY_WAITING_AFTER_S, total / 2)
    for attempt, wait_s in enumerate((first, total - first)):
        try:
            store.wait([_ALL_JOINED], datetime.timedelta(seconds=max(wait_s, 0.001)))
            return
        except RuntimeError:  # DistStoreError: not yet
            joined = store.add(_JOINED, 0)
        if attempt == 0:
            print(
                f"[torchdist] rank {topo.rank}: {joined} of {topo.world_size} ranks have joined "
                f"the world at {topo.master_addr}:{topo.master_port} after {first:g} s; waiting "
                f"up to {total:g} s for the others.",
                file=sys.stderr,
                flush=True,
            )
    raise DistributedTimeoutError(
        f"rank {topo.rank}: only {joined} of {topo.world_size} ranks joined the world at "
        f"{topo.master_addr}:{topo.master_port} within {total:g} s. The launcher's environment "
        f"promised {topo.world_size} processes (WORLD_SIZE, OMPI_COMM_WORLD_SIZE, PMI_SIZE, "
        "SLURM_STEP_NUM_TASKS, ...), but the others never arrived: start all of them "
        "(mpirun -np, srun --ntasks, torchdist launch -n), make the size match what you "
        "started, or check that every rank can reach MASTER_ADDR:MASTER_PORT.",
        ranks=(topo.rank,),
    )


def _dump_stacks_on_sigterm() -> bool:
    """Under torchrun: print every thread's Python stack to stderr when SIGTERM arrives, then
    die of it as before. The agent sends SIGTERM to the ranks left when one fails (a collective
    timed out), so the log shows where a stuck rank was. C-level (faulthandler): it works while
    the rank sits in a collective or a native call."""
    try:
        faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)
    except (AttributeError, RuntimeError, ValueError, OSError):  # no SIGTERM, or no stderr fd
        return False
    return True


def _from_torch_distributed(exc: BaseException) -> bool:
    """An error of a collective or store (gloo's are plain RuntimeErrors naming their source
    file), not any RuntimeError of the body (a DataLoader's "timed out" stays as it is)."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or "gloo" in str(exc).lower()


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    if "failed to pass monitoredbarrier" in text:  # TORCH_DISTRIBUTED_DEBUG=DETAIL's wrapper
        return True
    return _from_torch_distributed(exc) and ("timed out" in text or "timeout" in text)


def _peer_left(exc: BaseException) -> bool:
    text = str(exc).lower()
    return _from_torch_distributed(exc) and (
        "connection closed by peer" in text or "connection reset by peer" in text
    )


def _peer_left_error(topo: Topology, exc: BaseException) -> RankError:
    return RankError(
        f"rank {topo.rank} of {topo.world_size}: a peer left the world while this rank waited "
        f"for it in a collective ({_first_line(exc)}). That rank ended its block early (it "
        "skipped the collectives left), or crashed or was killed: its own log says which. "
        "Every rank must issue the same collectives until the `distributed` block ends.",
        rank=-1,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _collective_timeout(
    topo: Topology, timeout: datetime.timedelta, exc: BaseException
) -> DistributedTimeoutError:
    first = _first_line(exc)
    return DistributedTimeoutError(
        f"rank {topo.rank} of {topo.world_size} waited longer than the world's timeout "
        f"({timeout.total_seconds():g} s) for its peers: {first}. Another rank did not join "
        "the same collective: it skipped one (a call under `if rank == 0:`), is stuck, or was "
        "slower than the timeout. Under torchrun the other ranks print their stacks when the "
        "agent ends them (look for 'most recent call first' in the log). Fix the rank that "
        "diverged; for a wait that is meant to be long (rank 0 alone evaluating or "
        "downloading), raise the timeout: td.distributed(topo, timeout=...) or "
        "`torchdist launch --timeout SECONDS`.",
        ranks=(topo.rank,),
    )


def _world_store(store: torch.distributed.Store, rank: int) -> torch.distributed.Store:
    """This world's own view of ``store``: a ``PrefixStore`` keyed by the world's sequence number.

    A store can outlive a world (torchrun's agent store lives as long as the job; a caller's
    store may be reused): without a prefix, the second world's ranks read the first world's
    keys (gloo addresses, group counters) and connect to sockets that are gone. Each rank counts
    the worlds it entered on this store with its own counter, so the ranks agree on the number
    without talking, as long as they enter the same sequence of worlds (which they must anyway).
    """
    import torch.distributed as dist

    number = store.add(f"torchdist/worlds/rank{rank}", 1)
    return dist.PrefixStore(f"torchdist/world{number}", store)


def _build_mesh(topo: Topology) -> torch.distributed.device_mesh.DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(topo.device.type, topo.mesh_shape, mesh_dim_names=AXES)
