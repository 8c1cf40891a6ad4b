"""`value_and_grad(loss_fn)`: the base step — forward, backward, ``{"loss": ...}``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from torchdist.errors import StepError
from torchdist.state import TrainState
from torchdist.transforms._composition import Base, Context, Outcome, Step

__all__ = ["value_and_grad", "split_loss", "metrics_of"]


def value_and_grad(
    loss_fn: Callable[[torch.nn.Module, Any], Any], *, has_aux: bool = False
) -> Step:
    """The base step function: ``loss = loss_fn(model, batch)``, then ``loss.backward()``.

    ``loss_fn`` knows nothing about ranks. With ``has_aux=True`` it returns ``(loss, aux)`` and
    ``aux`` (a pytree of tensors) is merged into the metrics. Gradients accumulate into
    ``param.grad`` (``optimize`` zeroes them). The loss reported is the one ``loss_fn`` returned,
    detached; the one differentiated is multiplied by the transforms' ``loss_multiplier``
    (``accumulate``) and fp16 loss scale (``autocast``). The forward runs under the autocast
    dtype ``autocast`` set, the backward outside it, as torch recommends.

    On a DeepSpeed engine (``torchdist.sharding.deepspeed``) the step runs on the engine instead
    (``torchdist/transforms/_deepspeed_step.py``): the backward is ``engine.backward``.

    Communicates nothing itself; gradient hooks placed by ``sync_grads``/``shard``/``replicate``
    (or DeepSpeed's ZeRO) communicate during the backward.

    Example::

        def loss_fn(model, batch):
            x, y = batch
            return F.cross_entropy(model(x), y)

        state, metrics = value_and_grad(loss_fn)(state, batch)   # metrics["loss"]
    """

    def layer(state: TrainState, batch: Any, ctx: Context) -> tuple[TrainState, Any, Outcome]:
        if ctx.autocast_dtype is not None:
            forward = torch.autocast(_device_type(state.model), dtype=ctx.autocast_dtype)
        else:
            forward = contextlib.nullcontext()
        with forward:
            out = loss_fn(state.model, batch)
        loss, aux = split_loss(out, has_aux)
        scaled = loss * ctx.loss_multiplier if ctx.loss_multiplier != 1.0 else loss
        if ctx.loss_scale is not None:
            scaled = scaled.float() * ctx.loss_scale
        scaled.backward()
        return state, metrics_of(loss, aux), _DONE

    return Step(Base(loss_fn, has_aux, layer))


_DONE = Outcome()


def metrics_of(loss: torch.Tensor, aux: Any) -> dict[str, Any]:
    """``{"loss": loss}`` and the user's ``aux`` merged in (a dict) or under ``"aux"``."""
    metrics: dict[str, Any] = {"loss": loss.detach()}
    if aux is not None:
        if isinstance(aux, dict):
            metrics.update(aux)
        else:
            metrics["aux"] = aux
    return metrics


def split_loss(out: Any, has_aux: bool) -> tuple[torch.Tensor, Any]:
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise StepError(
                f"loss_fn was declared has_aux=True but returned {type(out).__name__}; return "
                "(loss, aux) or drop has_aux."
            )
        loss, aux = out
    else:
        if isinstance(out, tuple):
            raise StepError(
                f"loss_fn returned a tuple of {len(out)}; return the scalar loss, or "
                "(loss, aux) with value_and_grad(loss_fn, has_aux=True)."
            )
        loss, aux = out, None
    if not isinstance(loss, torch.Tensor):
        raise StepError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__}. Return the loss "
            "tensor itself (not loss.item())."
        )
    if loss.numel() != 1:
        raise StepError(
            f"loss_fn must return a scalar loss, got a tensor of shape {tuple(loss.shape)}. "
            "Reduce it, e.g. loss.mean() or F.cross_entropy(..., reduction='mean')."
        )
    if not loss.requires_grad:
        raise StepError(
            "the loss does not require grad: nothing in loss_fn depends on a trainable "
            "parameter (was it computed under torch.no_grad(), or are all parameters frozen?)."
        )
    return loss.reshape(()), aux


def _device_type(model: torch.nn.Module) -> str:
    for param in model.parameters():
        return param.device.type
    return "cpu"
