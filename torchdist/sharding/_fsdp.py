"""`shard(model, mesh)`: FSDP2 (`fully_shard`) applied bottom-up — every block, then the root.

Each rank keeps ``1/N`` of every parameter (a ``DTensor`` sharded on dim 0 over the data-parallel
mesh), all-gathers a block's parameters just before the block runs and frees them after
(``reshard_after_forward``), and reduce-scatters gradients in the backward, so gradients arrive
averaged and sharded. On a 2-D ``(dp_replicate, dp_shard)`` mesh this is HSDP: sharded within a
``dp_shard`` group, replicated (gradients all-reduced) across ``dp_replicate``. Parameter names
are unchanged. A model built on the meta device can be sharded first and materialised after
(``materialize``), so no rank ever holds the whole model.

The order that works: ``autocast_fp8`` and ``parallelize`` (tensor parallel) before ``shard``.
Parameter dtypes (fp32 master weights under mixed precision, one dtype per unit) are settled
before ``fully_shard`` runs: see ``torchdist/sharding/_dtypes.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from torchdist.blocks import BlockSpec, find_blocks
from torchdist.errors import ShardingError
from torchdist.marks import applied, mark
from torchdist.sharding._common import check_has_parameters, check_order, resolve_mesh
from torchdist.sharding._dtypes import (
    check_tied_in_one_unit,
    check_uniform_dtypes,
    refuse_forward,
    upcast_trainable_to_fp32,
)

__all__ = ["shard", "MixedPrecision", "materialize", "is_sharded"]


@dataclass(frozen=True)
class MixedPrecision:
    """FSDP2 mixed precision: parameters all-gathered and computed in ``param_dtype``, gradients
    reduced in ``reduce_dtype``; the sharded fp32 master weights stay what the optimizer sees."""

    param_dtype: torch.dtype | None = torch.bfloat16
    reduce_dtype: torch.dtype | None = torch.float32
    output_dtype: torch.dtype | None = None
    cast_forward_inputs: bool = True

    def to_torch(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(
            param_dtype=self.param_dtype,
            reduce_dtype=self.reduce_dtype,
            output_dtype=self.output_dtype,
            cast_forward_inputs=self.cast_forward_inputs,
        )


def shard(
    model: nn.Module,
    mesh: Any,
    *,
    blocks: BlockSpec = None,
    reshard_after_forward: bool = True,
    mixed_precision: MixedPrecision | None = None,
    offload: bool = False,
) -> nn.Module:
    """Shard ``model`` with FSDP2 over ``mesh``; return the same module, now sharded in place.

    ``mesh``: a live ``Topology`` (its ``dp_replicate`` x ``dp_shard`` axes; HSDP when both are
    larger than 1) or a ``DeviceMesh`` (1-D: FSDP; 2-D: HSDP). ``blocks``: which submodules get
    their own FSDP unit (default: the repeated blocks; a predicate over ``(name, module)``; or a
    list of types; a transformers model's layers are found from its ``_no_split_modules``); the
    root always gets one. ``offload=True`` keeps parameters, gradients and optimizer state on the
    CPU. ``mixed_precision``: trainable bf16/fp16 parameters are first upcast to fp32 master
    weights (one warning says which); without it dtypes are left alone, and if a unit's
    trainable parameters mix dtypes the first forward raises a ``ShardingError`` naming them
    (``_dtypes.py``).

    Communicates, per block and step: an all-gather of its parameters in the forward (and again
    in the backward when ``reshard_after_forward``), a reduce-scatter of its gradients over
    ``dp_shard`` and, for HSDP, an all-reduce over ``dp_replicate``. ``accumulate`` turns the
    gradient communication off on micro-steps.

    Example::

        with td.distributed(td.Topology.from_env(dp_shard=-1)) as topo:
            model = shard(build_model(), topo)           # or shard(model, topo.mesh["dp_shard"])
            opt = torch.optim.AdamW(model.parameters())  # after shard: the sharded parameters
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    check_has_parameters(model, "shard")
    check_order(model, "shard")
    if isinstance(model, FSDPModule):
        raise ShardingError(
            "shard: the model is already an FSDPModule (fully_shard was applied outside "
            "torchdist). Apply shard to the unsharded model."
        )
    dp_mesh = resolve_mesh(mesh, ("dp_replicate", "dp_shard"), transform="shard")
    if dp_mesh.ndim not in (1, 2):
        raise ShardingError(
            f"shard needs a 1-D mesh (FSDP) or a 2-D (dp_replicate, dp_shard) mesh (HSDP), got "
            f"{dp_mesh.ndim}-D {dp_mesh.mesh_dim_names}; pass the topology or "
            "topo.mesh['dp_replicate', 'dp_shard']."
        )
    kwargs: dict[str, Any] = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward}
    if mixed_precision is not None:
        kwargs["mp_policy"] = mixed_precision.to_torch()
    # Pinned host memory needs an accelerator; on a CPU-only machine offloading is a no-op copy.
    pin = torch.cuda.is_available()
    kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=pin) if offload else OffloadPolicy()
    units = find_blocks(model, blocks, transform="shard")
    check_tied_in_one_unit(model, units)
    upcast = upcast_trainable_to_fp32(model) if mixed_precision is not None else []
    mixed_dtypes = check_uniform_dtypes(model, units, mixed_precision=mixed_precision is not None)
    for _, block in units:
        fully_shard(block, **kwargs)
    # The root's parameters (embeddings, head) are gathered once per step, not resharded after
    # the forward: its all-gather would be the first thing the backward needs anyway.
    fully_shard(
        model, **{**kwargs, "reshard_after_forward": False if units else reshard_after_forward}
    )
    if mixed_dtypes is not None:
        refuse_forward(model, mixed_dtypes)
    options = {"blocks": tuple(n for n, _ in units), "reshard_after_forward": reshard_after_forward,
               "mixed_precision": mixed_precision, "offload": offload,
               "upcast_to_fp32": tuple(upcast)}  # fmt: skip
    return mark(model, "shard", options=options, mesh=dp_mesh)


def materialize(
    model: nn.Module,
    device: torch.device | str,
    *,
    init: Callable[[nn.Module], Any] | None = None,
    full_state_dict: dict[str, torch.Tensor] | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Give a model built on the meta device (and usually sharded) real storage, then initialise.

    ``to_empty`` allocates each rank's shards on ``device`` (uninitialised), then either ``init``
    is called on the model (e.g. a function that calls ``reset_parameters`` on every submodule;
    random inits of DTensors draw from torch's distributed RNG) or ``full_state_dict`` — the full,
    unsharded weights, needed on rank 0 only — is scattered so each rank keeps its shards.

    Non-persistent buffers (in no state dict: HF's rotary ``inv_freq``) are re-initialised first:
    from ``buffers`` (name -> value), else the value they had if not on meta, else their module's
    ``reset_buffers()``/``reset_parameters()`` or the HF model's ``_init_weights``; one that none
    of these sets is a ``ShardingError`` naming it (see ``torchdist/sharding/_buffers.py``).

    Communicates: with ``full_state_dict``, a broadcast from rank 0 of each tensor (each rank
    keeps its slice); with ``init``, whatever the initialiser does.
    """
    from torchdist.sharding._buffers import restore_non_persistent, snapshot_non_persistent

    if (init is None) == (full_state_dict is None):
        raise ShardingError("materialize needs exactly one of init= or full_state_dict=.")
    saved = snapshot_non_persistent(model)
    model.to_empty(device=device)
    restore_non_persistent(model, saved, buffers)
    if init is not None:
        with torch.no_grad():
            init(model)
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    # a copy: set_model_state_dict writes the scattered DTensors back into the dict it is given
    set_model_state_dict(model, dict(full_state_dict), options=options)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when ``shard`` (or ``fully_shard``) was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return "shard" in applied(model) or isinstance(model, FSDPModule)
