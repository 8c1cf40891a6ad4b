"""Which mesh axes a model's transforms use, and an error for an axis larger than 1 none uses.

An axis of size > 1 that no transform uses means ranks that silently do the same work twice
(``--mesh dp_shard=2,tp=2`` without ``parallelize``: the two tp peers train on the same data).
The model transforms record their names on the model (``torchdist.marks.applied``); each name
uses these axes:

=============  ==========================  =========================================
transform      axes                        note
=============  ==========================  =========================================
shard          dp_shard, dp_replicate      HSDP when both are > 1
replicate      dp_replicate, dp_shard      DDP over the flattened ``"dp"`` axis
deepspeed      dp_replicate, dp_shard      ZeRO over the data-parallel ranks
parallelize    tp                          tensor parallel over a plan
pipeline       pp                          this rank's stages; the step runs the schedule
context_par..  cp                          a step transform: pass it in ``uses``
sync_grads     dp_replicate, dp_shard      a step transform: pass it in ``uses``
=============  ==========================  =========================================

``cp`` is used by the ``context_parallel`` step transform: pass it in ``uses``.

Communicates nothing (reads the topology's sizes and the model's marks).

Example::

    check_axes_used(topo, model, what="train_gpt.py")   # after the model transforms
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torchdist.errors import TopologyError
from torchdist.marks import applied
from torchdist.topology import AXES, Topology

__all__ = ["USES", "unused_axes", "check_axes_used"]

_DP = ("dp_replicate", "dp_shard")

#: the mesh axes each transform uses
USES: dict[str, tuple[str, ...]] = {
    "shard": _DP,
    "replicate": _DP,
    "deepspeed": _DP,
    "sync_grads": _DP,
    "parallelize": ("tp",),
    "pipeline": ("pp",),
    "context_parallel": ("cp",),
}

#: what to apply for an axis that nothing uses
_FIX = {
    "dp_shard": "shard(model, topo) (FSDP2), or replicate / sync_grads(topo)",
    "dp_replicate": "replicate(model, topo) (DDP), or shard(model, topo) for HSDP",
    "tp": "parallelize(model, topo, plan) (tensor parallel)",
    "pp": "pipeline(model, topo, schedule=...) with pipeline_value_and_grad (pipeline parallel)",
    "cp": "the context_parallel(topo) step transform (pass uses=('context_parallel',))",
}


def unused_axes(topo: Topology, model: Any, *, uses: Iterable[str] = ()) -> tuple[str, ...]:
    """Axes of ``topo`` larger than 1 that no transform applied to ``model`` (or named in
    ``uses``, e.g. ``("sync_grads",)``) uses, in mesh order. Communicates nothing."""
    from torchdist._distribution import distribution_of

    names = set(applied(model)) | set(uses)
    used = {axis for name in names for axis in USES.get(name, ())}
    found = distribution_of(model)  # raw torch too: fully_shard, DDP, parallelize_module
    if found.data_parallel is not None:
        used.update(_DP)
    if found.tp_mesh is not None:
        used.add("tp")
    return tuple(axis for axis in AXES if topo.size(axis) > 1 and axis not in used)


def check_axes_used(
    topo: Topology, model: Any, *, what: str = "the step", uses: Iterable[str] = ()
) -> None:
    """Raise ``TopologyError`` naming each axis > 1 that nothing uses and the transform that
    would. ``what`` names the caller in the message. Communicates nothing.

    Example::

        model = shard(model, topo)
        check_axes_used(topo, model, what="train.py")   # tp=2 here would raise
    """
    unused = unused_axes(topo, model, uses=uses)
    if not unused:
        return
    names = list(applied(model)) + list(uses)
    found = ", ".join(f"{axis}={topo.size(axis)}" for axis in unused)
    fixes = "; ".join(f"{axis}: {_FIX[axis]}" for axis in unused)
    raise TopologyError(
        f"{what}: mesh axis {found} is larger than 1 but no transform uses it (applied: "
        f"{names or 'none'}), so its ranks would repeat each other's work. Apply — {fixes}; "
        "or launch with that axis at 1."
    )
