"""The tensors of a model, grouped by identity: one group per stored tensor, tied names together."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["Slot", "Group", "tensor_groups", "group_bytes"]


@dataclass(frozen=True)
class Slot:
    """One place a tensor sits: ``owner._parameters[attr]`` or ``owner._buffers[attr]``."""

    owner: nn.Module
    attr: str
    name: str  # fully qualified
    is_param: bool


@dataclass(frozen=True)
class Group:
    """One tensor and every slot that holds it (more than one when weights are tied)."""

    name: str  # the first fully qualified name, the one checkpoints store
    tensor: torch.Tensor
    slots: tuple[Slot, ...]
    persistent: bool  # False for non-persistent buffers: never in a checkpoint

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)


def tensor_groups(model: nn.Module) -> list[Group]:
    """Every parameter and buffer of ``model``, in registration order, grouped by identity."""
    order: list[int] = []
    slots: dict[int, list[Slot]] = {}
    tensors: dict[int, torch.Tensor] = {}
    persistent: dict[int, bool] = {}
    seen: set[tuple[int, str]] = set()
    for mname, module in model.named_modules(remove_duplicate=False):
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for attr, tensor in table.items():
                if tensor is None or (id(module), attr) in seen:
                    continue
                seen.add((id(module), attr))
                key = id(tensor)
                if key not in slots:
                    order.append(key)
                    slots[key], tensors[key], persistent[key] = [], tensor, False
                name = f"{mname}.{attr}" if mname else attr
                slots[key].append(Slot(module, attr, name, is_param))
                if is_param or attr not in module._non_persistent_buffers_set:
                    persistent[key] = True
    return [Group(slots[k][0].name, tensors[k], tuple(slots[k]), persistent[k]) for k in order]


def group_bytes(group: Group, dtype: torch.dtype | None = None) -> int:
    """Bytes ``group``'s tensor takes once loaded (floating tensors cast to ``dtype`` if given)."""
    tensor = group.tensor
    size = tensor.element_size()
    if dtype is not None and tensor.is_floating_point():
        size = torch.empty((), dtype=dtype).element_size()
    return math.prod(tensor.shape) * size
