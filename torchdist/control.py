"""Process control over a topology: `is_main`, `main_first`, `barrier`, `print0`,
`split_between_ranks`, `any_rank` / `all_ranks` (cross-rank flags), `stop_at_shortest` and
`join` (uneven inputs), `find_executable_batch_size`, `set_seed`, `sync_rng`.

Each takes the topology it acts on. On a one-process topology that is not live they do the
obvious single-process thing (no collectives), so the same script runs with and without a
launcher.

Example::

    with td.main_first(topo):                # rank 0 downloads/preprocesses, the others then read
        ds = load_or_build_dataset(cache_dir)
    mine = td.split_between_ranks(prompts, topo)
    td.print0(topo, f"{len(mine)} prompts on rank 0")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from torchdist._batch_size import find_executable_batch_size
from torchdist._join import join
from torchdist._rng import set_seed, sync_rng
from torchdist.collectives import Axis, resolve_group
from torchdist.errors import TopologyError
from torchdist.topology import Topology

__all__ = [
    "is_main",
    "main_first",
    "barrier",
    "print0",
    "split_between_ranks",
    "any_rank",
    "all_ranks",
    "stop_at_shortest",
    "join",
    "find_executable_batch_size",
    "set_seed",
    "sync_rng",
]


def is_main(topo: Topology, *, local: bool = False) -> bool:
    """True on global rank 0 (``local=True``: local rank 0 of each host). Communicates nothing."""
    return (topo.local_rank if local else topo.rank) == 0


def barrier(topo: Topology, *, axis: Axis = None) -> None:
    """Wait until every rank of ``topo`` (or of its ``axis`` groups) arrives. One ``barrier``."""
    import torch.distributed as dist

    group = resolve_group(topo, axis)
    if group is not None:
        dist.barrier(group=group)


@contextlib.contextmanager
def main_first(topo: Topology, *, local: bool = False) -> Iterator[None]:
    """Run the body on the main rank first, then on every other rank.

    For work whose result the others reuse: a download, a tokenised cache. ``local=True`` lets
    local rank 0 of every host go first (a per-host cache). Communicates: one world barrier on
    every rank (before the body on the others, after it on the main rank).
    """
    main = is_main(topo, local=local)
    if not main:
        barrier(topo)
    yield
    if main:
        barrier(topo)


def print0(topo: Topology, *args: Any, **print_kwargs: Any) -> None:
    """``print`` on global rank 0 only. Communicates nothing."""
    if topo.rank == 0:
        print(*args, **print_kwargs)


def any_rank(flag: bool, topo: Topology, *, axis: Axis = None) -> bool:
    """True on every rank if ``flag`` is true on any rank of ``topo`` (or of its ``axis`` group).

    The cross-rank flag for early stopping: a rank that wants to stop raises its flag, and
    every rank learns it at the same call, so all leave the loop together instead of the others
    waiting forever in the next step's collective. Every rank must call it (each step, or every
    k-th). Communicates: one ``all_reduce`` (max) of one int64 (on the device for NCCL).

    Example::

        for batch in loader:
            state, metrics = step(state, batch)
            if td.any_rank(bool(metrics["loss"] < target), topo):
                break
    """
    return _reduce_flag(flag, topo, axis, "max")


def all_ranks(flag: bool, topo: Topology, *, axis: Axis = None) -> bool:
    """True on every rank if ``flag`` is true on every rank of ``topo`` (or its ``axis`` group).
    Communicates: one ``all_reduce`` (min) of one int64."""
    return _reduce_flag(flag, topo, axis, "min")


def stop_at_shortest(batches: Iterable[Any], topo: Topology, *, axis: Axis = None) -> Iterator[Any]:
    """Yield ``batches`` while every rank still has one; stop every rank together at the first
    rank that runs out.

    For uneven inputs (ranks with different numbers of batches) with ``replicate`` or
    ``sync_grads``: without it, a rank that ran out leaves its peers waiting in the next
    gradient all-reduce until the timeout. Each rank's extra batches are not used; ``join``
    keeps them for a ``replicate``d model whose loop issues no other collective.
    Communicates: one ``all_reduce`` (min) of one int64 per batch, and one
    when the shortest rank ends.

    Example::

        for batch in td.stop_at_shortest(my_uneven_loader, topo):
            state, metrics = step(state, batch)
    """
    iterator = iter(batches)
    while True:
        try:
            batch, more = next(iterator), True
        except StopIteration:
            batch, more = None, False
        if not all_ranks(more, topo, axis=axis):
            return
        yield batch


def _reduce_flag(flag: bool, topo: Topology, axis: Axis, op: str) -> bool:
    from torchdist.collectives import all_reduce

    if isinstance(flag, torch.Tensor):
        if flag.numel() != 1:
            raise TopologyError(f"a cross-rank flag is one value, got a tensor of {flag.numel()}.")
        flag = bool(flag.item())
    device = topo.device if topo.backend == "nccl" else "cpu"
    value = torch.tensor([int(bool(flag))], dtype=torch.int64, device=device)
    return bool(all_reduce(value, topo, op=op, axis=axis, check=False).item())


def split_between_ranks(
    seq_or_tree: Any, topo: Topology, *, pad: bool = False, axis: Axis = None
) -> Any:
    """This rank's contiguous share of a sequence (or of each value of a mapping).

    Over ``n`` items and ``k`` ranks, ranks below ``n % k`` get ``n // k + 1`` items, the rest
    ``n // k``. With ``pad=True`` every rank gets ``ceil(n / k)``, short ranks repeating the last
    item (drop the repeats when gathering results). ``axis="dp"`` splits between data-parallel
    groups, so tensor-parallel peers get the same share. Sequences are lists, tuples, strings,
    tensors (along dim 0) and anything sliceable with ``len``. Communicates nothing.

    Example::

        >>> [split_between_ranks(list(range(5)), Topology(world_size=2, rank=r)) for r in (0, 1)]
        [[0, 1, 2], [3, 4]]
    """
    if axis is None:
        index, count = topo.rank, topo.world_size
    else:
        index, count = topo.index(axis), topo.size(axis)
    if isinstance(seq_or_tree, Mapping):
        lengths = {key: len(value) for key, value in seq_or_tree.items()}
        if len(set(lengths.values())) > 1:
            raise TopologyError(
                f"split_between_ranks of a mapping needs values of one length, got {lengths}."
            )
        return type(seq_or_tree)({k: _split(v, index, count, pad) for k, v in seq_or_tree.items()})
    return _split(seq_or_tree, index, count, pad)


def _split(seq: Any, index: int, count: int, pad: bool) -> Any:
    n = len(seq)
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    part = seq[start : start + base + (index < extra)]
    if not pad:
        return part
    want = math.ceil(n / count)
    missing = want - len(part)
    if missing == 0:
        return part
    if n == 0:
        raise TopologyError(
            "split_between_ranks(pad=True) of an empty sequence has nothing to repeat."
        )
    last = seq[n - 1 : n]
    if isinstance(seq, torch.Tensor):
        return torch.cat([part, last.expand(missing, *last.shape[1:])])
    return part + last * missing
