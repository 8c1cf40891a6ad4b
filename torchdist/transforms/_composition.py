"""The step-transform protocol: `StepTransform`, the per-call `Context`, `Step` and `compose`.

A step transform is data: a name, a phase, an ``init`` that computes its state for a
``TrainState`` (kept in ``state.transforms[name]``), and a ``wrap`` that turns the layer inside it
into its own layer. A layer is ``layer(state, batch, ctx) -> (state, metrics, outcome)``:

* ``ctx`` (a ``Context``) flows **down** the chain, built fresh for every call and never stored;
* ``outcome`` (an ``Outcome``) flows **up**: whether the gradients are complete so the optimizer
  may step (``accumulate`` says no on its first ``k - 1`` calls), and the fp16 found-inf flag
  once the gradients were unscaled.

``compose(...)(value_and_grad(loss_fn))`` returns a ``Step``: callable as
``step(state, batch) -> (state, metrics)``, with its ``chain`` and configuration ``info`` known
at once, and ``step.init(state)`` computing every transform's state (and so its decisions, such
as ``sync_grads`` stepping aside) before the first call. See ``docs/step_transforms.md``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchdist.errors import CompositionError
from torchdist.state import TrainState

__all__ = [
    "Phase",
    "Context",
    "Outcome",
    "StepTransform",
    "Step",
    "Base",
    "compose",
    "CANONICAL_ORDER",
    "transform_state",
]


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
    "autocast(...))(value_and_grad(loss_fn))"
)

# Why an outer transform cannot wrap an inner one; one table for every pair.
REASONS = {
    ("sync_grads", "clip_grads"): "Gradients must be synced across ranks before they are "
    "clipped, or each rank clips by a different norm. ",
    ("accumulate", "optimize"): "accumulate decides on which calls the optimizer steps; with "
    "optimize inside, the optimizer would step on every micro-batch. ",
    ("microbatches", "optimize"): "the optimizer must step once, after all micro-batches. ",
    ("accumulate", "sync_grads"): "sync_grads must see every micro-batch to sync only on the "
    "last one. ",
    ("accumulate", "clip_grads"): "clipping must see the accumulated gradient. ",
}

# Transforms of one phase that exclude each other (they answer the same question twice).
EXCLUSIVE = {
    frozenset({"accumulate", "microbatches"}): "accumulate(k) accumulates across k calls; "
    "microbatches(n) splits each batch into n. Use one of them."
}


@dataclass(frozen=True)
class Context:
    """What the transforms of one call tell the layers inside them; built fresh per call.

    ``loss_multiplier`` (``accumulate``), ``autocast_dtype`` and ``loss_scale`` (``autocast``),
    ``grad_sync`` (``sync_grads``'s engine, so ``accumulate`` can pause it), ``micro_step``
    (``(index, count)`` in the accumulation window).
    """

    loss_multiplier: float = 1.0
    autocast_dtype: torch.dtype | None = None
    loss_scale: torch.Tensor | None = None
    grad_sync: Any = None
    micro_step: tuple[int, int] = (0, 1)

    def replace(self, **changes: Any) -> Context:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Outcome:
    """What the layers inside tell the one outside: are the gradients complete, were they
    unscaled (fp16: the found-inf flag, a 0-dim float tensor)."""

    update: bool = True
    found_inf: torch.Tensor | None = None

    def replace(self, **changes: Any) -> Outcome:
        return dataclasses.replace(self, **changes)


Layer = Callable[[TrainState, Any, Context], "tuple[TrainState, Any, Outcome]"]


@dataclass(frozen=True)
class StepTransform:
    """A named, phased step transform: ``step -> step``. Calling it on a step applies it.

    ``wrap(inner_layer, inner_names)`` builds this transform's layer; ``inner_names`` are the
    transforms inside it (so ``optimize`` knows whether ``accumulate`` is there). ``init(state)``
    returns this transform's state for ``state`` (or None), kept in ``state.transforms[name]``;
    ``restore(state, saved)`` rebuilds it from what its ``state_dict()`` returned in a
    checkpoint. ``info`` is its configuration.
    """

    name: str
    phase: Phase
    wrap: Callable[[Layer, tuple[str, ...]], Layer]
    init: Callable[[TrainState], Any] | None = None
    restore: Callable[[TrainState, Mapping[str, Any]], Any] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, step: Step) -> Step:
        if not isinstance(step, Step):
            raise CompositionError(
                f"{self.name} expects a step built from value_and_grad(loss_fn), got "
                f"{type(step).__name__}. Start from value_and_grad(loss_fn)."
            )
        _check_wrap(self, step.transforms)
        return Step(step.base, step.transforms + (self,))

    def __repr__(self) -> str:
        return f"<step transform {self.name}>"


@dataclass(frozen=True)
class Base:
    """The innermost step: forward and backward of a user ``loss_fn``."""

    loss_fn: Callable[..., Any]
    has_aux: bool
    layer: Layer


class _Unrestored(dict):
    """A transform's state read from a checkpoint before the step that owns it was bound."""


def transform_state(state: TrainState, name: str) -> Any:
    """``state.transforms[name]``, or a ``CompositionError`` saying the step was not bound."""
    try:
        return state.transforms[name]
    except KeyError:
        raise CompositionError(
            f"TrainState holds no state for the step transform {name!r}: call the step "
            "function itself (or step.init(state)), not one of its layers."
        ) from None


@dataclass(frozen=True, eq=False)
class Step:
    """A composed step function: ``step(state, batch) -> (state, metrics)``.

    ``chain`` lists ``(name, phase)`` innermost (the base) first; ``info`` maps each transform's
    name to its configuration. ``init(state)`` puts every transform's state into
    ``state.transforms`` (the first call does it too, when it is missing). Each call advances
    ``state.step`` by one, whether or not the optimizer stepped.
    """

    base: Base
    transforms: tuple[StepTransform, ...] = ()  # innermost first

    def __post_init__(self) -> None:
        layer, names = self.base.layer, ()
        for transform in self.transforms:
            layer = transform.wrap(layer, names)
            names = names + (transform.name,)
        object.__setattr__(self, "_layer", layer)

    @property
    def chain(self) -> tuple[tuple[str, Phase], ...]:
        return (("value_and_grad", Phase.BASE),) + tuple((t.name, t.phase) for t in self.transforms)

    @property
    def info(self) -> dict[str, dict[str, Any]]:
        return {"value_and_grad": {}, **{t.name: dict(t.info) for t in self.transforms}}

    def report(self, state: TrainState) -> dict[str, dict[str, Any]]:
        """``info``, with what each transform decided for ``state``'s model merged in (e.g.
        ``report(state)["sync_grads"]["steps_aside"]``); binds ``state`` first if needed."""
        state = self._bound(state)
        out = self.info
        for transform in self.transforms:
            decided = getattr(state.transforms.get(transform.name), "report", None)
            if callable(decided):
                out[transform.name].update(decided())
        return out

    def _bound(self, state: TrainState) -> TrainState:
        for transform in self.transforms:
            if isinstance(state.transforms.get(transform.name, _MISSING), (_Unrestored, _Missing)):
                return self.init(state)
        return state

    def init(self, state: TrainState) -> TrainState:
        """``state`` with each transform's state computed (or restored from a checkpoint).

        Checks what can only be checked against the model (a DeepSpeed engine whose config
        disagrees with the transforms, an optimizer that does not hold the model's parameters)
        and raises ``CompositionError`` before any step runs. Communicates nothing, except
        what a transform's own ``init`` documents.
        """
        from torchdist.marks import deepspeed_engine

        engine = deepspeed_engine(state.model)
        if engine is not None:
            from torchdist.transforms._deepspeed_step import check_engine

            check_engine(engine, self)
        states = dict(state.transforms)
        for transform in self.transforms:
            current = states.get(transform.name, _MISSING)
            if isinstance(current, _Unrestored):
                if transform.restore is None:
                    raise CompositionError(
                        f"the checkpoint holds state for {transform.name!r}, which cannot "
                        "restore any; drop it from the checkpoint or the step."
                    )
                states[transform.name] = transform.restore(state, current)
            elif current is _MISSING:
                states[transform.name] = (
                    transform.init(state.replace(transforms=states))
                    if transform.init is not None
                    else None
                )
        return state.replace(transforms=states)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        if not isinstance(state, TrainState):
            raise CompositionError(
                f"a step function takes (TrainState, batch), got {type(state).__name__} first."
            )
        state = self._bound(state)
        from torchdist.marks import deepspeed_engine

        if deepspeed_engine(state.model) is not None:
            from torchdist.transforms._deepspeed_step import engine_step

            state, metrics = engine_step(self, state, batch)
        else:
            state, metrics, _ = self._layer(state, batch, Context())  # type: ignore[attr-defined]
        return state.replace(step=state.step + 1), metrics

    def __repr__(self) -> str:
        names = ", ".join(t.name for t in reversed(self.transforms))
        return f"<step {names}{'(' if names else ''}value_and_grad{')' if names else ''}>"


class _Missing:
    pass


_MISSING = _Missing()


def _check_wrap(transform: StepTransform, inner: tuple[StepTransform, ...]) -> None:
    for other in inner:
        if other.name == transform.name:
            raise CompositionError(
                f"{transform.name} is applied twice; each step transform may appear once. The "
                f"order that works: {CANONICAL_ORDER}."
            )
        exclusive = EXCLUSIVE.get(frozenset({other.name, transform.name}))
        if exclusive:
            raise CompositionError(f"{transform.name} with {other.name}: {exclusive}")
    for other in inner:
        if other.phase < transform.phase:
            raise CompositionError(
                f"{transform.name} cannot wrap {other.name}: {other.name} must be outside "
                f"{transform.name}. {REASONS.get((transform.name, other.name), '')}The order "
                f"that works, outermost first: {CANONICAL_ORDER}."
            )


@dataclass(frozen=True)
class Composed:
    """Step transforms composed, outermost first; itself a step transform of steps."""

    transforms: tuple[StepTransform, ...]

    @property
    def name(self) -> str:
        return "compose(" + ", ".join(t.name for t in self.transforms) + ")"

    def __call__(self, step: Step) -> Step:
        for transform in reversed(self.transforms):
            step = transform(step)
        return step


def compose(*transforms: StepTransform | Composed) -> Composed:
    """``compose(f, g, h)(step) == f(g(h(step)))``; outermost first. Nests: compose of composes.

    Checks the order at once and raises ``CompositionError`` naming the order that works.
    Communicates nothing itself.

    Example::

        step = compose(optimize(opt), clip_grads(1.0), accumulate(4))(value_and_grad(loss_fn))
        state = step.init(td.TrainState(model, opt))   # every transform's state, decided now
    """
    flat: list[StepTransform] = []
    for transform in transforms:
        if isinstance(transform, Composed):
            flat.extend(transform.transforms)
        elif isinstance(transform, StepTransform):
            flat.append(transform)
        else:
            hint = ""
            if isinstance(transform, Step):
                hint = " It looks like a step function: pass it to the composed transform instead."
            raise CompositionError(
                f"compose() takes step transforms (optimize(...), clip_grads(...), ...), got "
                f"{transform!r}.{hint}"
            )
    inner: tuple[StepTransform, ...] = ()
    for transform in reversed(flat):
        _check_wrap(transform, inner)
        inner = inner + (transform,)
    return Composed(tuple(flat))
