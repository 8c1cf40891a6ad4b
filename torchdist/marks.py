"""What torchdist's model transforms leave on a model, so the step transforms can see it.

A model transform (``shard``, ``replicate``, ``parallelize``, ``autocast_fp8``, ...) records its
name on the module it returns; ``applied(model)`` lists them in order. The step transforms read
this (and the module types torch itself uses) to cooperate: ``sync_grads`` steps aside on a model
that already averages its gradients, ``accumulate`` turns that model's own sync off on
micro-steps, ``optimize`` runs the hooks a transform needs after each optimizer step.

Communicates nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "applied",
    "mark",
    "after_optimizer_step_hooks",
    "data_parallel_owner",
    "deepspeed_engine",
]

_ATTR = "_torchdist_applied"
_HOOKS = "_torchdist_after_step"


def applied(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the torchdist model transforms applied to ``model``, oldest first."""
    return tuple(getattr(model, _ATTR, ()))


def mark(
    model: torch.nn.Module, name: str, *, after_optimizer_step: Callable[[], Any] | None = None
) -> torch.nn.Module:
    """Record that transform ``name`` was applied; optionally register a post-step hook."""
    object.__setattr__(model, _ATTR, applied(model) + (name,))
    if after_optimizer_step is not None:
        object.__setattr__(
            model, _HOOKS, after_optimizer_step_hooks(model) + (after_optimizer_step,)
        )
    return model


def after_optimizer_step_hooks(model: torch.nn.Module) -> tuple[Callable[[], Any], ...]:
    """What ``optimize`` runs after every applied optimizer step (e.g. fp8 scale precompute)."""
    return tuple(getattr(model, _HOOKS, ()))


def data_parallel_owner(model: Any) -> str | None:
    """Why ``model`` already averages its own gradients across data-parallel ranks, or None.

    True for DDP (``replicate``), FSDP2 (``shard``, any ``fully_shard``-ed submodule) and a
    DeepSpeed engine, whether or not torchdist applied them.
    """
    kind = type(model)
    if kind.__module__.startswith("deepspeed"):
        return "the model is a DeepSpeed engine, which reduces gradients itself"
    from torch.nn.parallel import DistributedDataParallel

    from torchdist._compat import is_composable_ddp

    if isinstance(model, DistributedDataParallel) or is_composable_ddp(model):
        return "the model is DistributedDataParallel (replicate), which syncs its gradients"
    for name in ("shard", "replicate", "deepspeed"):
        if name in applied(model):
            return f"torchdist.{name} already syncs this model's gradients"
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return "the model is sharded with FSDP2 (fully_shard), which reduce-scatters gradients"
    return None


def deepspeed_engine(model: Any) -> Any:
    """``model`` if it is a DeepSpeed engine (which owns backward, step and accumulation), else
    None. Checked by type name, so DeepSpeed is never imported for the question."""
    kind = type(model)
    if kind.__module__.startswith("deepspeed") and hasattr(model, "backward"):
        return model
    return None
