"""Step transforms: ``step_fn -> step_fn``, composed outermost first.

The order that works: ``compose(optimize(...), clip_grads(...), sync_grads(...),
accumulate(...), autocast(...) / compile(...))(value_and_grad(loss_fn))``.
"""

from torchdist.transforms._accumulate import accumulate
from torchdist.transforms._autocast import autocast
from torchdist.transforms._checkpoint_activations import checkpoint_activations
from torchdist.transforms._clip_grads import clip_grads
from torchdist.transforms._compile import compile
from torchdist.transforms._composition import Phase, StepTransform, compose
from torchdist.transforms._optimize import optimize
from torchdist.transforms._sync_grads import sync_grads
from torchdist.transforms._value_and_grad import value_and_grad

__all__ = [
    "compose",
    "value_and_grad",
    "autocast",
    "accumulate",
    "sync_grads",
    "clip_grads",
    "optimize",
    "compile",
    "checkpoint_activations",
    "StepTransform",
    "Phase",
]
