"""`TrainState` and the step-function protocol.

A step function is ``step(state: TrainState, batch) -> (TrainState, metrics)``, where metrics is
a pytree of tensors (``{"loss": ..., "grad_norm": ...}``) that stay on the device: no ``.item()``,
no host sync in the hot path. Step transforms (``torchdist.transforms``) map step functions to
step functions.

The interface is functional, the storage is not: **parameters, gradients and optimizer state are
updated in place**, as everywhere in PyTorch. A new ``TrainState`` comes back from each step with
the fields that are values (``step``, ``extra``, ``transforms``) replaced; ``model`` and
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

__all__ = ["TrainState", "LossScale", "StepFn"]


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
        import math

        if not (math.isfinite(init_scale) and init_scale > 0):
            from torchdist.errors import ConfigError

            raise ConfigError(
                f"LossScale init_scale={init_scale!r}: a loss scale must be a finite number > 0 "
                "(inf or nan would skip every step, 0 would zero every gradient); "
                "use the default 2**16."
            )
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
class TrainState:
    """Everything a step reads and writes: model, optimizer, step count, scheduler, transforms.

    Parameters and optimizer state update **in place** (see the module docstring); the functional
    part is the interface. ``step`` counts completed step-function calls (with ``accumulate(k)``
    the optimizer steps on every k-th); ``extra`` holds the user's own values (a pytree);
    ``transforms`` maps each step transform's name to its state (``step.init(state)`` fills it:
    the accumulation counter, the fp16 loss scale, what ``sync_grads`` decided), and is
    checkpointed with the rest.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    scheduler: Any = None  # torch.optim.lr_scheduler.LRScheduler
    extra: Mapping[str, Any] = field(default_factory=dict)
    transforms: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scaler(self) -> LossScale | None:
        """The fp16 loss scale that ``autocast(torch.float16)`` keeps, or None."""
        scale = self.transforms.get("autocast")
        return scale if isinstance(scale, LossScale) else None

    def replace(self, **changes: Any) -> TrainState:
        """``dataclasses.replace`` as a method."""
        return dataclasses.replace(self, **changes)

    def with_transform_state(self, name: str, value: Any) -> TrainState:
        """This state with ``transforms[name]`` set to ``value``."""
        return dataclasses.replace(self, transforms={**self.transforms, name: value})


StepFn = Callable[[TrainState, Any], "tuple[TrainState, Any]"]
