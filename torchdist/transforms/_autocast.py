"""`autocast(dtype)`: bf16 or fp16 forward; fp16 gets dynamic loss scaling kept in the state.

bf16 needs no scaling: the forward runs under ``torch.autocast`` and that is all. fp16 gradients
underflow, so the loss is multiplied by a scale before the backward. The scale lives in
``TrainState.scaler`` (a ``LossScale`` value, created on the first step), not in a hidden object.
``clip_grads`` (or else ``optimize``) divides the gradients by it before using them, and
``optimize`` skips the update, halves the scale and reports ``metrics["skipped"]`` when a
gradient is inf/nan — the scheduler then does not advance either. This mirrors
``torch.amp.GradScaler``, with its state made explicit.

Communicates nothing, except that unscaling gradients that are DTensors (``shard``,
``parallelize``) all-reduces one "found inf" flag (MAX) so every rank makes the same decision.
"""

from __future__ import annotations

from typing import Any

import torch

from torchdist.errors import CompositionError
from torchdist.marks import deepspeed_engine
from torchdist.state import LossScale, StepFn, TrainState
from torchdist.transforms._composition import Phase, StepTransform

__all__ = ["autocast", "unscale_grads"]


def autocast(
    dtype: torch.dtype = torch.bfloat16,
    *,
    init_scale: float = 2.0**16,
    growth_interval: int = 2000,
) -> StepTransform:
    """Run the forward in ``dtype`` (``torch.bfloat16`` or ``torch.float16``) via torch.autocast.

    The autocast device is the model's (the topology's device once the model is placed there).
    ``init_scale`` and ``growth_interval`` configure fp16 loss scaling.

    Example::

        fp16 = compose(optimize(opt), clip_grads(1.0), autocast(torch.float16))
        step = fp16(value_and_grad(loss_fn))
        state, metrics = step(state, batch)      # metrics["skipped"]: True on an overflowed step
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise CompositionError(
            f"autocast supports torch.bfloat16 and torch.float16, got {dtype}. For fp8 use "
            "torchdist.precision.autocast_fp8(model, recipe)."
        )

    def wrap(inner: StepFn, info: dict) -> StepFn:
        info["dtype"] = str(dtype)

        def step(state: TrainState, batch: Any):
            engine = deepspeed_engine(state.model)
            if engine is not None:  # the engine already computes in its configured dtype
                _check_engine_dtype(engine, dtype)
                return inner(state, batch)
            ctx = state.context.replace(autocast_dtype=dtype, found_inf=None)
            if dtype == torch.float16:
                scaler = state.scaler
                if scaler is None:
                    device = next(state.model.parameters()).device
                    scaler = LossScale.initial(device, init_scale, growth_interval=growth_interval)
                    state = state.replace(scaler=scaler)
                ctx = ctx.replace(loss_scale=scaler.scale)
            new_state, metrics = inner(state.replace(context=ctx), batch)
            return new_state.replace(
                context=new_state.context.replace(
                    autocast_dtype=state.context.autocast_dtype,
                    loss_scale=state.context.loss_scale,
                )
            ), metrics

        return step

    return StepTransform("autocast", Phase.FORWARD, wrap)


def _check_engine_dtype(engine: Any, dtype: torch.dtype) -> None:
    engine_dtype = (
        torch.bfloat16 if engine.bfloat16_enabled()
        else torch.float16 if engine.fp16_enabled()
        else torch.float32
    )  # fmt: skip
    if engine_dtype != dtype:
        raise CompositionError(
            f"autocast({dtype}) on a DeepSpeed engine that computes in {engine_dtype}: DeepSpeed "
            f"owns mixed precision. Build it with torchdist.sharding._deepspeed(..., dtype={dtype})"
            ", or drop autocast."
        )


def unscale_grads(state: TrainState) -> TrainState:
    """Divide fp16-scaled gradients by the loss scale once; record ``found_inf`` in the context.

    A no-op without a scaler or when already done in this step. Communicates: one MAX
    all-reduce of the found-inf flag when gradients are DTensors (each rank holds a shard).
    """
    if state.scaler is None or state.context.found_inf is not None:
        return state
    scale = state.scaler.scale
    found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
    inv_scale = scale.double().reciprocal().float()
    groups: dict[tuple, list[torch.Tensor]] = {}
    has_dtensor = False
    from torch.distributed.tensor import DTensor

    for param in state.model.parameters():
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):  # unscale the local shard; it shares storage
            grad, has_dtensor = grad.to_local(), True
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    for grads in groups.values():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
    if has_dtensor:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    return state.replace(context=state.context.replace(found_inf=found_inf))


def update_scale(scaler: LossScale, found_inf: torch.Tensor) -> LossScale:
    """The next ``LossScale``: backed off after an overflow, grown after enough clean steps."""
    scale, tracker = scaler.scale.clone(), scaler.growth_tracker.clone()
    torch._amp_update_scale_(
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
