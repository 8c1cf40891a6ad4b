"""The one place torchdist touches private torch paths. Each use says why and what replaces it.

Kept here so a torch upgrade that moves one of them breaks one small module, not the library.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import torch

__all__ = [
    "flatten_mesh",
    "install_thread_world",
    "is_composable_ddp",
    "composable_ddp_instance",
    "fsdp_mesh",
    "dcp_metadata_path",
    "composable_replicate",
    "composable_checkpoint",
    "amp_unscale_",
    "amp_update_scale_",
    "foreach_copy_",
    "set_schedule_loss",
]

# Only one in-process world can swap torch's process-group registry at a time. This lock is the
# single piece of module state in torchdist: it guards torch's global, not a state of ours.
_THREAD_WORLD_LOCK = threading.Lock()


def flatten_mesh(mesh, names: tuple[str, ...], alias: str):
    """``mesh[names]`` flattened into one named axis (``DeviceMesh._flatten``, private in 2.13)."""
    return mesh[names]._flatten(alias)


def release_mesh(mesh) -> None:
    """Let a torn-down mesh's process groups go now, in this process (2.13 private attributes).

    A root mesh and each mesh flattened from it point at each other (``_flatten_mapping`` and
    ``_root_mesh``), and the root holds its ``ProcessGroup`` objects in ``_pg_registry``. Left like
    that, the groups outlive the world as cyclic garbage. If the collector first meets them in a
    forked child (a DataLoader worker, a process forked by hand), the gloo group's destructor runs
    there, where its threads do not exist, and the child hangs or dies of SIGSEGV. Emptying both
    dicts breaks the cycle and drops the groups while the caller still holds the dead mesh.
    """
    meshes = [mesh, *getattr(mesh, "_flatten_mapping", {}).values()]
    for each in meshes:
        for name in ("_pg_registry", "_flatten_mapping"):
            table = getattr(each, name, None)
            if isinstance(table, dict):
                table.clear()


def install_thread_world(acquire_timeout: float) -> Callable[[], None]:
    """Make torch.distributed's registry thread-local, so threads can each be one rank.

    Returns the function that undoes it; call it once, when the last rank thread has finished
    (a thread still blocked in a collective would otherwise wake up in the real world).

    torch keeps the default process group in a module global (``distributed_c10d._world``) and
    registers groups by name in a C++ map. Its own multi-threaded tests swap the first for a
    ``ThreadLocalWorld`` and switch the second to per-thread isolation; we do the same, with real
    gloo process groups in each thread rather than torch's Python "threaded" backend.
    """
    import torch.distributed.distributed_c10d as c10d
    from torch.testing._internal.distributed.multi_threaded_pg import ThreadLocalWorld

    if not _THREAD_WORLD_LOCK.acquire(timeout=acquire_timeout):
        from torchdist.errors import DistributedTimeoutError

        raise DistributedTimeoutError(
            f"another in-process world is still running after {acquire_timeout:.0f} s (an "
            "earlier one whose ranks are still blocked in a collective until their timeout). "
            "Only one in-process world runs at a time; wait for it, or use spawn()."
        )
    previous, excepthook = c10d._world, sys.excepthook
    c10d._world = ThreadLocalWorld()
    torch._C._distributed_c10d._set_thread_isolation_mode(True)

    def uninstall() -> None:
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        c10d._world, sys.excepthook = previous, excepthook
        _THREAD_WORLD_LOCK.release()

    return uninstall


def composable_replicate(module, process_group, **ddp_kwargs):
    """DDP applied in place, keeping parameter names (``torch.distributed._composable.replicate``).

    The ``DistributedDataParallel`` wrapper would prefix every name with ``module.``; the
    composable form makes the module itself a DDP subclass instead. The reducer is built here,
    not lazily in the first forward.

    torch 2.13's DDP constructor crashes (SIGSEGV in its C++ logger) when its process group is
    wrapped by TORCH_DISTRIBUTED_DEBUG=DETAIL's ``_ProcessGroupWrapper``. DDP then gets its own
    unwrapped gloo/nccl group over the same ranks, created with the debug level lowered to INFO.
    In a real process the level is restored at once; in an in-process world (ranks as threads,
    one process-wide level) it stays lowered until the world ends, because another rank may be
    creating its group at that moment.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from torch.distributed._composable.replicate import replicate

    backend = process_group._get_backend(torch.device("cpu") if dist.get_backend(process_group)
                                         == "gloo" else torch.device("cuda"))  # fmt: skip
    previous = dist.get_debug_level()
    if type(backend).__name__ == "_ProcessGroupWrapper":
        dist.set_debug_level(dist.DebugLevel.INFO)
        process_group = dist.new_group(
            dist.get_process_group_ranks(process_group), use_local_synchronization=True
        )
    try:
        replicate(module, process_group=process_group, **ddp_kwargs)
        replicate.state(module).lazy_init()
    finally:
        if type(c10d._world).__name__ != "ThreadLocalWorld":
            dist.set_debug_level(previous)
    return module


def composable_checkpoint(module, **kwargs):
    """Activation checkpointing applied in place, keeping parameter names
    (``torch.distributed._composable.checkpoint``)."""
    from torch.distributed._composable import checkpoint

    return checkpoint(module, **kwargs)


def is_composable_ddp(module) -> bool:
    """True for a module ``torch.distributed._composable.replicate`` turned into a DDP subclass."""
    from torch.distributed._composable.replicate import DDP

    return isinstance(module, DDP)


def composable_ddp_instance(module):
    """The ``DistributedDataParallel`` behind a module ``replicate`` was applied to, or None
    (``replicate.state(module)._ddp_weakref``, private in 2.13)."""
    from torch.distributed._composable import replicate

    ref = getattr(replicate.state(module), "_ddp_weakref", None)
    return ref() if ref is not None else None


def fsdp_mesh(module):
    """The data-parallel DeviceMesh of an ``FSDPModule`` (its param group's ``mesh_info``,
    private in 2.13), or None when that unit manages no parameters directly."""
    group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
    return group.mesh_info.mesh if group is not None else None


def reset_inductor_thread_pool() -> bool:
    """In a forked child: drop inductor's compile ``ThreadPoolExecutor`` inherited from the parent.

    ``AsyncCompile.pool`` (private, ``lru_cache``d, 2.13) is not reset at fork, unlike its process
    pool: the child inherits an executor whose worker threads do not exist in it, and the first
    ``torch.compile`` there waits forever on a future nobody runs. Clearing the cache makes the
    child build its own executor. Returns True when there was one to drop."""
    async_compile = sys.modules.get("torch._inductor.async_compile")
    if async_compile is None:
        return False
    pool = async_compile.AsyncCompile.pool
    had_one = pool.cache_info().currsize > 0
    pool.cache_clear()
    return had_one


def dcp_metadata_path(reader, rank):
    """Where a DCP ``FileSystemReader`` keeps its ``.metadata`` file (``_get_metadata_path``,
    private in 2.13): torchdist reads that file itself, with an unpickler that accepts only DCP's
    metadata classes."""
    return reader._get_metadata_path(rank)


def amp_unscale_(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor):
    """Multiply ``grads`` by ``inv_scale`` in place and set ``found_inf`` if any is not finite:
    ``torch._amp_foreach_non_finite_check_and_unscale_``, the fused kernel ``GradScaler`` uses
    (no public equivalent in 2.13)."""
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)


def amp_update_scale_(scale, tracker, found_inf, growth: float, backoff: float, interval: int):
    """``GradScaler``'s in-place scale update, ``torch._amp_update_scale_`` (no public
    equivalent in 2.13): back off after an overflow, grow after ``interval`` clean steps."""
    torch._amp_update_scale_(scale, tracker, found_inf, growth, backoff, interval)


def foreach_copy_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``torch._foreach_copy_``: one fused copy of many tensors (DDP's bucketing uses it)."""
    torch._foreach_copy_(targets, sources)


def set_schedule_loss(schedule, loss_fn) -> None:
    """Replace a ``torch.distributed.pipelining`` schedule's loss function after it was built:
    its private ``_loss_fn`` (2.13; the public API takes it only in the constructor)."""
    schedule._loss_fn = loss_fn
