"""`optimize(optimizer, scheduler)`: the optimizer step, zeroing, the scheduler, post-step hooks."""

from __future__ import annotations

import math
from typing import Any

import torch

from torchdist.errors import CompositionError, ConfigError, StepError
from torchdist.marks import after_optimizer_step_hooks
from torchdist.state import TrainState
from torchdist.transforms import _loss_scale
from torchdist.transforms._composition import Context, Layer, Phase, StepTransform

__all__ = ["optimize", "check_optimizer_covers_model"]

_NONFINITE = ("raise", "skip", "allow")


def optimize(
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    nonfinite: str = "raise",
) -> StepTransform:
    """After the inner step: ``optimizer.step()``, ``zero_grad(set_to_none=True)``, scheduler.

    ``optimizer``/``scheduler`` default to the ones in the ``TrainState``. The scheduler steps
    exactly once per applied optimizer step. Under ``accumulate(k)`` nothing happens on the
    first ``k - 1`` calls of a window (the gradients keep adding up). With fp16 loss scaling a
    step whose gradients hold inf/nan is skipped together with the scheduler, the scale backs
    off, and ``metrics["skipped"]`` says so. Hooks that model transforms registered (fp8 scale
    precompute) run after every applied step.

    ``nonfinite`` decides what a non-finite loss or gradient norm does (outside fp16, where the
    loss scale handles overflows): ``"raise"`` (default) leaves the weights untouched and raises
    ``StepError`` naming the step and the value; ``"skip"`` skips the update and reports
    ``metrics["skipped"]``; ``"allow"`` steps anyway (no host sync). The check reads one flag
    from the device per applied step.

    When the step is bound (``step.init``) it checks that the optimizer holds exactly the
    model's trainable parameters: one built before ``shard``, or that misses a trainable
    parameter, is a ``CompositionError`` naming them.

    Communicates nothing itself (a sharded optimizer's step is local to each shard).

    Example::

        step = compose(optimize(opt, scheduler), clip_grads(1.0))(value_and_grad(loss_fn))
    """
    if nonfinite not in _NONFINITE:
        raise ConfigError(f"optimize(nonfinite=) takes one of {_NONFINITE}, got {nonfinite!r}.")

    def resolve(state: TrainState) -> torch.optim.Optimizer:
        opt = optimizer if optimizer is not None else state.optimizer
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
        return opt

    def init(state: TrainState) -> None:
        from torchdist.marks import deepspeed_engine

        if deepspeed_engine(state.model) is None:
            check_optimizer_covers_model(resolve(state), state.model)
        return None

    def wrap(inner: Layer, inner_names: tuple[str, ...]) -> Layer:
        def layer(state: TrainState, batch: Any, ctx: Context):
            opt = resolve(state)
            sched = scheduler if scheduler is not None else state.scheduler
            state, metrics, outcome = inner(state, batch, ctx)
            if not outcome.update:  # mid-window: keep accumulating
                return state, metrics, outcome
            skipped = False
            scaler = state.scaler
            if scaler is not None:
                found_inf = outcome.found_inf
                if found_inf is None:
                    found_inf = _loss_scale.unscale(state.model, scaler)
                skipped = bool(found_inf.item())
                metrics = {**metrics, "skipped": found_inf.detach() > 0}
                scaler = _loss_scale.update(scaler, found_inf)
                state = state.with_transform_state("autocast", scaler)
            elif nonfinite != "allow":
                try:
                    skipped = _nonfinite(metrics, state, nonfinite)
                except StepError:  # the next call must not add to these gradients
                    opt.zero_grad(set_to_none=True)
                    raise
                if nonfinite == "skip":
                    metrics = {**metrics, "skipped": torch.tensor(skipped)}
            if not skipped:
                opt.step()
                if sched is not None:
                    sched.step()
                for hook in after_optimizer_step_hooks(state.model):
                    hook()
            opt.zero_grad(set_to_none=True)
            return state, metrics, outcome

        return layer

    info = {"nonfinite": nonfinite, "scheduler": scheduler}
    return StepTransform("optimize", Phase.OPTIMIZE, wrap, init, info=info)


def _nonfinite(metrics: Any, state: TrainState, mode: str) -> bool:
    """Whether the loss or the gradient norm is not finite; raises for ``mode == "raise"``."""
    watched = {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics}
    if not watched:
        return False
    total = None  # nan and inf survive a sum: one kernel and one host read for both values
    for value in watched.values():
        value = value.detach()
        total = value if total is None else total + value.to(total.device)
    finite = math.isfinite(total.item()) if total.numel() == 1 else bool(total.isfinite().all())
    if finite:
        return False
    if mode == "raise":
        found = ", ".join(f"{k}={float(v):g}" for k, v in watched.items())
        raise StepError(
            f"step {state.step}: {found} is not finite; the update was not applied, so the "
            "weights are still those of the previous step. Lower the learning rate, clip "
            "gradients (clip_grads), check the data of this batch, or pass "
            "optimize(..., nonfinite='skip') to skip such steps and count them."
        )
    return True


def check_optimizer_covers_model(opt: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """Raise ``CompositionError`` unless ``opt`` holds exactly ``model``'s trainable parameters.

    An optimizer built before ``shard`` holds tensors the model no longer trains (it would step
    nothing); a trainable parameter missing from it would never be updated while its gradient
    grew without end and skewed ``clip_grads``'s norm. Freeze it (``requires_grad_(False)``) or
    add it to the optimizer.
    """
    current = {id(p) for p in model.parameters()}
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    stale = len(held - current)
    if stale:
        raise CompositionError(
            f"the optimizer holds {stale} tensor(s) that are not parameters of the model being "
            "trained. Build the optimizer after the model transforms (shard, replicate, "
            "parallelize, autocast_fp8) and before any forward pass, from model.parameters()."
        )
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        shown = ", ".join(missing[:8]) + more
        raise CompositionError(
            f"{len(missing)} trainable parameter(s) are not in the optimizer: {shown}. They "
            "would never be updated, and their never-zeroed gradients would grow and skew "
            "clip_grads. Add them to the optimizer, or freeze them with requires_grad_(False)."
        )
