"""`optimize(optimizer, scheduler)`: the optimizer step, zeroing, the scheduler, post-step hooks."""

from __future__ import annotations

from typing import Any

import torch

from torchdist.errors import CompositionError
from torchdist.marks import after_optimizer_step_hooks, deepspeed_engine
from torchdist.state import StepFn, TrainState
from torchdist.transforms._autocast import unscale_grads, update_scale
from torchdist.transforms._composition import Phase, StepTransform

__all__ = ["optimize"]


def optimize(
    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
) -> StepTransform:
    """After the inner step: ``optimizer.step()``, ``zero_grad(set_to_none=True)``, scheduler.

    ``optimizer``/``scheduler`` default to the ones in the ``TrainState``. The scheduler steps
    exactly once per applied optimizer step — once per process, not once per rank. With fp16
    loss scaling, a step whose gradients hold inf/nan is skipped together with the scheduler,
    the scale backs off, and ``metrics["skipped"]`` says so (this one check syncs with the host).
    Hooks that model transforms registered (e.g. fp8 dynamic-scale precompute) run after every
    applied step. ``TrainState.step`` is incremented.

    On a DeepSpeed engine the step is ``engine.step()`` (which also clips and zeroes); the
    engine's clipped norm is reported as ``metrics["grad_norm"]``.

    Communicates nothing itself (a sharded optimizer's step is local to each shard).

    Example::

        step = compose(optimize(opt, scheduler), clip_grads(1.0))(value_and_grad(loss_fn))
    """

    checked: set[tuple[int, int]] = set()

    def wrap(inner: StepFn, info: dict) -> StepFn:
        def step(state: TrainState, batch: Any):
            opt = optimizer if optimizer is not None else state.optimizer
            sched = scheduler if scheduler is not None else state.scheduler
            if opt is None:
                raise CompositionError(
                    "optimize() has no optimizer: pass one, optimize(opt), or put it in "
                    "TrainState(model, optimizer=opt)."
                )
            if state.optimizer is not None and opt is not state.optimizer:
                raise CompositionError(
                    "optimize(opt) was given a different optimizer than TrainState.optimizer; "
                    "checkpoints would save the wrong one. Pass the same object, or leave one out."
                )
            engine = deepspeed_engine(state.model)
            if engine is None and (id(opt), id(state.model)) not in checked:
                _check_optimizer_holds_model_parameters(opt, state.model)
                checked.add((id(opt), id(state.model)))
            state, metrics = inner(state, batch)
            if engine is not None:
                return _engine_step(engine, state, metrics, sched)
            skipped = False
            if state.scaler is not None:
                state = unscale_grads(state)
                found_inf = state.context.found_inf
                skipped = bool(found_inf.item())
                metrics = {**metrics, "skipped": found_inf.detach() > 0}
                state = state.replace(scaler=update_scale(state.scaler, found_inf))
            if not skipped:
                opt.step()
                if sched is not None:
                    sched.step()
                for hook in after_optimizer_step_hooks(state.model):
                    hook()
            opt.zero_grad(set_to_none=True)
            ctx = state.context.replace(found_inf=None)
            return state.replace(step=state.step + 1, context=ctx), metrics

        return step

    return StepTransform("optimize", Phase.OPTIMIZE, wrap)


def _check_optimizer_holds_model_parameters(
    opt: torch.optim.Optimizer, model: torch.nn.Module
) -> None:
    """An optimizer built before ``shard`` (or after a forward that left FSDP's parameters
    unsharded) holds tensors the model no longer trains: it would silently step nothing."""
    current = {id(p) for p in model.parameters()}
    stale = sum(1 for group in opt.param_groups for p in group["params"] if id(p) not in current)
    if stale:
        raise CompositionError(
            f"the optimizer holds {stale} tensor(s) that are not parameters of the model being "
            "trained. Build the optimizer after the model transforms (shard, replicate, "
            "parallelize, autocast_fp8) and before any forward pass, from model.parameters()."
        )


def _engine_step(engine: Any, state: TrainState, metrics: Any, scheduler: Any):
    """DeepSpeed's step: optimizer (at the accumulation boundary), clipping, zeroing, its loss
    scale. A scheduler handed to ``optimize`` steps when the engine applied its update."""
    engine.step()
    applied = engine.was_step_applied()
    if applied:
        if scheduler is not None and scheduler is not engine.lr_scheduler:
            scheduler.step()
        for hook in after_optimizer_step_hooks(state.model):
            hook()
    metrics = {**metrics, "skipped": torch.tensor(not applied)}
    norm = engine.get_global_grad_norm() if engine.gradient_clipping() else None
    if norm is not None:
        metrics["grad_norm"] = torch.as_tensor(float(norm))
    return state.replace(step=state.step + 1), metrics
