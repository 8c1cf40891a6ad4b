"""`pipeline_value_and_grad(loss_fn, microbatches=n)`: the base step of a pipelined model.

In place of ``value_and_grad``'s one forward and backward, it runs the model's
``torch.distributed.pipelining`` schedule (the one ``torchdist.sharding.pipeline`` chose) over
``n`` micro-batches of the batch. Every rank calls it with the same ``(inputs, target)`` batch
(its data-parallel share); the first stage reads ``inputs``, the last stage ``target``. Further
elements, ``(inputs, target, *extra)``, are more inputs of the first stage: ``context_parallel``
appends the positions of the tokens this way, so pp and cp compose.

* ``loss_fn(output, target) -> scalar`` is called by the last stage on each micro-batch
  (torch's convention: the last stage's output, not the model).
* The gradient is the one of the whole batch's mean loss: each micro-batch's loss is
  multiplied by ``1/n`` (and by ``accumulate``'s multiplier and the fp16 loss scale) before its
  backward, so torch's own gradient scaling is off (``scale_grads=False``).
* Under ``sync_grads`` the gradient buckets are all-reduced once, after the schedule's last
  backward (not overlapped with it); ``shard``-ed stages reduce-scatter as torch's schedule
  drives FSDP2.
* The loss reported, ``metrics["loss"]``, is the mean of the ``n`` micro-batch losses, the
  whole batch's loss for a mean-reduced ``loss_fn``, on **every** rank: one all-reduce (sum)
  over the pp mesh from the last stage's rank.

Its state, ``TrainState.transforms["pipeline"]`` (a ``PipelineState``), holds the stage objects
and the schedule; it is built on the first call (after every model transform) and is not part
of a checkpoint: it holds nothing a new run cannot rebuild from the model.

Composes with the step transforms as ``value_and_grad`` does: ``optimize``, ``clip_grads``
(its norm sums over the pp mesh too: ``torchdist.transforms._clip_grads``), ``sync_grads``,
``accumulate`` and ``autocast`` (the whole schedule runs under its dtype).

Example::

    model = pipeline(model, topo, schedule="GPipe")
    step = compose(optimize(opt), clip_grads(1.0))(
        pipeline_value_and_grad(lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()),
                                microbatches=4))
    state, metrics = step(state, (x, y))       # metrics["loss"]: the whole batch's, every rank
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchdist._compat import set_schedule_loss
from torchdist.errors import CompositionError, ConfigError, StepError
from torchdist.state import TrainState
from torchdist.transforms._composition import Base, Context, Outcome, Step

__all__ = ["pipeline_value_and_grad", "PipelineState"]

_NAME = "pipeline"
# Schedules whose backward is split into input (B) and weight (W) parts (zero bubble).
_SPLIT_BACKWARD = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


@dataclass(frozen=True, eq=False)
class PipelineState:
    """The schedule of one pipelined model: its stages (``PipelineStage``), the schedule object
    and what it was built for. Rebuilt, never checkpointed."""

    model: torch.nn.Module
    schedule: Any
    stages: tuple[Any, ...]
    microbatches: int
    holds_first: bool
    holds_last: bool
    group: Any  # the pp process group

    def report(self) -> dict[str, Any]:
        return {
            "schedule": type(self.schedule).__name__,
            "stages": tuple(s.stage_index for s in self.stages),
            "microbatches": self.microbatches,
        }


def pipeline_value_and_grad(
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], *, microbatches: int
) -> Step:
    """The base step of a ``pipeline``-split model: its schedule over ``microbatches``
    micro-batches of each ``(inputs, target)`` batch; ``{"loss": whole batch's loss}``.

    ``inputs`` is a tensor or a tuple of tensors (the model's positional arguments), split on
    dim 0 like ``target``. A batch whose size ``microbatches`` does not divide is a
    ``StepError``; a model ``pipeline`` did not split is a ``CompositionError``.

    Communicates: the schedule's point-to-point sends and receives of activations (forward)
    and their gradients (backward) between neighbouring stages over the pp mesh (one each way
    per micro-batch and stage boundary; the first call also exchanges shapes), then one
    all-reduce of the loss over the pp mesh.

    Example::

        step = compose(optimize(opt))(pipeline_value_and_grad(F.mse_loss, microbatches=2))
    """
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ConfigError(
            f"pipeline_value_and_grad(microbatches=) needs an int >= 1, got {microbatches!r}."
        )

    def layer(state: TrainState, batch: Any, ctx: Context) -> tuple[TrainState, Any, Outcome]:
        current = state.transforms.get(_NAME)
        if (
            not isinstance(current, PipelineState)
            or current.model is not state.model
            or current.microbatches != microbatches  # another step over the same state
        ):
            current = _build(state.model, loss_fn, microbatches)
            state = state.with_transform_state(_NAME, current)
        inputs, target = _split_batch(batch, microbatches)
        recorded: list[torch.Tensor] = []
        _set_loss(current.schedule, _micro_loss(loss_fn, microbatches, ctx, recorded))
        if ctx.autocast_dtype is not None:
            device = current.stages[0].device
            forward = torch.autocast(torch.device(device).type, dtype=ctx.autocast_dtype)
        else:
            forward = contextlib.nullcontext()
        args = inputs if current.holds_first else ()
        with forward, _one_sync_after_all(ctx.grad_sync):
            current.schedule.step(*args, target=target if current.holds_last else None)
        return state, {"loss": _whole_batch_loss(current, recorded, microbatches)}, _DONE

    return Step(Base(loss_fn, False, layer))


_DONE = Outcome()


def _split_batch(batch: Any, n: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise StepError(
            f"pipeline_value_and_grad takes batches of (inputs, target), got "
            f"{type(batch).__name__}; the first stage reads inputs, the last stage's loss_fn "
            "target."
        )
    inputs, target, *extra = batch  # extra: more first-stage inputs (context_parallel's positions)
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    inputs = inputs + tuple(extra)
    for what, tensor in [("inputs", t) for t in inputs] + [("target", target)]:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            raise StepError(
                f"pipeline_value_and_grad: {what} must be batched tensors, got {tensor!r}."
            )
        if tensor.shape[0] % n:
            raise StepError(
                f"pipeline_value_and_grad: {n} micro-batches do not divide the batch of "
                f"{tensor.shape[0]} ({what}); use a batch size that is a multiple of {n}, or "
                "another microbatches=."
            )
    return inputs, target


def _micro_loss(loss_fn, n: int, ctx: Context, recorded: list) -> Callable:
    """What the last stage differentiates: ``loss / n`` (times ``accumulate``'s multiplier and
    the fp16 loss scale); ``recorded`` gets each loss as ``loss_fn`` returned it."""
    factor = ctx.loss_multiplier / n

    def micro_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(output, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise StepError(
                f"pipeline loss_fn(output, target) must return a scalar tensor, got "
                f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}; reduce it (mean)."
            )
        recorded.append(loss.detach().reshape(()))
        scaled = loss.reshape(()) * factor
        if ctx.loss_scale is not None:
            scaled = scaled.float() * ctx.loss_scale
        return scaled

    return micro_loss


def _whole_batch_loss(current: PipelineState, recorded: list, n: int) -> torch.Tensor:
    import torch.distributed as dist

    if current.holds_last:
        # The schedule's first call also runs the loss once to learn shapes: the step's own
        # n losses are the last ones.
        loss = torch.stack(recorded[-n:]).float().mean()
    else:
        loss = torch.zeros((), device=current.stages[0].device)
    if dist.get_world_size(current.group) > 1:
        dist.all_reduce(loss, group=current.group)
    return loss


@contextlib.contextmanager
def _one_sync_after_all(sync: Any):
    """``sync_grads``'s hooks would launch a bucket once its gradients exist, i.e. after the
    first micro-batch's backward: keep them quiet during the schedule, and let ``sync_grads``
    launch every bucket when the schedule returns (unless ``accumulate`` paused it anyway)."""
    if sync is None or sync.was_paused:
        yield
        return
    with sync.paused():
        yield
    sync.was_paused = False  # every micro-batch's backward is done: sync_grads.finish launches


def _set_loss(schedule: Any, fn: Callable) -> None:
    # torch's schedules take their loss_fn when built; ours changes per call (the Context's
    # multiplier), so it is set on the schedule before each step.
    set_schedule_loss(schedule, fn)


def _build(model: torch.nn.Module, loss_fn, n: int) -> PipelineState:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.pipelining import PipelineStage

    from torchdist._model_record import record_of
    from torchdist.sharding._pipeline import plan_of, schedule_class, stage_module

    plan = plan_of(model)
    if plan is None:
        raise CompositionError(
            "pipeline_value_and_grad runs a model split by torchdist.sharding.pipeline(model, "
            "topo); this model was not. Split it, or use value_and_grad(loss_fn)."
        )
    mesh = record_of(model).find("pipeline").mesh
    group = mesh.get_group()
    multi = len(plan.local_stages) > 1
    if multi and isinstance(model, FSDPModule) and plan.schedule in _SPLIT_BACKWARD:
        raise CompositionError(
            f"pipeline schedule {plan.schedule!r} splits each backward into an input and a "
            "weight part, and torch 2.13 cannot find shard()'s (FSDP2) unsharded weights in "
            "that split. With shard use GPipe, 1F1B, Interleaved1F1B or LoopedBFS."
        )
    device = next(model.parameters()).device
    stages = tuple(
        PipelineStage(stage_module(model, plan, s), s, plan.num_stages, device, group=group)
        for s in plan.local_stages
    )
    name, cls = schedule_class(plan.schedule)
    try:
        schedule = cls(stages[0] if not multi else list(stages), n, loss_fn=loss_fn,
                       scale_grads=False)  # fmt: skip
    except ValueError as exc:
        raise ConfigError(
            f"pipeline schedule {name} with {n} micro-batches on pp={plan.pp} "
            f"({plan.num_stages} stages): {exc} Choose microbatches= accordingly."
        ) from None
    return PipelineState(model, schedule, stages, n, plan.holds_first, plan.holds_last, group)


def norm_across_stages(
    model: torch.nn.Module, norm: torch.Tensor, norm_type: float
) -> torch.Tensor:
    """The gradient norm over every pipeline stage, from this rank's stage(s)' ``norm``.

    Communicates: one all-reduce over the pp mesh (sum of ``norm ** norm_type``, or max for
    ``inf``) when ``model`` is pipelined over more than one rank; nothing otherwise.
    """
    import math

    import torch.distributed as dist

    from torchdist._model_record import record_of

    applied = record_of(model).find("pipeline")
    if applied is None or applied.mesh is None or applied.mesh.size() == 1:
        return norm
    group = applied.mesh.get_group()
    if math.isinf(norm_type):
        total = norm.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        return total
    total = norm.detach().double().pow(norm_type)
    dist.all_reduce(total, group=group)
    return total.pow(1.0 / norm_type).to(norm.dtype)
