"""`distribution_of(model)`: is this model already distributed, and how — torchdist or raw torch.

Read from the model itself (its module types, its parameters' DTensor meshes, FSDP2's and DDP's
own state) and from torchdist's record, so a model ``fully_shard``-ed, wrapped in
``DistributedDataParallel`` or ``replicate``-d by hand answers the same as one distributed by
``shard`` / ``replicate``. Communicates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchdist._model_record import record_of

__all__ = ["Distribution", "distribution_of", "distributed_by_hand"]


@dataclass(frozen=True)
class Distribution:
    """How a model is distributed.

    ``data_parallel``: who averages its gradients across data-parallel ranks — ``"fsdp2"``,
    ``"ddp"``, ``"deepspeed"`` or None. ``dp_mesh`` / ``dp_axes``: the mesh FSDP2 (or DDP built
    over a mesh, or torchdist's ``replicate``) runs over and its dimension names; ``dp_group``:
    a raw DDP's process group (None for torch's composable ``replicate`` until its first
    forward, which is when it builds its DDP).
    ``tp_mesh``: the mesh of tensor-parallel DTensor parameters (None without TP).
    ``deepspeed_engine``: the model is a DeepSpeed engine. ``applied``: the torchdist model
    transforms recorded on it, oldest first; ``by_torchdist``: the data-parallel owner was applied
    by torchdist (False when by raw torch or when there is none).
    """

    data_parallel: str | None = None
    dp_mesh: Any = None
    dp_axes: tuple[str, ...] = ()
    dp_group: Any = None
    tp_mesh: Any = None
    deepspeed_engine: bool = False
    applied: tuple[str, ...] = ()
    by_torchdist: bool = False

    @property
    def is_distributed(self) -> bool:
        """True when the model's gradients are synced by it or its parameters are DTensors."""
        return self.data_parallel is not None or self.tp_mesh is not None

    @property
    def tp_axes(self) -> tuple[str, ...]:
        return tuple(self.tp_mesh.mesh_dim_names or ()) if self.tp_mesh is not None else ()


_BY_TORCHDIST = {"fsdp2": "shard", "ddp": "replicate", "deepspeed": "deepspeed"}
_OWNER = {v: k for k, v in _BY_TORCHDIST.items()}


def distribution_of(model: Any) -> Distribution:
    """What distributes ``model``: data-parallel owner and mesh, tensor-parallel mesh, engine.

    Communicates nothing. Works on models distributed by torchdist and by raw torch alike.

    Example::

        d = td.distribution_of(shard(model, topo))
        assert d.data_parallel == "fsdp2" and d.dp_axes == ("dp_shard",)
    """
    names = record_of(model).names
    kind = type(model)
    if kind.__module__.startswith("deepspeed") and hasattr(model, "backward"):
        inner = getattr(model, "module", None)
        tp = _tp_mesh(inner, None) if inner is not None else None
        return Distribution("deepspeed", None, (), None, tp, True, names, "deepspeed" in names)
    owner, dp_mesh, dp_group = _data_parallel(model)
    ours = next((t for t in reversed(record_of(model).transforms) if t.name in _OWNER), None)
    if ours is not None:  # what torchdist recorded wins: replicate's own group has no mesh
        owner, dp_mesh = _OWNER[ours.name], ours.mesh if ours.mesh is not None else dp_mesh
    tp = _tp_mesh(model, dp_mesh)
    recorded_tp = record_of(model).find("parallelize")
    if recorded_tp is not None and recorded_tp.mesh is not None:
        tp = recorded_tp.mesh
    axes = tuple(dp_mesh.mesh_dim_names or ()) if dp_mesh is not None else ()
    by_us = owner is not None and _BY_TORCHDIST[owner] in names
    return Distribution(owner, dp_mesh, axes, dp_group, tp, False, names, by_us)


def _data_parallel(model: Any) -> tuple[str | None, Any, Any]:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    from torchdist._compat import composable_ddp_instance, fsdp_mesh, is_composable_ddp

    if isinstance(model, DistributedDataParallel):
        return "ddp", getattr(model, "device_mesh", None), model.process_group
    if is_composable_ddp(model):
        ddp = composable_ddp_instance(model)
        return "ddp", getattr(ddp, "device_mesh", None), getattr(ddp, "process_group", None)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if units:
        mesh = next((m for m in map(fsdp_mesh, units) if m is not None), None)
        return "fsdp2", mesh, None
    return None, None, None


def _tp_mesh(model: Any, dp_mesh: Any) -> Any:
    """The mesh of DTensor parameters that is not the data-parallel mesh (FSDP2's own DTensors
    live on ``dp_mesh``; under FSDP2 + TP they live on the joint mesh, whose non-dp dims are tp)."""
    from torch.distributed.tensor import DTensor

    dp_names = set(dp_mesh.mesh_dim_names or ()) if dp_mesh is not None else set()
    for p in model.parameters():
        if not isinstance(p, DTensor):
            continue
        mesh = p.device_mesh
        names = tuple(mesh.mesh_dim_names or ())
        if dp_mesh is not None and (mesh is dp_mesh or (names and set(names) <= dp_names)):
            continue
        others = tuple(n for n in names if n not in dp_names)
        if dp_names and others and len(others) < len(names):
            return mesh[others] if len(others) > 1 else mesh[others[0]]
        return mesh
    return None


def distributed_by_hand(model: Any) -> str | None:
    """What raw torch (not a torchdist transform) did to ``model`` to distribute it, or None."""
    found = distribution_of(model)
    names = set(found.applied)
    if found.data_parallel == "ddp" and "replicate" not in names:
        return "DistributedDataParallel"
    if found.data_parallel == "fsdp2" and "shard" not in names:
        return "fully_shard (FSDP2)"
    if found.tp_mesh is not None and "parallelize" not in names:
        return "DTensor parameters (tensor parallel)"
    return None
