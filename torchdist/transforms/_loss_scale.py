"""fp16 dynamic loss scaling, in one place: scale the loss, unscale the gradients, update.

The scale is a ``LossScale`` value kept in ``TrainState.transforms["autocast"]`` by
``autocast(torch.float16)``. ``clip_grads`` (or else ``optimize``) calls ``unscale`` once on the
step that updates, and ``optimize`` calls ``update`` with the found-inf flag: the step is skipped
on an overflow, the scale backs off, and grows after ``growth_interval`` clean steps, as
``torch.amp.GradScaler`` does, with its state made explicit.

Communicates: one MAX all-reduce of the found-inf flag over the gradients' process groups when
gradients are DTensors (each rank holds a shard), so every rank makes the same decision. The
group is the one the gradients live on (their mesh), never the default group.
"""

from __future__ import annotations

import torch

from torchdist._compat import amp_unscale_, amp_update_scale_
from torchdist.state import LossScale, TrainState

__all__ = ["unscale", "update", "initial"]


def initial(state: TrainState, init_scale: float, growth_interval: int) -> LossScale:
    """A fresh ``LossScale`` on the model's device."""
    device = next(state.model.parameters()).device
    return LossScale.initial(device, init_scale, growth_interval=growth_interval)


def unscale(model: torch.nn.Module, scaler: LossScale) -> torch.Tensor:
    """Divide the gradients of ``model`` by the loss scale in place; return found-inf (0-dim).

    Communicates: one MAX all-reduce of the flag per distinct gradient mesh group.
    """
    from torch.distributed.tensor import DTensor

    scale = scaler.scale
    found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
    inv_scale = scale.double().reciprocal().float()
    groups: dict[tuple, list[torch.Tensor]] = {}
    meshes = {}
    for param in model.parameters():
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):  # unscale the local shard; it shares storage
            meshes[id(grad.device_mesh)] = grad.device_mesh
            grad = grad.to_local()
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    for grads in groups.values():
        amp_unscale_(grads, found_inf, inv_scale)
    if meshes:
        import torch.distributed as dist

        for mesh in meshes.values():
            for group in mesh.get_all_groups():
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
    return found_inf


def update(scaler: LossScale, found_inf: torch.Tensor) -> LossScale:
    """The next ``LossScale``: backed off after an overflow, grown after enough clean steps."""
    scale, tracker = scaler.scale.clone(), scaler.growth_tracker.clone()
    amp_update_scale_(
        scale,
        tracker,
        found_inf,
        scaler.growth_factor,
        scaler.backoff_factor,
        scaler.growth_interval,
    )
    return LossScale(
        scale, tracker, scaler.growth_factor, scaler.backoff_factor, scaler.growth_interval
    )
