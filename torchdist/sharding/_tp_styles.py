"""Tensor-parallel style names: torchdist's own, and Hugging Face's (transformers 5.x, and the
``local_*`` names of 4.x), each mapped to a torch ``ParallelStyle`` or to an error that says why.

HF's names come from ``transformers/distributed/tensor_parallel.py`` (``ALL_PARALLEL_STYLES``),
where each is a layout of the module's input and output; the torch style with the same layouts
computes the same thing, so ``parallelize(model, topo, model.tp_plan)`` runs a HF model's own plan.
A ``local_*`` name keeps the same sharding with the parameters held as local tensors; with
DTensor parameters the numbers are the same, so it maps to the plain style. ``replicate`` keeps
the whole module on every rank: the entry is dropped. The MoE, MLA and fused ("packed") styles
split tensors in ways torch's styles do not; they are refused with the way out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from torchdist.errors import ShardingError

__all__ = ["STYLES", "HF_STYLES", "REFUSED", "resolve_plan", "check_plan_modules"]

STYLES = ("colwise", "rowwise", "sequence", "embedding", "output")

# HF name -> our name (the same input/output layouts), or None for "no sharding at all".
HF_STYLES: dict[str, str | None] = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "colwise_rep": "colwise_gather_output",
    "colwise_gather_output": "colwise_gather_output",
    "rowwise_rep": "rowwise_replicated_input",
    "rowwise_split_input": "rowwise_replicated_input",
    "embedding_rowwise": "embedding",
    "embedding_colwise": "embedding_colwise",
    "sequence_parallel": "sequence_parallel",
    "all_reduce": "all_reduce",
    "local_colwise": "colwise",
    "local_rowwise": "rowwise",
    "replicate": None,
}

_FUSED = (
    "a fused projection (gate_up_proj, qkv) must be split per rank chunk by chunk, which no torch "
    "ParallelStyle does; split the fused Linear into separate Linears (colwise each) or pass a "
    "ParallelStyle of your own for it"
)
_MOE = (
    "expert/MoE parallelism is not tensor parallelism over DTensor styles; torchdist has no "
    "expert-parallel transform yet: leave the experts out of the plan (they stay replicated) or "
    "load the model with transformers' own from_pretrained(tp_plan='auto')"
)
REFUSED: dict[str, str] = {
    "packed_colwise": _FUSED,
    "packed_rowwise": _FUSED,
    "local_packed_rowwise": _FUSED,
    "moe_tp_experts": _MOE,
    "moe_identity_expert": _MOE,
    "ep_router": _MOE,
    "ep_dispatch_experts": _MOE,
    "grouped_gemm": _MOE,
    "isolated": _MOE,
    "gather": _MOE,
    "local": "it shards parameters without any input/output handling, which only HF's own MoE "
    "kernels expect; use colwise/rowwise for Linears",
    "local_params": "it runs a module on its bare sharded parameters (attention sinks) through "
    "HF's own hooks; give that parameter's owner a colwise/rowwise style instead",
    "mla_kv_a_proj": "it splits the MLA kv_a projection's rope part, which needs HF's own hook; "
    "leave kv_a_proj_with_mqa out of the plan (replicated)",
    "replicated_with_grad_allreduce": "torch has no style that all-reduces a replicated "
    "parameter's gradient; leave the module out of the plan and sync its gradient yourself",
}


def _factories() -> dict[str, Callable[[], Any]]:
    from torch.distributed.tensor import Partial, Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    return {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "sequence": lambda: SequenceParallel(),
        "embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
        "output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "rowwise_replicated_input": lambda: RowwiseParallel(input_layouts=Replicate()),
        "embedding_colwise": lambda: ColwiseParallel(output_layouts=Replicate()),
        "sequence_parallel": lambda: SequenceParallel(use_local_output=True),
        "all_reduce": lambda: PrepareModuleOutput(
            output_layouts=Partial(), desired_output_layouts=Replicate(), use_local_output=True
        ),
    }


def resolve_plan(plan: Mapping[str, Any]) -> dict[str, Any]:
    """``plan`` with every style name turned into a torch ``ParallelStyle``; ``replicate``
    entries dropped. Unknown or unsupported names raise ``ShardingError`` naming the pattern."""
    from torch.distributed.tensor.parallel import ParallelStyle

    factories = _factories()
    resolved: dict[str, Any] = {}
    for pattern, style in plan.items():
        if isinstance(style, ParallelStyle):
            resolved[pattern] = style
            continue
        if not isinstance(style, str):
            raise ShardingError(
                f"parallelize: the style for {pattern!r} is a {type(style).__name__}; expected a "
                "style name or a torch.distributed.tensor.parallel.ParallelStyle."
            )
        if style in REFUSED:
            raise ShardingError(
                f"parallelize: {pattern!r} asks for Hugging Face's {style!r} style, which "
                f"torchdist cannot map to a torch style: {REFUSED[style]}."
            )
        name = style if style in factories else HF_STYLES.get(style, "?")
        if name is None:  # "replicate": every rank keeps the whole module
            continue
        if name not in factories:
            raise ShardingError(
                f"parallelize: unknown style {style!r} for {pattern!r}; use one of "
                f"{list(STYLES)}, a Hugging Face name ({sorted(HF_STYLES)}) or a ParallelStyle."
            )
        resolved[pattern] = factories[name]()
    return resolved


def check_plan_modules(model: nn.Module, resolved: Mapping[str, Any]) -> None:
    """Refuse, before anything is sharded, a colwise/rowwise style on a module torch cannot split
    (anything but ``nn.Linear``/``nn.Embedding``; GPT-2's ``Conv1D`` above all)."""
    import fnmatch

    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    for pattern, style in resolved.items():
        if not isinstance(style, (ColwiseParallel, RowwiseParallel)):
            continue
        atoms = pattern.split(".")
        for name, module in model.named_modules():
            # the way parallelize_module matches: one fnmatch per dotted level
            parts = name.split(".")
            if len(parts) != len(atoms) or not all(map(fnmatch.fnmatchcase, parts, atoms)):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            kind = type(module).__name__
            hint = (
                "GPT-2's Conv1D is a Linear with its weight stored transposed (in, out), and its "
                "c_attn fuses q, k and v, so a column split would mix heads. Shard GPT-2 with "
                "shard() (FSDP2) or replicate() instead, or rebuild the block with nn.Linear "
                "layers (weight = conv.weight.T; split c_attn into q, k, v) before parallelize"
                if kind == "Conv1D"
                else "torch's colwise/rowwise styles split only nn.Linear and nn.Embedding; "
                "target the Linear layers inside it, or pass a ParallelStyle of your own"
            )
            raise ShardingError(
                f"parallelize: {pattern!r} gives {type(style).__name__} to {name!r}, a {kind}. "
                f"{hint}."
            )
