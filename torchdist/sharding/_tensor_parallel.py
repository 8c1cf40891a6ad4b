"""`parallelize(model, mesh, plan)`: tensor parallelism from a plan of module-name patterns.

The plan maps fnmatch patterns over module names (``"blocks.*.mlp.up"``) to a style:

* ``"colwise"``: split a Linear's output features; its output stays sharded (feeds a rowwise).
* ``"rowwise"``: split a Linear's input features; partial outputs are summed (an all-reduce,
  or a reduce-scatter to the sequence dim when the input is sequence-parallel).
* ``"sequence"``: run a norm/dropout on a slice of the sequence (sequence parallelism).
* ``"embedding"``: split an Embedding's table by rows (vocabulary); outputs are summed.
* ``"output"``: a colwise LM head whose logits are gathered back to full size.
* any ``torch.distributed.tensor.parallel.ParallelStyle`` for anything else.

Parameters become DTensors on the ``tp`` mesh; their names are unchanged. A model whose forward
reshapes by a head count must use the local head count (``heads // tp``), as in torchtitan.
Apply before ``shard`` (2-D: tp inside, dp_shard outside), the order torchtitan uses.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from torchdist.errors import ShardingError
from torchdist.marks import mark
from torchdist.sharding._common import check_has_parameters, check_not_applied, resolve_mesh

__all__ = ["parallelize", "STYLES"]

STYLES = ("colwise", "rowwise", "sequence", "embedding", "output")

_CONFLICTS = {
    "shard": "tensor parallelism must be applied before FSDP (tp inside, dp_shard outside).",
    "replicate": "tensor parallelism must be applied before replicate.",
    "parallelize": "the model is already tensor-parallel; put every pattern in one plan.",
    "deepspeed": "DeepSpeed does not compose with DTensor tensor parallelism.",
}


def _style(name: str | Any):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        ParallelStyle,
        RowwiseParallel,
        SequenceParallel,
    )

    if isinstance(name, ParallelStyle):
        return name
    styles = {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "sequence": lambda: SequenceParallel(),
        "embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
        "output": lambda: ColwiseParallel(output_layouts=Replicate()),
    }
    if name not in styles:
        raise ShardingError(
            f"parallelize: unknown style {name!r}; use one of {list(STYLES)} or a ParallelStyle."
        )
    return styles[name]()


def parallelize(model: nn.Module, mesh: Any, plan: Mapping[str, str | Any]) -> nn.Module:
    """Apply tensor parallelism to ``model`` over ``mesh`` (a live Topology's ``tp`` axis or a
    1-D mesh) following ``plan``; return the same module.

    Communicates, per step: for each colwise/rowwise pair, an all-reduce of the rowwise output
    in the forward and of the colwise input's gradient in the backward (over ``tp``); with
    sequence parallelism, all-gathers and reduce-scatters along the sequence instead.

    Example::

        model = parallelize(model, topo, {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"})
    """
    from torch.distributed.tensor.parallel import parallelize_module

    check_has_parameters(model, "parallelize")
    check_not_applied(model, "parallelize", _CONFLICTS)
    if not plan:
        raise ShardingError("parallelize: the plan is empty; map module-name patterns to styles.")
    names = [name for name, _ in model.named_modules() if name]
    for pattern in plan:
        if not fnmatch.filter(names, pattern):
            close = [n for n in names if n.split(".")[-1] == pattern.split(".")[-1]][:5]
            raise ShardingError(
                f"parallelize: pattern {pattern!r} matches no module of {type(model).__name__}"
                + (f"; modules with that leaf name: {close}" if close else "")
                + ". Patterns are fnmatch globs over names from model.named_modules()."
            )
    tp_mesh = resolve_mesh(mesh, ("tp",), transform="parallelize")
    if tp_mesh.ndim != 1:
        raise ShardingError(
            f"parallelize needs a 1-D tensor-parallel mesh, got {tp_mesh.ndim}-D "
            f"{tp_mesh.mesh_dim_names}; pass the topology (its 'tp' axis) or topo.mesh['tp']."
        )
    parallelize_module(model, tp_mesh, {pattern: _style(style) for pattern, style in plan.items()})
    return mark(model, "parallelize")
