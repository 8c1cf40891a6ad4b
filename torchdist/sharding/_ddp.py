"""`replicate(model, mesh)`: classic data parallelism (DDP), applied in place.

Every rank holds the whole model; gradients are all-reduced in buckets that overlap the backward
(torch's ``DistributedDataParallel`` reducer). Applied with torch's composable ``replicate``, so
the module keeps its class's behaviour and its parameter names (no ``module.`` prefix) and
checkpoints stay portable. ``accumulate`` uses DDP's ``no_sync`` on micro-steps.

torch 2.13's DDP constructor crashes on CPU when its process group was created under
``TORCH_DISTRIBUTED_DEBUG=DETAIL``; ``replicate`` then gives DDP its own group over the same
ranks, created at debug level INFO (see ``torchdist._compat.composable_replicate``). A hand-built
``DistributedDataParallel`` needs ``spawn(..., debug="INFO")``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from torchdist._compat import composable_replicate
from torchdist.errors import ShardingError
from torchdist.marks import mark
from torchdist.sharding._common import check_has_parameters, check_order, resolve_mesh

__all__ = ["replicate"]

def replicate(model: nn.Module, mesh: Any, *, bucket_mb: float = 25.0) -> nn.Module:
    """Make ``model`` data-parallel over ``mesh`` (a live Topology's ``"dp"`` axis, or a 1-D mesh).

    Communicates: an asynchronous all-reduce per ~``bucket_mb`` MB bucket of gradients during
    the backward (averaged over the group), and a broadcast of rank 0's parameters and buffers
    when applied, so every replica starts equal.

    Example::

        with td.distributed(td.Topology.from_env(dp_replicate=-1)) as topo:
            model = replicate(td.to_device(build_model(), topo), topo)
    """
    from torch.nn.parallel import DistributedDataParallel

    check_has_parameters(model, "replicate")
    check_order(model, "replicate")
    if isinstance(model, DistributedDataParallel):
        raise ShardingError("replicate: the model is already a DistributedDataParallel module.")
    dp_mesh = resolve_mesh(mesh, ("dp",), transform="replicate")
    if dp_mesh.ndim != 1:
        raise ShardingError(
            f"replicate needs a 1-D mesh, got {dp_mesh.ndim}-D {dp_mesh.mesh_dim_names}; pass "
            "the topology (its 'dp' axis is used) or one axis of the mesh."
        )
    composable_replicate(model, process_group=dp_mesh.get_group(), bucket_cap_mb=bucket_mb)
    return mark(model, "replicate", options={"bucket_mb": bucket_mb}, mesh=dp_mesh)
