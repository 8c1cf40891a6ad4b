"""`accumulate(n)`: gradient accumulation over micro-batches, with gradient sync only on the last.

Whatever syncs the gradients is turned off on the first ``n - 1`` micro-batches and back on for
the last: torchdist's own ``sync_grads`` hooks, DDP's ``no_sync()`` (``replicate``), FSDP2's
``set_requires_gradient_sync`` (``shard``), any module exposing ``set_requires_gradient_sync``.
So an accumulated step communicates exactly what an unaccumulated one does. A DeepSpeed engine
is told where its accumulation boundary is (its ``gradient_accumulation_steps`` must equal
``n``), and reduces then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import optree
import torch

from torchdist.errors import CompositionError, StepError
from torchdist.marks import deepspeed_engine
from torchdist.state import StepFn, TrainState
from torchdist.transforms._composition import Phase, StepTransform

__all__ = ["accumulate", "gradient_sync_disabled", "split_batch"]


def accumulate(n: int) -> StepTransform:
    """Split each batch into ``n`` micro-batches along dim 0 and accumulate their gradients.

    The loss each micro-batch differentiates is scaled by ``1/n``, so the accumulated gradient is
    the gradient of the mean loss over the whole batch (equal micro-batches). Metrics are
    averaged over micro-batches. A batch whose leading dimension ``n`` does not divide raises.

    Communicates: nothing on micro-batches ``0..n-2``; on the last one, whatever the gradient
    sync mechanism does (see the module docstring).

    Example::

        step = compose(optimize(opt), sync_grads(topo), accumulate(4))(value_and_grad(loss_fn))
    """
    if not isinstance(n, int) or n < 1:
        raise StepError(f"accumulate(n) needs a positive int, got {n!r}.")

    def wrap(inner: StepFn, info: dict) -> StepFn:
        info["micro_batches"] = n

        def step(state: TrainState, batch: Any):
            outer_ctx = state.context
            all_metrics = []
            engine = deepspeed_engine(state.model)
            if engine is not None and engine.gradient_accumulation_steps() != n:
                raise CompositionError(
                    f"accumulate({n}) on a DeepSpeed engine built with gradient_accumulation_steps"
                    f"={engine.gradient_accumulation_steps()}; build it with "
                    f"torchdist.sharding._deepspeed(..., accumulation={n})."
                )
            for index, micro in enumerate(split_batch(batch, n)):
                ctx = outer_ctx.replace(
                    loss_multiplier=outer_ctx.loss_multiplier / n, micro_step=(index, n)
                )
                last = index == n - 1
                if engine is not None:  # DeepSpeed reduces gradients at its boundary only
                    engine.set_gradient_accumulation_boundary(last)
                sync_off = contextlib.nullcontext() if last else gradient_sync_disabled(state)
                with sync_off:
                    state, metrics = inner(state.replace(context=ctx), micro)
                all_metrics.append(metrics)
            ctx = state.context.replace(
                loss_multiplier=outer_ctx.loss_multiplier, micro_step=outer_ctx.micro_step
            )
            return state.replace(context=ctx), _mean_metrics(all_metrics)

        return step

    return StepTransform("accumulate", Phase.ACCUMULATE, wrap)


def split_batch(batch: Any, n: int) -> list[Any]:
    """``n`` micro-batches of a pytree batch, splitting every tensor leaf along dim 0."""
    if n == 1:
        return [batch]
    leaves, treedef = optree.tree_flatten(batch, none_is_leaf=False)
    columns = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            if leaf.shape[0] % n:
                raise StepError(
                    f"accumulate({n}) cannot split a batch with leading dimension "
                    f"{leaf.shape[0]} into {n} equal micro-batches; use a batch size divisible "
                    f"by {n}."
                )
            columns.append(leaf.chunk(n))
        else:
            columns.append([leaf] * n)
    return [optree.tree_unflatten(treedef, [col[i] for col in columns]) for i in range(n)]


def _mean_metrics(all_metrics: list[Any]) -> Any:
    if len(all_metrics) == 1:
        return all_metrics[0]

    def mean(*values: Any) -> Any:
        if isinstance(values[0], torch.Tensor) and values[0].is_floating_point():
            return torch.stack([v.detach() for v in values]).mean(0)
        return values[-1]

    return optree.tree_map(mean, *all_metrics, none_is_leaf=False)


@contextlib.contextmanager
def gradient_sync_disabled(state: TrainState) -> Iterator[None]:
    """Turn off the gradient sync of ``state`` for the body, whatever mechanism does it."""
    model = state.model
    grad_sync = state.context.grad_sync
    if grad_sync is not None:
        with grad_sync.paused():
            yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    from torchdist._compat import is_composable_ddp

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if is_composable_ddp(model):  # replicate(): DDP's reducer behind the module's own class
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in fsdp_modules:
        module.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for module in fsdp_modules:
            module.set_requires_gradient_sync(True, recurse=False)
