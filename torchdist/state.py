"""`TrainState` and the step-function protocol.

A step function is ``step(state: TrainState, batch) -> (TrainState, metrics)``, where metrics is
a pytree of tensors (``{"loss": ..., "grad_norm": ...}``) that stay on the device: no ``.item()``,
no host sync in the hot path. Step transforms (``torchdist.transforms``) map step functions to
step functions.

The interface is functional, the storage is not: **parameters, gradients and optimizer state are
updated in place**, as everywhere in PyTorch. A new ``TrainState`` comes back from each step with
the fields that are values (``step``, ``scaler``, ``extra``) replaced; ``model`` and
``optimizer`` are the same objects, mutated. Do not keep an old state expecting old weights.

Example::

    state = td.TrainState(model=model, optimizer=opt)
    for batch in loader:
        state, metrics = step(state, batch)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TrainState", "LossScale", "StepContext", "StepFn"]


@dataclass(frozen=True)
class LossScale:
    """Dynamic loss-scaling state for fp16: the scale and how many clean steps it has survived.

    Tensors on the model's device so that updating it needs no host sync. Halves
    (``backoff_factor``) on a step with an inf/nan gradient, doubles (``growth_factor``) after
    ``growth_interval`` clean steps, as ``torch.amp.GradScaler`` does.
    """

    scale: torch.Tensor
    growth_tracker: torch.Tensor
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    @classmethod
    def initial(
        cls, device: torch.device | str, init_scale: float = 2.0**16, **kw: Any
    ) -> LossScale:
        return cls(
            scale=torch.full((), init_scale, dtype=torch.float32, device=device),
            growth_tracker=torch.zeros((), dtype=torch.int32, device=device),
            **kw,
        )

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LossScale:
        return cls(**state)


@dataclass(frozen=True)
class StepContext:
    """What the step transforms of one call tell each other; empty between calls.

    Set on the way down (``loss_multiplier`` by ``accumulate``, ``autocast_dtype`` and
    ``loss_scale`` by ``autocast``, ``grad_sync`` by ``sync_grads``) and on the way up
    (``found_inf`` once fp16 gradients are unscaled).
    """

    loss_multiplier: float = 1.0
    autocast_dtype: torch.dtype | None = None
    loss_scale: torch.Tensor | None = None
    grad_sync: Any = None  # torchdist.transforms._sync_grads.GradSync
    micro_step: tuple[int, int] = (0, 1)
    found_inf: torch.Tensor | None = None  # set once gradients are unscaled

    def replace(self, **changes: Any) -> StepContext:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainState:
    """Everything a step reads and writes: model, optimizer, step count, loss scale, scheduler.

    Parameters and optimizer state update **in place** (see the module docstring); the functional
    part is the interface. ``step`` counts completed step-function calls, including fp16 steps
    whose update was skipped; ``extra`` holds the user's own values (a pytree), and ``context`` is
    owned by the step transforms during a call.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    scaler: LossScale | None = None
    scheduler: Any = None  # torch.optim.lr_scheduler.LRScheduler
    extra: Mapping[str, Any] = field(default_factory=dict)
    context: StepContext = field(default_factory=StepContext, repr=False, compare=False)

    def replace(self, **changes: Any) -> TrainState:
        """``dataclasses.replace`` as a method."""
        return dataclasses.replace(self, **changes)


StepFn = Callable[[TrainState, Any], "tuple[TrainState, Any]"]
