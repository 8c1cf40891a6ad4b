"""Step transforms: ``step -> step``, composed outermost first, each with its state as data.

The order that works: ``compose(optimize(...), clip_grads(...), sync_grads(...),
accumulate(...) | microbatches(...), autocast(...))(value_and_grad(loss_fn))``. A transform's
state lives in ``TrainState.transforms[name]`` (see ``docs/step_transforms.md``).
``checkpoint_activations`` and ``compile`` are model transforms (``model -> model``).
"""

from torchdist.transforms._accumulate import AccumulateState, accumulate, microbatches
from torchdist.transforms._autocast import autocast
from torchdist.transforms._checkpoint_activations import checkpoint_activations
from torchdist.transforms._clip_grads import clip_grads
from torchdist.transforms._compile import compile, compiled_regions
from torchdist.transforms._composition import (
    Context,
    Outcome,
    Phase,
    Step,
    StepTransform,
    compose,
)
from torchdist.transforms._context_parallel import context_parallel
from torchdist.transforms._optimize import optimize
from torchdist.transforms._pipeline import PipelineState, pipeline_value_and_grad
from torchdist.transforms._sync_grads import SyncGradsState, sync_grads
from torchdist.transforms._value_and_grad import value_and_grad

__all__ = [
    "compose",
    "value_and_grad",
    "pipeline_value_and_grad",
    "context_parallel",
    "autocast",
    "accumulate",
    "microbatches",
    "sync_grads",
    "clip_grads",
    "optimize",
    "compile",
    "compiled_regions",
    "checkpoint_activations",
    "Step",
    "StepTransform",
    "Phase",
    "Context",
    "Outcome",
    "AccumulateState",
    "SyncGradsState",
    "PipelineState",
]
