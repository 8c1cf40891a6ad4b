"""`checkpoint_activations(model)`: recompute blocks' activations in the backward to save memory.

A model transform (``model -> model``), kept beside the step transforms because it changes what
the step stores, not where data lives. Applied with torch's composable ``checkpoint``, so
parameter names are unchanged.

* ``policy="full"``: keep only each block's input; recompute the block in the backward.
* ``policy="selective"``: keep the outputs of matmuls and attention (the expensive ops) and
  recompute the cheap element-wise ones, as torchtitan's op-level selective checkpointing does.

Apply after ``parallelize`` and before ``compile`` and ``shard`` (torchtitan's order: TP, AC,
compile, FSDP).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from torchdist._compat import composable_checkpoint
from torchdist.blocks import BlockSpec, find_blocks
from torchdist.errors import ShardingError
from torchdist.marks import mark
from torchdist.sharding._common import check_has_parameters, check_order

__all__ = ["checkpoint_activations"]

def _save_expensive_ops():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    ops = {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    }

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def checkpoint_activations(
    model: nn.Module, *, blocks: BlockSpec = None, policy: str = "full"
) -> nn.Module:
    """Checkpoint the activations of each block of ``model`` (default: its repeated blocks).

    Communicates nothing itself; under ``shard`` the recomputation re-gathers a block's
    parameters in the backward, which FSDP does anyway.

    Example::

        model = checkpoint_activations(model, policy="selective")
    """
    if policy not in ("full", "selective"):
        raise ShardingError(
            f"checkpoint_activations: unknown policy {policy!r}; use 'full' or 'selective'."
        )
    check_has_parameters(model, "checkpoint_activations")
    check_order(model, "checkpoint_activations")
    kwargs = {} if policy == "full" else {"context_fn": functools.partial(_save_expensive_ops)}
    found = find_blocks(model, blocks, transform="checkpoint_activations", required=True)
    for _, block in found:
        composable_checkpoint(block, **kwargs)
    options = {"policy": policy, "blocks": tuple(n for n, _ in found)}
    return mark(model, "checkpoint_activations", options=options)
