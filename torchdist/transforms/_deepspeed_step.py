"""The DeepSpeed backend of a composed step: chosen once, when the step is bound to an engine.

A DeepSpeed engine (``torchdist.sharding.deepspeed``) owns backward, gradient reduction, loss
scaling, clipping and the optimizer step. So when ``TrainState.model`` is an engine, the step
does not run its layers: it runs the same work on the engine, configured by the composed
transforms, and ``Step.init`` checks once that the engine was built to agree with them
(accumulation steps, clipping, dtype). Every DeepSpeed variant of a step transform is here.

Communicates: whatever the engine does (ZeRO's reduce-scatter / all-gather at the boundary).
"""

from __future__ import annotations

from typing import Any

import torch

from torchdist.errors import CompositionError
from torchdist.state import TrainState
from torchdist.transforms._value_and_grad import metrics_of, split_loss

__all__ = ["check_engine", "engine_step"]


def _by_name(step: Any) -> dict[str, Any]:
    return {t.name: t for t in step.transforms}


def _engine_dtype(engine: Any) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def check_engine(engine: Any, step: Any) -> None:
    """Raise ``CompositionError`` where the engine's config disagrees with the step's transforms."""
    transforms = _by_name(step)
    build = "build it with torchdist.sharding.deepspeed(..., {}={})"
    if "microbatches" in transforms:
        raise CompositionError(
            "microbatches(n) on a DeepSpeed engine: the engine counts its own micro-batches. Use "
            "accumulate(k) (one micro-batch per call) and " + build.format("accumulation", "k")
            + "."
        )
    k = transforms["accumulate"].info["k"] if "accumulate" in transforms else 1
    if engine.gradient_accumulation_steps() != k:
        raise CompositionError(
            f"the step accumulates over {k} call(s) but the DeepSpeed engine was built with "
            f"gradient_accumulation_steps={engine.gradient_accumulation_steps()}; "
            + build.format("accumulation", k) + "."
        )
    if "clip_grads" in transforms:
        max_norm = transforms["clip_grads"].info["max_norm"]
        if engine.gradient_clipping() != max_norm:
            raise CompositionError(
                f"clip_grads({max_norm}) on a DeepSpeed engine that clips at "
                f"{engine.gradient_clipping()}; " + build.format("clip", max_norm) + "."
            )
    if "autocast" in transforms:
        dtype = getattr(torch, transforms["autocast"].info["dtype"].replace("torch.", ""))
        if _engine_dtype(engine) != dtype:
            raise CompositionError(
                f"autocast({dtype}) on a DeepSpeed engine that computes in {_engine_dtype(engine)}"
                f": DeepSpeed owns mixed precision. " + build.format("dtype", dtype)
                + ", or drop autocast."
            )


def engine_step(step: Any, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
    """One call of ``step`` on the engine in ``state.model``: forward, ``engine.backward``,
    ``engine.step()`` (which applies the update at the accumulation boundary only)."""
    from torchdist.marks import after_optimizer_step_hooks

    engine = state.model
    transforms = _by_name(step)
    acc = state.transforms.get("accumulate")
    last = acc is None or acc.count == acc.k - 1
    loss, aux = split_loss(step.base.loss_fn(engine, batch), step.base.has_aux)
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss)  # divides by gradient_accumulation_steps, applies its loss scale
    metrics = metrics_of(loss, aux)
    if acc is not None:
        after = type(acc)(0 if last else acc.count + 1, acc.k)
        state = state.with_transform_state("accumulate", after)
        metrics["update"] = torch.tensor(last)
    if "optimize" not in transforms:
        return state, metrics
    engine.step()
    if not last:
        return state, metrics
    applied = bool(engine.was_step_applied())
    if applied:
        scheduler = _scheduler(transforms["optimize"], state)
        if scheduler is not None and scheduler is not engine.lr_scheduler:
            scheduler.step()
        for hook in after_optimizer_step_hooks(engine):
            hook()
    metrics["skipped"] = torch.tensor(not applied)
    norm = engine.get_global_grad_norm() if engine.gradient_clipping() else None
    if norm is not None:
        metrics["grad_norm"] = torch.as_tensor(float(norm))
    return state, metrics


def _scheduler(optimize: Any, state: TrainState) -> Any:
    return optimize.info.get("scheduler") or state.scheduler
