"""What torchdist's model transforms leave on a model, so the step transforms can see it.

Every model transform appends itself to the model's one ``ModelRecord``
(``torchdist._model_record``); ``applied(model)`` lists the names in order. The step transforms
read it (and, through ``distribution_of``, the module types torch itself uses) to cooperate:
``sync_grads`` steps aside on a model that already averages its gradients, ``accumulate`` turns
that model's own sync off on micro-steps, ``optimize`` runs the hooks a transform needs after each
optimizer step. Communicates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchdist._distribution import Distribution, distribution_of
from torchdist._model_record import ModelRecord, record, record_of

__all__ = [
    "applied",
    "mark",
    "record_of",
    "ModelRecord",
    "after_optimizer_step_hooks",
    "data_parallel_owner",
    "deepspeed_engine",
    "distribution_of",
    "Distribution",
]


def applied(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the torchdist model transforms applied to ``model``, oldest first."""
    return record_of(model).names


def mark(
    model: torch.nn.Module,
    name: str,
    *,
    after_optimizer_step: Callable[[], Any] | None = None,
    options: Mapping[str, Any] | None = None,
    mesh: Any = None,
) -> torch.nn.Module:
    """Record that model transform ``name`` was applied (with its options and mesh); optionally
    register a hook ``optimize`` runs after every applied optimizer step."""
    return record(model, name, options=options, mesh=mesh,
                  after_optimizer_step=after_optimizer_step)  # fmt: skip


def after_optimizer_step_hooks(model: torch.nn.Module) -> tuple[Callable[[], Any], ...]:
    """What ``optimize`` runs after every applied optimizer step (e.g. fp8 scale precompute)."""
    return record_of(model).after_optimizer_step


_WHY = {
    "deepspeed": "the model is a DeepSpeed engine, which reduces gradients itself",
    "ddp": "the model is DistributedDataParallel (replicate), which syncs its gradients",
    "fsdp2": "the model is sharded with FSDP2 (fully_shard), which reduce-scatters gradients",
}


def data_parallel_owner(model: Any) -> str | None:
    """Why ``model`` already averages its own gradients across data-parallel ranks, or None.

    True for DDP (``replicate``), FSDP2 (``shard``, any ``fully_shard``-ed submodule) and a
    DeepSpeed engine, whether or not torchdist applied them.
    """
    found = distribution_of(model)
    if found.data_parallel is None:
        return None
    if found.deepspeed_engine or found.data_parallel == "ddp":
        return _WHY[found.data_parallel]
    if found.by_torchdist or found.data_parallel == "deepspeed":
        name = {"fsdp2": "shard", "deepspeed": "deepspeed"}[found.data_parallel]
        return f"torchdist.{name} already syncs this model's gradients"
    return _WHY[found.data_parallel]


def deepspeed_engine(model: Any) -> Any:
    """``model`` if it is a DeepSpeed engine (which owns backward, step and accumulation), else
    None. Checked by type name, so DeepSpeed is never imported for the question."""
    kind = type(model)
    if kind.__module__.startswith("deepspeed") and hasattr(model, "backward"):
        return model
    return None
