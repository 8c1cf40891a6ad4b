"""`parallelize(model, mesh, plan)`: tensor parallelism from a plan of module-name patterns.

The plan maps fnmatch patterns over module names (``"blocks.*.mlp.up"``) to a style:

* ``"colwise"``: split a Linear's output features; its output stays sharded (feeds a rowwise).
* ``"rowwise"``: split a Linear's input features; partial outputs are summed (an all-reduce,
  or a reduce-scatter to the sequence dim when the input is sequence-parallel).
* ``"sequence"``: run a norm/dropout on a slice of the sequence (sequence parallelism).
* ``"embedding"``: split an Embedding's table by rows (vocabulary); outputs are summed.
* ``"output"``: a colwise LM head whose logits are gathered back to full size.
* any ``torch.distributed.tensor.parallel.ParallelStyle`` for anything else.
* Hugging Face's names (``colwise_gather_output``, ``embedding_rowwise``, ``rowwise_rep``, ...),
  so a HF model's own ``model.tp_plan`` works as is; see ``_tp_styles.py`` for the mapping and
  the styles refused (MoE, MLA, fused projections). ``nn.Linear``/``nn.Embedding`` only: GPT-2's
  ``Conv1D`` is refused with what to do instead.
* no plan at all: a transformers model's own plan (``_hf_plan.py``), with the source logged.

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
from torchdist.sharding._common import check_has_parameters, check_order, resolve_mesh
from torchdist.sharding._hf_plan import check_plan_fits, hf_tp_plan, log, retie, tied_groups
from torchdist.sharding._tp_styles import STYLES, check_plan_modules, resolve_plan

__all__ = ["parallelize", "STYLES"]


def parallelize(
    model: nn.Module, mesh: Any, plan: Mapping[str, str | Any] | None = None
) -> nn.Module:
    """Apply tensor parallelism to ``model`` over ``mesh`` (a live Topology's ``tp`` axis or a
    1-D mesh) following ``plan``; return the same module.

    ``plan=None``: the model's own plan (a transformers model's ``tp_plan``, ``_tp_plan`` or
    ``config.base_model_tp_plan``; see ``_hf_plan.py``), after checking that its attention heads
    divide by the tp size; which one was used is logged on ``torchdist.sharding`` (INFO) and kept
    as ``plan_source`` in the record. Tied parameters (an LM head tied to the embeddings) stay
    one parameter when their styles split them alike.

    Communicates, per step: for each colwise/rowwise pair, an all-reduce of the rowwise output
    in the forward and of the colwise input's gradient in the backward (over ``tp``); with
    sequence parallelism, all-gathers and reduce-scatters along the sequence instead.

    Example::

        model = parallelize(model, topo, {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"})
        hf = parallelize(AutoModelForCausalLM.from_config(config), topo)   # its own plan
    """
    from torch.distributed.tensor.parallel import parallelize_module

    check_has_parameters(model, "parallelize")
    check_order(model, "parallelize")
    source = "the plan given"
    if plan is None:
        plan, source = hf_tp_plan(model)
    if not plan:
        raise ShardingError("parallelize: the plan is empty; map module-name patterns to styles.")
    names = [name for name, _ in model.named_modules() if name]
    for pattern in plan:
        if not fnmatch.filter(names, pattern):
            close = [n for n in names if n.split(".")[-1] == pattern.split(".")[-1]][:5]
            raise ShardingError(
                f"parallelize: pattern {pattern!r} matches no module of {type(model).__name__}"
                + ("" if source == "the plan given" else f" (in {source})")
                + (f"; modules with that leaf name: {close}" if close else "")
                + ". Patterns are fnmatch globs over names from model.named_modules()."
            )
    tp_mesh = resolve_mesh(mesh, ("tp",), transform="parallelize")
    if tp_mesh.ndim != 1:
        raise ShardingError(
            f"parallelize needs a 1-D tensor-parallel mesh, got {tp_mesh.ndim}-D "
            f"{tp_mesh.mesh_dim_names}; pass the topology (its 'tp' axis) or topo.mesh['tp']."
        )
    check_plan_fits(model, plan, tp_mesh.size(), source)
    resolved = resolve_plan(plan)
    check_plan_modules(model, resolved)
    tied = tied_groups(model)
    if resolved:  # empty when every entry is HF's "replicate"
        parallelize_module(model, tp_mesh, resolved)
    retie(model, tied)
    if source != "the plan given":
        log.info(
            "parallelize: using %s (%d entries) over tp=%d.", source, len(plan), tp_mesh.size()
        )
    options = {"plan": dict(plan), "plan_source": source}
    return mark(model, "parallelize", options=options, mesh=tp_mesh)
