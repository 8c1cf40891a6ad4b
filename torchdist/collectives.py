"""Pytree collectives: `all_reduce`, `gather`, `gather_object`, `broadcast`, `pad_across_ranks`
(and, built on `gather`, `gather_for_metrics` in `metrics.py`).

Each takes a pytree (optree: dicts, lists, tuples, namedtuples, dataclasses registered with
optree) and says what it runs over: a live ``Topology`` (the whole world, or ``axis=`` one mesh
axis such as ``"dp"`` or ``"tp"``, or a tuple of axes), or a one-dimensional ``DeviceMesh``.
On a one-process topology that is not live they return their input unchanged, so single-process
code needs no branch.

They never modify their input and they batch: leaves of one dtype travel in one flat buffer, and
shape metadata for every leaf travels in one small integer tensor, so a metrics dict of ten
scalars costs one collective, not ten.

Example::

    with td.distributed(td.Topology.from_env()) as topo:
        metrics = td.all_reduce({"loss": loss, "acc": acc}, topo, op="mean", axis="dp")
        preds = td.gather_for_metrics(logits.argmax(-1), topo, loader=val_loader)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import optree
import torch

from torchdist import _agree, _packing
from torchdist.errors import CollectiveError, TopologyError
from torchdist.topology import Topology

__all__ = [
    "all_reduce",
    "gather",
    "gather_object",
    "broadcast",
    "pad_across_ranks",
    "resolve_group",
]

Over = Any  # Topology | DeviceMesh; kept loose so importing this module imports no mesh code
Axis = str | Sequence[str] | None


# --------------------------------------------------------------------------- groups
def resolve_group(over: Over, axis: Axis = None):
    """The process group ``over``/``axis`` names, or ``None`` for a one-process, non-live world.

    ``over`` is a live ``Topology`` (``axis=None``: every rank; ``"dp"``, ``"tp"``, ... : that
    mesh axis; a tuple: those axes flattened) or a 1-D ``DeviceMesh``.
    """
    import torch.distributed as dist

    if isinstance(over, Topology):
        over.check_not_ended()
        if not over.is_live:
            if over.world_size == 1:
                return None
            raise TopologyError(
                f"collectives need a live topology, but this one (world_size {over.world_size}) "
                "has no process group. Use the topology that `with td.distributed(topo) as "
                "topo:` yields."
            )
        if axis is None:
            return dist.distributed_c10d._get_default_group()
        return over.submesh(axis).get_group()
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(over, DeviceMesh):
        if axis is not None:
            over = over[axis]
        if over.ndim != 1:
            raise TopologyError(
                f"a {over.ndim}-D mesh {over.mesh_dim_names} names no single group; pick one "
                "axis (axis='dp_shard') or flatten the axes you mean."
            )
        return over.get_group()
    if isinstance(over, dist.ProcessGroup):
        return over
    raise TopologyError(
        f"cannot communicate over a {type(over).__name__}; pass a live Topology or a 1-D "
        "DeviceMesh."
    )


def _size_rank(group) -> tuple[int, int]:
    import torch.distributed as dist

    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _spec(leaf: torch.Tensor, skip: int | None = None) -> str | tuple[str, str]:
    """What must agree across ranks about ``leaf`` (dim ``skip`` may differ), and what to show."""
    dtype = str(leaf.dtype).removeprefix("torch.")
    shown = f"{dtype}{tuple(leaf.shape)}"
    if skip is None:
        return shown
    return f"{dtype}{tuple('*' if i == skip else n for i, n in enumerate(leaf.shape))}", shown


def _agree_or_raise(tree, describe, group, what: str, check, *, syncs_anyway: bool) -> None:
    if _agree.should_check(check, group, syncs_anyway=syncs_anyway):
        leaves = optree.tree_leaves(tree, none_is_leaf=False)
        device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), "cpu")
        _agree.check_agree(*_agree.describe_leaves(tree, describe), group, what, device)


def _tensor_leaves(tree: Any, what: str) -> tuple[list[torch.Tensor], Any]:
    paths, leaves, treedef = optree.tree_flatten_with_path(tree, none_is_leaf=False)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            where = "/".join(map(str, path)) or "<root>"
            raise CollectiveError(
                f"{what} needs tensors, but the leaf at {where} is a {type(leaf).__name__}. "
                "Convert it with torch.as_tensor, or use gather_object/broadcast for objects."
            )
    return leaves, treedef


# --------------------------------------------------------------------------- collectives
def all_reduce(
    tree: Any,
    over: Over,
    *,
    op: Literal["sum", "mean", "max", "min"] = "sum",
    axis: Axis = None,
    check: bool | None = None,
) -> Any:
    """Reduce every tensor of ``tree`` across the ranks of ``over``/``axis``; return new tensors.

    Communicates: one ``all_reduce`` per dtype present (leaves are packed into one buffer);
    ``"mean"`` is a sum divided by the group size, since gloo has no AVG. ``check`` (default: on
    for gloo, and always under ``TORCH_DISTRIBUTED_DEBUG=DETAIL``) first all-gathers a 16-byte
    fingerprint of keys, dtypes and shapes, so ranks passing different trees get a
    ``CollectiveError`` naming the leaf instead of mixed values.

    Example::

        >>> td.all_reduce({"loss": loss}, topo, op="mean", axis="dp")
    """
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
           "min": dist.ReduceOp.MIN}  # fmt: skip
    if op not in ops:
        raise CollectiveError(f"unknown reduction {op!r}; expected one of {list(ops)}.")
    leaves, treedef = _tensor_leaves(tree, "all_reduce")
    for leaf in leaves:
        if leaf.dtype not in _packing.REDUCIBLE:
            raise CollectiveError(
                f"all_reduce cannot add or compare {leaf.dtype} tensors across ranks (the "
                "backends have no arithmetic for it); cast to float32 first."
            )
    if op == "mean":
        for leaf in leaves:
            if not (leaf.is_floating_point() or leaf.is_complex()):
                raise CollectiveError(
                    f"op='mean' of a {leaf.dtype} tensor would round; cast it to a floating dtype "
                    "first, or use op='sum'."
                )
    group = resolve_group(over, axis)
    size, _ = _size_rank(group)
    if group is None:
        return optree.tree_unflatten(treedef, [leaf.clone() for leaf in leaves])
    _agree_or_raise(tree, _spec, group, "all_reduce", check, syncs_anyway=False)
    reduced = _packing.coalesced(leaves, lambda flat: dist.all_reduce(flat, ops[op], group=group))
    if op == "mean":
        reduced = [t.div_(size) for t in reduced]
    return optree.tree_unflatten(treedef, reduced)


def gather(tree: Any, over: Over, *, axis: Axis = None, check: bool | None = None) -> Any:
    """Concatenate every tensor of ``tree`` along dim 0 across ranks, in group-rank order.

    Tensors may differ in their first dimension between ranks (each rank's rows are kept, no
    padding is left); 0-d tensors count as one row. Other dimensions and dtypes must agree.

    Communicates: one ``all_gather`` of shape metadata, then one ``all_gather_single``
    per leaf, of its bytes (so any dtype moves, float8 included), padded to the longest rank
    when lengths differ.

    Example::

        >>> td.gather(torch.tensor([rank]), topo)        # tensor([0, 1, ..., N-1]) on every rank
    """
    import torch.distributed as dist

    leaves, treedef = _tensor_leaves(tree, "gather")
    leaves = [leaf.reshape(1) if leaf.dim() == 0 else leaf.contiguous() for leaf in leaves]
    group = resolve_group(over, axis)
    if group is None:
        return optree.tree_unflatten(treedef, [leaf.clone() for leaf in leaves])
    size, _ = _size_rank(group)
    _agree_or_raise(
        tree, lambda x: _spec(x.reshape(1) if x.dim() == 0 else x, skip=0), group, "gather",
        check, syncs_anyway=True,
    )  # fmt: skip
    meta = _packing.all_gather_metadata(leaves, group)
    out = []
    for index, leaf in enumerate(leaves):
        rows = meta[:, index, :]
        _packing.check_same(rows, index, skip_first_dim=True)
        lengths = rows[:, 2].tolist()
        longest = max(lengths)
        if leaf.shape[0] < longest:
            pad = leaf.new_zeros((longest - leaf.shape[0], *leaf.shape[1:]))
            leaf = torch.cat([leaf, pad])
        data = _packing.as_bytes(leaf)
        received = data.new_empty(size * data.numel())
        dist.all_gather_single(received, data, group=group)
        buffer = _packing.from_bytes(received, leaf.dtype, (size * longest, *leaf.shape[1:]))
        if len(set(lengths)) == 1:
            out.append(buffer)
        else:
            parts = buffer.split(longest)
            out.append(torch.cat([part[:n] for part, n in zip(parts, lengths)]))
    return optree.tree_unflatten(treedef, out)


def gather_object(obj: Any, over: Over, *, axis: Axis = None) -> list[Any]:
    """Every rank's picklable ``obj`` as a list in rank order; lists are concatenated.

    ``gather_object([r], topo)`` gives ``[0, 1, ..., N-1]`` (each rank's list flattened into
    one), like Accelerate's; any other object gives ``[obj_rank0, obj_rank1, ...]``.

    Communicates: ``all_gather_object`` (pickle; for small objects such as strings and dicts).
    """
    import torch.distributed as dist

    group = resolve_group(over, axis)
    size, _ = _size_rank(group)
    if group is None:
        gathered = [obj]
    else:
        gathered = [None] * size
        dist.all_gather_object(gathered, obj, group=group)
    if isinstance(obj, list):
        return [item for part in gathered for item in part]
    return gathered


def broadcast(
    tree: Any, over: Over, *, src: int = 0, axis: Axis = None, check: bool | None = None
) -> Any:
    """Group rank ``src``'s ``tree`` on every rank; tensors and other leaves alike.

    Other ranks pass a tree of the same structure; their leaves' values, shapes and dtypes are
    replaced by ``src``'s (so a placeholder works). Returns new objects.

    Communicates: one ``broadcast`` of tensor metadata, one ``broadcast`` of every tensor's
    bytes packed into one buffer (so any dtype moves, float8 included), and one
    ``broadcast_object_list`` when the tree has non-tensor leaves.
    """
    import torch.distributed as dist

    leaves, treedef = optree.tree_flatten(tree, none_is_leaf=False)
    group = resolve_group(over, axis)
    size, rank = _size_rank(group)
    if not 0 <= src < size:
        raise CollectiveError(f"src {src} is not a rank of a group of {size}.")
    if group is None:
        return optree.tree_unflatten(
            treedef, [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        )
    _agree_or_raise(
        tree, lambda x: "tensor" if isinstance(x, torch.Tensor) else "object", group,
        "broadcast", check, syncs_anyway=True,
    )  # fmt: skip
    is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
    tensors = [x for x, t in zip(leaves, is_tensor) if t]
    meta = _packing.metadata(tensors)
    count = torch.tensor([len(tensors), len(leaves)], dtype=torch.int64)
    dist.broadcast(count, group_src=src, group=group)
    if count.tolist() != [len(tensors), len(leaves)]:
        raise CollectiveError(
            f"rank {rank} holds {len(leaves)} leaves ({len(tensors)} tensors) but the source "
            f"holds {int(count[1])} ({int(count[0])} tensors); every rank must pass the same "
            "structure."
        )
    dist.broadcast(meta, group_src=src, group=group)
    if rank != src:
        device = tensors[0].device if tensors else torch.device("cpu")
        tensors = [
            torch.empty(tuple(int(d) for d in row[2 : 2 + int(row[1])]),
                        dtype=_packing.DTYPES[int(row[0])], device=device)
            for row in meta
        ]  # fmt: skip
    tensors = _packing.moved_as_bytes(
        tensors, lambda flat: dist.broadcast(flat, group_src=src, group=group)
    )
    objects = [x for x, t in zip(leaves, is_tensor) if not t]
    if objects:
        dist.broadcast_object_list(objects, group_src=src, group=group)
    tensor_iter, object_iter = iter(tensors), iter(objects)
    out = [next(tensor_iter) if t else next(object_iter) for t in is_tensor]
    return optree.tree_unflatten(treedef, out)


def pad_across_ranks(
    tree: Any,
    over: Over,
    *,
    dim: int = 0,
    value: float = 0,
    pad_first: bool = False,
    axis: Axis = None,
    check: bool | None = None,
) -> Any:
    """Pad every tensor along ``dim`` to the longest rank's length, with ``value``.

    Communicates: one ``all_gather`` of shape metadata (after the fingerprint check, see
    ``all_reduce``: tensors whose number of dims or other dims differ across ranks, or a ``dim``
    out of range, are a ``CollectiveError``).

    Example::

        >>> td.pad_across_ranks(torch.ones(rank + 1), topo)   # every rank: length N
    """
    leaves, treedef = _tensor_leaves(tree, "pad_across_ranks")

    def valid(leaf: torch.Tensor) -> bool:
        return -leaf.dim() <= dim < leaf.dim()

    def spec(leaf: torch.Tensor) -> str:
        return _spec(leaf, dim % leaf.dim()) if valid(leaf) else f"{_spec(leaf)} (no dim {dim})"

    group = resolve_group(over, axis)
    if group is not None:  # agree first, so a bad dim on one rank fails every rank, not a hang
        _agree_or_raise(tree, spec, group, "pad_across_ranks", check, syncs_anyway=True)
    paths = optree.tree_paths(tree, none_is_leaf=False)
    for path, leaf in zip(paths, leaves):
        if not valid(leaf):
            raise CollectiveError(
                f"pad_across_ranks(dim={dim}): the leaf at {'/'.join(map(str, path)) or '<root>'} "
                f"has shape {tuple(leaf.shape)}, which has no dim {dim} (valid: "
                f"{-leaf.dim()}..{leaf.dim() - 1}). Pass a dim every leaf has."
            )
    if group is None:
        return optree.tree_unflatten(treedef, [leaf.clone() for leaf in leaves])
    meta = _packing.all_gather_metadata(leaves, group)
    out = []
    for index, leaf in enumerate(leaves):
        d = dim % leaf.dim()
        longest = int(meta[:, index, 2 + d].max())
        missing = longest - leaf.shape[d]
        if missing == 0:
            out.append(leaf.clone())
            continue
        pad_shape = list(leaf.shape)
        pad_shape[d] = missing
        pad = leaf.new_full(pad_shape, value)
        out.append(torch.cat([pad, leaf] if pad_first else [leaf, pad], dim=d))
    return optree.tree_unflatten(treedef, out)

