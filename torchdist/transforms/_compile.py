"""`compile(**kwargs)`: torch.compile the model's forward, block by block where it repeats."""

from __future__ import annotations

import weakref
from typing import Any

from torchdist.blocks import repeated_blocks
from torchdist.state import StepFn, TrainState
from torchdist.transforms._composition import Phase, StepTransform

__all__ = ["compile"]


def compile(*, regional: bool = True, **torch_compile_kwargs: Any) -> StepTransform:
    """Compile the model's forward on the first step, in place (``nn.Module.compile``).

    With ``regional=True`` each repeated block (``torchdist.blocks.repeated_blocks``: the entries
    of a ModuleList of same-class layers) is compiled — compiling one compiles the code of all,
    much faster than the whole model and with graph breaks kept local, as Accelerate and
    torchtitan do — or the whole model when it has none. AOTAutograd compiles the backward along
    with it. The losses equal eager ones up to floating-point reassociation. Communicates
    nothing.

    Example::

        step = compose(optimize(opt), compile(dynamic=False))(value_and_grad(loss_fn))
    """
    compiled: weakref.WeakSet = weakref.WeakSet()

    def wrap(inner: StepFn, info: dict) -> StepFn:
        info.update(regional=regional, **torch_compile_kwargs)

        def step(state: TrainState, batch: Any):
            if state.model not in compiled:
                blocks = repeated_blocks(state.model) if regional else []
                for block in [m for _, m in blocks] or [state.model]:
                    block.compile(**torch_compile_kwargs)
                info["compiled"] = len(blocks) or 1
                compiled.add(state.model)
            return inner(state, batch)

        return step

    return StepTransform("compile", Phase.FORWARD, wrap)
