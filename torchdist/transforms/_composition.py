"""`StepTransform` and `compose`: step functions in, step functions out, in an order that works.

Every step transform has a name and a phase. Phases say where in the step a transform acts, and
therefore which transform may wrap which: a transform may only wrap transforms of a later phase.
The one order that works, outermost first::

    optimize  >  clip_grads  >  sync_grads  >  accumulate  >  autocast / compile  >  value_and_grad

(``autocast`` and ``compile`` share a phase and may come in either order.) Gradients must be
synced before they are clipped, clipped before the optimizer uses them; accumulation repeats
everything up to the sync; autocast and compile shape the forward. A transform applied twice, or
out of this order, raises ``CompositionError`` naming the order above — when ``compose`` is
called, and again when a transform is applied to a step function by hand.

Example::

    step = compose(optimize(opt), clip_grads(1.0), accumulate(4))(value_and_grad(loss_fn))
    assert compose(compose(optimize(opt), clip_grads(1.0)), accumulate(4))(base).chain == step.chain
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchdist.errors import CompositionError
from torchdist.state import StepFn

__all__ = ["Phase", "StepTransform", "compose", "chain_of", "CANONICAL_ORDER", "step_function"]


class Phase(enum.IntEnum):
    """Where a transform acts; lower phases wrap higher ones."""

    OPTIMIZE = 0
    CLIP = 1
    SYNC = 2
    ACCUMULATE = 3
    FORWARD = 4
    BASE = 5


CANONICAL_ORDER = (
    "compose(optimize(...), clip_grads(...), sync_grads(...), accumulate(...), "
    "autocast(...) / compile(...))(value_and_grad(loss_fn))"
)


def chain_of(step: Callable[..., Any]) -> tuple[tuple[str, Phase], ...]:
    """The transforms a step function was built from, innermost (the base) first."""
    return getattr(step, "chain", ())


def step_function(fn: StepFn, chain: tuple[tuple[str, Phase], ...], info: dict) -> StepFn:
    """Tag ``fn`` with its chain and its transforms' report (``fn.info``)."""
    fn.chain = chain  # type: ignore[attr-defined]
    fn.info = info  # type: ignore[attr-defined]
    return fn


def _check_wrap(name: str, phase: Phase, inner: tuple[tuple[str, Phase], ...]) -> None:
    for inner_name, _ in inner:
        if inner_name == name:
            raise CompositionError(
                f"{name} is applied twice; each step transform may appear once. The order that "
                f"works: {CANONICAL_ORDER}."
            )
    for inner_name, inner_phase in inner:
        if inner_phase < phase:
            raise CompositionError(
                f"{name} cannot wrap {inner_name}: {inner_name} must be outside {name}. "
                f"{_why(name, inner_name)}The order that works, outermost first: "
                f"{CANONICAL_ORDER}."
            )


def _why(outer: str, inner: str) -> str:
    reasons = {
        ("sync_grads", "clip_grads"): "Gradients must be synced across ranks before they are "
        "clipped, or each rank clips by a different norm. ",
        ("accumulate", "optimize"): "accumulate runs its inner step on every micro-batch; with "
        "optimize inside, the optimizer would step on every micro-batch. ",
        ("accumulate", "sync_grads"): "sync_grads must see all micro-batches to sync only on "
        "the last one. ",
        ("accumulate", "clip_grads"): "clipping must see the accumulated gradient. ",
    }
    return reasons.get((outer, inner), "")


@dataclass(frozen=True)
class StepTransform:
    """A named, phased ``step_fn -> step_fn`` map. Calling it on a step function applies it.

    ``wrap(inner, info)`` builds the new step function; ``info`` is a dict the transform may
    fill with what it decided (e.g. ``sync_grads`` stepping aside), readable as ``step.info``.
    """

    name: str
    phase: Phase
    wrap: Callable[[StepFn, dict], StepFn]

    def __call__(self, step: StepFn) -> StepFn:
        if not callable(step):
            raise CompositionError(
                f"{self.name} expects a step function step(state, batch) -> (state, metrics), "
                f"got {type(step).__name__}. Start from value_and_grad(loss_fn)."
            )
        inner = chain_of(step) or (("step", Phase.BASE),)
        _check_wrap(self.name, self.phase, inner)
        info = dict(getattr(step, "info", {}))
        info[self.name] = {}
        wrapped = self.wrap(step, info[self.name])
        functools.update_wrapper(wrapped, step, assigned=("__doc__",), updated=())
        return step_function(wrapped, inner + ((self.name, self.phase),), info)

    def __repr__(self) -> str:
        return f"<step transform {self.name}>"


@dataclass(frozen=True)
class _Composed:
    transforms: tuple[StepTransform, ...]  # outermost first

    @property
    def name(self) -> str:
        return "compose(" + ", ".join(t.name for t in self.transforms) + ")"

    def __call__(self, step: StepFn) -> StepFn:
        for transform in reversed(self.transforms):
            step = transform(step)
        return step


def compose(*transforms: StepTransform | _Composed) -> _Composed:
    """``compose(f, g, h)(step) == f(g(h(step)))``; outermost first. Nests: compose of composes.

    Checks the order at once (see the module docstring) and raises ``CompositionError`` naming
    the order that works. Communicates nothing itself.
    """
    flat: list[StepTransform] = []
    for transform in transforms:
        if isinstance(transform, _Composed):
            flat.extend(transform.transforms)
        elif isinstance(transform, StepTransform):
            flat.append(transform)
        else:
            hint = ""
            if callable(transform) and chain_of(transform):
                hint = " It looks like a step function: pass it to the composed transform instead."
            raise CompositionError(
                f"compose() takes step transforms (optimize(...), clip_grads(...), ...), got "
                f"{transform!r}.{hint}"
            )
    inner: tuple[tuple[str, Phase], ...] = ()
    for transform in reversed(flat):
        _check_wrap(transform.name, transform.phase, inner)
        inner = inner + ((transform.name, transform.phase),)
    return _Composed(tuple(flat))
