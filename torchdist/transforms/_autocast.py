"""`autocast(dtype)`: bf16 or fp16 forward; fp16 gets dynamic loss scaling kept in the state.

bf16 needs no scaling: the forward runs under ``torch.autocast`` and that is all. fp16 gradients
underflow, so the loss is multiplied by a scale before the backward; the scale is this
transform's state (``state.transforms["autocast"]``, a ``LossScale``), and
``torchdist/transforms/_loss_scale.py`` unscales and updates it.

Communicates nothing itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchdist.errors import CompositionError
from torchdist.state import LossScale, TrainState
from torchdist.transforms import _loss_scale
from torchdist.transforms._composition import Context, Layer, Phase, StepTransform

__all__ = ["autocast"]


def autocast(
    dtype: torch.dtype = torch.bfloat16,
    *,
    init_scale: float = 2.0**16,
    growth_interval: int = 2000,
) -> StepTransform:
    """Run the forward in ``dtype`` (``torch.bfloat16`` or ``torch.float16``) via torch.autocast.

    The autocast device is the model's. ``init_scale`` and ``growth_interval`` configure fp16
    loss scaling; its state is ``state.transforms["autocast"]`` (None for bf16), checkpointed.

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
    fp16 = dtype == torch.float16
    if fp16:
        LossScale.initial("cpu", init_scale)  # validates init_scale now, not at the first step

    def init(state: TrainState) -> LossScale | None:
        return _loss_scale.initial(state, init_scale, growth_interval) if fp16 else None

    def restore(state: TrainState, saved: Mapping[str, Any]) -> LossScale | None:
        if not fp16:
            return None
        device = next(state.model.parameters()).device
        return LossScale.from_state_dict(
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
        )

    def wrap(inner: Layer, inner_names: tuple[str, ...]) -> Layer:
        def layer(state: TrainState, batch: Any, ctx: Context):
            scaler = state.transforms["autocast"] if fp16 else None
            ctx = ctx.replace(
                autocast_dtype=dtype, loss_scale=scaler.scale if scaler is not None else None
            )
            return inner(state, batch, ctx)

        return layer

    info = {"dtype": str(dtype)}
    if fp16:
        info.update(init_scale=init_scale, growth_interval=growth_interval)
    return StepTransform("autocast", Phase.FORWARD, wrap, init, restore, info)
