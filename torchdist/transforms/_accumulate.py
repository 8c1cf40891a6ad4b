"""Gradient accumulation: `accumulate(k)` across calls, `microbatches(n)` within one call.

``accumulate(k)`` is Accelerate's ``gradient_accumulation_steps=k`` and optax's ``MultiSteps``:
each call of the step is one micro-batch from the loader; gradients add up in ``param.grad``;
the optimizer (and the scheduler, and clipping) act on every k-th call only. Its state,
``state.transforms["accumulate"]``, is an ``AccumulateState`` (where in the window this call
is); a checkpoint taken in the middle of a window also holds the partial gradient sum.

``microbatches(n)`` splits each batch into ``n`` equal pieces along dim 0 and runs them in one
call (the optimizer steps every call): memory of a small batch, result of the large one.

Whatever syncs gradients is off on every micro-batch but the window's last: torchdist's own
``sync_grads`` hooks, DDP's ``no_sync()`` (``replicate``), FSDP2's ``set_requires_gradient_sync``
(``shard``). So an accumulated update communicates exactly what an unaccumulated one does. With
``sync_each_batch=True`` gradients sync on every micro-batch instead (less memory under FSDP:
the unsharded gradients are not kept between micro-batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import optree
import torch

from torchdist.errors import CompositionError, ConfigError, StepError
from torchdist.state import TrainState
from torchdist.transforms._composition import Context, Layer, Outcome, Phase, StepTransform

__all__ = [
    "accumulate",
    "microbatches",
    "AccumulateState",
    "gradient_sync_disabled",
    "split_batch",
]


@dataclass(frozen=True)
class AccumulateState:
    """Where the current accumulation window stands: ``count`` micro-batches of ``k`` are in
    ``param.grad`` already (0 at a window boundary)."""

    count: int
    k: int

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count, "k": self.k}

    @classmethod
    def from_state_dict(cls, saved: Mapping[str, Any]) -> AccumulateState:
        return cls(int(saved["count"]), int(saved["k"]))

    @property
    def mid_window(self) -> bool:
        return self.count > 0


def accumulate(k: int, *, sync_each_batch: bool = False) -> StepTransform:
    """Accumulate gradients over ``k`` calls; the optimizer steps on every k-th call.

    Each call's loss is scaled by ``1/k``, so the update is the gradient of the mean loss over
    the window's micro-batches (equal-sized ones; for padded token losses see
    ``torchdist.data``). ``metrics["update"]`` (a bool tensor) says whether this call closed a
    window; ``clip_grads``/``optimize`` act only then and report only then.

    Communicates: nothing on the first ``k - 1`` calls of a window (unless ``sync_each_batch``);
    on the last, whatever the gradient sync mechanism does (see the module docstring). On a
    DeepSpeed engine, the engine's ``gradient_accumulation_steps`` must equal ``k``.

    Example::

        step = compose(optimize(opt), sync_grads(topo), accumulate(4))(value_and_grad(loss_fn))
        for batch in loader:                     # the optimizer steps after batches 4, 8, ...
            state, metrics = step(state, batch)
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"accumulate(k) needs a positive int, got {k!r}.")
    flags = [torch.tensor(False), torch.tensor(True)]  # constants: no allocation per call

    def init(state: TrainState) -> AccumulateState:
        return AccumulateState(0, k)

    def restore(state: TrainState, saved: Mapping[str, Any]) -> AccumulateState:
        return _checked(AccumulateState.from_state_dict(saved))

    def _checked(acc: AccumulateState) -> AccumulateState:
        if acc.k != k and acc.count:
            raise CompositionError(
                f"the state is {acc.count} micro-batch(es) into an accumulate({acc.k}) window, "
                f"but this step has accumulate({k}); resume with the same k (or from a "
                "checkpoint saved at a window boundary)."
            )
        return acc if acc.k == k else AccumulateState(0, k)

    def wrap(inner: Layer, inner_names: tuple[str, ...]) -> Layer:
        def layer(state: TrainState, batch: Any, ctx: Context):
            acc = state.transforms["accumulate"]
            if acc.k != k:
                acc = _checked(acc)
            index = acc.count
            last = index == k - 1
            sub = ctx.replace(loss_multiplier=ctx.loss_multiplier / k, micro_step=(index, k))
            if last or sync_each_batch:
                state, metrics, outcome = inner(state, batch, sub)
            else:
                with gradient_sync_disabled(state.model, ctx.grad_sync):
                    state, metrics, outcome = inner(state, batch, sub)
            state = state.with_transform_state(
                "accumulate", dataclasses.replace(acc, count=0 if last else index + 1)
            )
            metrics = {**metrics, "update": flags[last]}
            return state, metrics, outcome.replace(update=last and outcome.update)

        return layer

    info = {"k": k, "sync_each_batch": sync_each_batch}
    return StepTransform("accumulate", Phase.ACCUMULATE, wrap, init, restore, info)


def microbatches(n: int) -> StepTransform:
    """Split each batch into ``n`` micro-batches along dim 0 and accumulate them in one call.

    The loss of each is scaled by ``1/n``; metrics are averaged over them. A batch whose leading
    dimension ``n`` does not divide raises ``StepError``. Communicates: nothing on micro-batches
    ``0..n-2``; on the last, whatever the gradient sync does.

    Example::

        step = compose(optimize(opt), sync_grads(topo), microbatches(4))(value_and_grad(loss_fn))
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"microbatches(n) needs a positive int, got {n!r}.")

    def wrap(inner: Layer, inner_names: tuple[str, ...]) -> Layer:
        def layer(state: TrainState, batch: Any, ctx: Context):
            all_metrics, outcome = [], Outcome()
            for index, micro in enumerate(split_batch(batch, n)):
                sub = ctx.replace(loss_multiplier=ctx.loss_multiplier / n, micro_step=(index, n))
                if index == n - 1:
                    state, metrics, outcome = inner(state, micro, sub)
                else:
                    with gradient_sync_disabled(state.model, ctx.grad_sync):
                        state, metrics, _ = inner(state, micro, sub)
                all_metrics.append(metrics)
            return state, _mean_metrics(all_metrics), outcome

        return layer

    return StepTransform("microbatches", Phase.ACCUMULATE, wrap, info={"micro_batches": n})


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
                    f"microbatches({n}) cannot split a batch with leading dimension "
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
def gradient_sync_disabled(model: torch.nn.Module, grad_sync: Any = None) -> Iterator[None]:
    """Turn off the gradient sync of ``model`` for the body, whatever mechanism does it:
    ``grad_sync`` (``sync_grads``'s engine, from the call's context), DDP's ``no_sync``,
    composable ``replicate``, FSDP2's ``set_requires_gradient_sync``."""
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
