"""What the sharding transforms share: resolving the mesh they act on; the order checks live in
``torchdist._model_record`` (one phase per transform, one table of reasons)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from torchdist._model_record import MODEL_ORDER, check_order
from torchdist.errors import ShardingError, TopologyError
from torchdist.topology import Topology

__all__ = ["resolve_mesh", "check_order", "check_has_parameters", "MODEL_ORDER"]


def resolve_mesh(over: Any, axes: tuple[str, ...], *, transform: str):
    """The DeviceMesh a model transform runs over.

    ``over`` is a live ``Topology`` (its ``axes``, those of size 1 dropped unless all are) or a
    ``DeviceMesh`` passed as is.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(over, DeviceMesh):
        return over
    if not isinstance(over, Topology):
        raise TopologyError(
            f"{transform} runs over a live Topology or a DeviceMesh, got {type(over).__name__}."
        )
    if not over.is_live:
        raise TopologyError(
            f"{transform} needs a live topology (one with a mesh): use the topology that "
            "`with td.distributed(topo) as topo:` yields, or pass topo.mesh[axis]."
        )
    for axis in axes:
        over._axis_names(axis)  # unknown axis -> TopologyError naming the axes
    used = tuple(a for a in axes if over.size(a) > 1) or axes[-1:]
    return over.mesh[used] if len(used) > 1 else over.submesh(used[0])


def check_has_parameters(model: nn.Module, transform: str) -> None:
    if not any(True for _ in model.parameters()):
        raise ShardingError(
            f"{transform}: {type(model).__name__} has no parameters, so there is nothing to "
            "distribute. Apply it to the model that owns the parameters."
        )
