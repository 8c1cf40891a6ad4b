"""`clip_grads(max_norm)`: clip by the true global gradient norm, whatever holds the gradients.

Gradients may be plain tensors (replicated after ``sync_grads``/``replicate``), or DTensors
sharded by ``shard`` (FSDP2) and ``parallelize`` (tensor parallel), possibly on different meshes.
The norm of each group of gradients that share a mesh is computed with
``torch.nn.utils.get_total_norm`` and made global with ``DTensor.full_tensor()`` (an all-reduce
over the dimensions the gradients are sharded on); the groups' norms are then combined, and
across the stages of a pipelined model (an all-reduce over pp). fp16 gradients are unscaled first.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchdist.errors import StepError
from torchdist.state import TrainState
from torchdist.transforms import _loss_scale
from torchdist.transforms._composition import Context, Layer, Phase, StepTransform
from torchdist.transforms._pipeline import norm_across_stages

__all__ = ["clip_grads", "global_grad_norm", "clip_by_norm"]


def _by_mesh(params: list[torch.nn.Parameter]) -> dict[Any, list[torch.nn.Parameter]]:
    groups: dict[Any, list[torch.nn.Parameter]] = {}
    for param in params:
        if param.grad is not None:
            groups.setdefault(getattr(param.grad, "device_mesh", None), []).append(param)
    return groups


def global_grad_norm(params: list[torch.nn.Parameter], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients of ``params`` as one vector, across every rank that holds a part.

    Communicates: an all-reduce per sharded dimension of each distinct DTensor mesh (none for
    plain tensors).
    """
    norms = []
    for group in _by_mesh(params).values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=norm_type)
        full_tensor = getattr(norm, "full_tensor", None)
        norms.append(full_tensor() if full_tensor is not None else norm)
    if not norms:
        return torch.zeros(())
    if len(norms) == 1:
        return norms[0]
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


def clip_by_norm(params: list[torch.nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Scale gradients in place by ``min(1, max_norm / norm)``; no host sync, no communication."""
    for mesh, group in _by_mesh(params).items():
        total = norm
        if mesh is not None:  # the coefficient must live on the gradients' mesh
            from torch.distributed.tensor import DTensor, Replicate

            total = DTensor.from_local(norm, mesh, [Replicate()] * mesh.ndim, run_check=False)
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)


def clip_grads(max_norm: float, norm_type: float = 2.0) -> StepTransform:
    """Scale gradients so their global ``norm_type``-norm is at most ``max_norm``.

    Reports the norm before clipping as ``metrics["grad_norm"]`` (a tensor, no host sync).
    Communicates: see ``global_grad_norm``. Under ``accumulate(k)`` it acts (and reports) on the
    window's last call only. On a DeepSpeed engine the engine clips (its ``gradient_clipping``
    must equal ``max_norm``, checked when the step is bound) and its norm is reported.

    Example::

        step = compose(optimize(opt), clip_grads(1.0), sync_grads(topo))(value_and_grad(loss_fn))
        state, metrics = step(state, batch)          # metrics["grad_norm"]
    """
    try:
        valid = not isinstance(max_norm, (str, bool)) and 0 < float(max_norm) < math.inf
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise StepError(
            f"clip_grads(max_norm) needs a finite number > 0, got {max_norm!r} "
            "(nan would turn every weight into nan, inf clips nothing: leave clip_grads out)."
        )
    if not (isinstance(norm_type, (int, float)) and norm_type > 0):
        raise StepError(f"clip_grads(norm_type) needs a number > 0 or math.inf, got {norm_type!r}.")

    def wrap(inner: Layer, inner_names: tuple[str, ...]) -> Layer:
        def layer(state: TrainState, batch: Any, ctx: Context):
            state, metrics, outcome = inner(state, batch, ctx)
            if not outcome.update:  # mid-window: the gradient is not complete yet
                return state, metrics, outcome
            scaler = state.scaler
            if scaler is not None and outcome.found_inf is None:
                outcome = outcome.replace(found_inf=_loss_scale.unscale(state.model, scaler))
            params = [p for p in state.model.parameters() if p.grad is not None]
            norm = global_grad_norm(params, norm_type)
            norm = norm_across_stages(state.model, norm, norm_type)  # pp: every stage's grads
            clip_by_norm(params, max_norm, norm)
            return state, {**metrics, "grad_norm": norm.detach()}, outcome

        return layer

    info = {"max_norm": max_norm, "norm_type": norm_type}
    return StepTransform("clip_grads", Phase.CLIP, wrap, info=info)
