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
import sys
from collections.abc import Iterator

import torch

from torchdist._compat import flatten_mesh, release_mesh
from torchdist.runtime._forksafe import collect_before_next_fork
from torchdist.errors import TopologyError
from torchdist.topology import ALIASES, AXES, Topology

__all__ = ["distributed", "as_timedelta"]


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
    timeout: float | datetime.timedelta = 1800.0,
    store: torch.distributed.Store | None = None,
) -> Iterator[Topology]:
    """Bring up the process group and the named ``DeviceMesh``; yield the live topology.

    Communicates: the rendezvous (a TCP store hosted by rank 0, or torchrun's agent store, or the
    ``store`` given), ``init_process_group`` on ``topo.backend``, and one sub-group per mesh axis
    plus the flattened ``"dp"`` axis. On exit, also when the body raises, every group is destroyed
    and released, and garbage still holding one is collected before this process next forks (see
    ``torchdist/runtime/_forksafe.py``: a forked DataLoader worker must not be the one to free it).

    ``timeout`` bounds every collective: a rank that waits longer for its peers raises instead of
    hanging. A one-process topology needs no network (an in-memory store) but is still live, so
    ``topo.mesh["tp"]`` works the same everywhere.

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
    timeout = as_timedelta(timeout)
    if store is None:
        store = _rendezvous_store(topo, timeout)
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
    mesh = None
    try:
        mesh = _build_mesh(topo)
        flattened = {alias: flatten_mesh(mesh, names, alias) for alias, names in ALIASES.items()}
        yield topo.replace(mesh=mesh, flattened=flattened)
    finally:
        dist.destroy_process_group()
        if mesh is not None:
            release_mesh(mesh)  # the groups go now, not when the collector finds the mesh
        collect_before_next_fork()  # what still holds a group (a model's hooks) goes before a fork
        sys.excepthook = excepthook


def _rendezvous_store(topo: Topology, timeout: datetime.timedelta) -> torch.distributed.Store:
    import torch.distributed as dist

    if topo.world_size == 1:
        return dist.HashStore()
    try:
        return dist.TCPStore(
            topo.master_addr,
            topo.master_port,
            topo.world_size,
            is_master=topo.rank == 0 and not topo.agent_store,
            timeout=timeout,
        )
    except (RuntimeError, OSError) as exc:
        role = "host" if topo.rank == 0 else "reach"
        raise TopologyError(
            f"rank {topo.rank} could not {role} the rendezvous store at "
            f"{topo.master_addr}:{topo.master_port}: {exc}. Check MASTER_ADDR/MASTER_PORT, "
            "that the port is free on rank 0's host, and that every rank was started."
        ) from exc


def _build_mesh(topo: Topology) -> torch.distributed.device_mesh.DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(topo.device.type, topo.mesh_shape, mesh_dim_names=AXES)
