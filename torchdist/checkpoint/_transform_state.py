"""The step transforms' state in a checkpoint: each one's ``state_dict()``, keyed by its name,
and the partial gradient sum when the checkpoint falls inside an accumulation window.

Saved per rank (in the extras file): a window's partial gradients are each rank's own, not yet
averaged. So a checkpoint taken mid-window resumes bit-exact at the same world size and mesh;
at another, loading it is a ``CheckpointError`` (save at a window boundary to reshard).

Communicates nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from torchdist.errors import CheckpointError
from torchdist.state import TrainState
from torchdist.transforms._composition import _Unrestored

__all__ = ["pack", "restore"]


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value


def pack(state: TrainState) -> dict[str, Any]:
    """``{"states": {name: state_dict}, "partial_grads": {param: local grad} | None}``."""
    states = {}
    for name, value in state.transforms.items():
        state_dict = getattr(value, "state_dict", None)
        if callable(state_dict):
            states[name] = _cpu(state_dict())
    mid_window = any(getattr(v, "mid_window", False) for v in state.transforms.values())
    return {"states": states, "partial_grads": _partial_grads(state) if mid_window else None}


def _partial_grads(state: TrainState) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FSDPModule

    from torchdist.marks import deepspeed_engine

    model = state.model
    acc = state.transforms.get("accumulate")
    if deepspeed_engine(model) is not None:
        raise CheckpointError(
            "checkpoint.save in the middle of an accumulation window of a DeepSpeed engine: the "
            "engine keeps its partial gradients in its own buffers. Save when "
            "metrics['update'] is True (at a window boundary)."
        )
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = _cpu(grad.to_local() if hasattr(grad, "to_local") else grad).clone()
    if not grads and any(isinstance(m, FSDPModule) for m in model.modules()):
        count = acc.count if acc is not None else "?"
        raise CheckpointError(
            f"checkpoint.save after {count} micro-batch(es) of an accumulation window of a "
            "shard()ed model: FSDP2 keeps the partial gradients unsharded inside itself while "
            "gradient sync is off. Save at a window boundary (when metrics['update'] is True), "
            "or accumulate(k, sync_each_batch=True) so the partial sum is sharded in param.grad."
        )
    return grads


def restore(state: TrainState, saved: dict[str, Any], *, same_world: bool, topo: Any) -> TrainState:
    """``state`` with the saved transform states put back (and the partial gradients, if any).

    A state whose type knows ``from_state_dict`` is rebuilt at once; the others wait for the
    step that owns them (``Step.init`` restores them on the next call).
    """
    transforms = dict(state.transforms)
    for name, value in saved["states"].items():
        current = transforms.get(name)
        rebuild = getattr(type(current), "from_state_dict", None) if current is not None else None
        if rebuild is not None:
            transforms[name] = rebuild(_to(value, topo.device))
        else:
            transforms[name] = _Unrestored(value)
    grads = saved.get("partial_grads")
    if grads:
        if not same_world:
            raise CheckpointError(
                "this checkpoint was saved in the middle of an accumulation window, so it holds "
                "each rank's partial gradients; it can only be loaded at the world size and mesh "
                "it was saved with. Resume there, or use a checkpoint saved at a window boundary."
            )
        _install_grads(state.model, grads)
    return state.replace(transforms=transforms)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _install_grads(model: torch.nn.Module, grads: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise CheckpointError(
            f"the checkpoint's partial gradients name parameters this model lacks: {unknown[:5]}."
            " Load it into the model it was saved from."
        )
    for name, grad in grads.items():
        param = params[name]
        local = grad.to(param.device, param.dtype)
        if hasattr(param, "to_local"):  # a DTensor parameter: the saved grad is this rank's shard
            from torch.distributed.tensor import DTensor

            local = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False)
        param.grad = local
