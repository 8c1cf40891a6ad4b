"""`to_device`: move a batch (any pytree of tensors) or a model to the topology's device.

Example::

    model = td.to_device(model, topo)
    for batch in loader:
        x, y = td.to_device(batch, topo)
"""

from __future__ import annotations

from typing import Any, TypeVar

import optree
import torch

from torchdist.topology import Topology

__all__ = ["to_device"]

T = TypeVar("T")


def to_device(
    tree: T, topo: Topology | torch.device | str, *, non_blocking: bool | None = None
) -> T:
    """``tree`` with every tensor on ``topo.device``; a module is moved in place and returned.

    Leaves that are not tensors but have a ``.to`` method (a Hugging Face ``BatchEncoding``) are
    moved with it; other leaves are returned as they are. ``non_blocking`` defaults to True when
    copying to a GPU (a copy from pinned memory then overlaps compute), False otherwise.
    Communicates nothing.
    """
    device = topo.device if isinstance(topo, Topology) else torch.device(topo)
    if non_blocking is None:
        non_blocking = device.type == "cuda"
    if isinstance(tree, torch.nn.Module):
        return tree.to(device, non_blocking=non_blocking)

    def move(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return leaf.to(device, non_blocking=non_blocking)
        to = getattr(leaf, "to", None)
        return to(device) if callable(to) else leaf

    return optree.tree_map(move, tree, none_is_leaf=False)
