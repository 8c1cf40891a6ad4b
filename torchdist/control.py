"""Process control over a topology: `is_main`, `main_first`, `barrier`, `print0`,
`split_between_ranks`, `set_seed`, `sync_rng`.

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
from collections.abc import Iterator, Mapping
from typing import Any

import torch

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
