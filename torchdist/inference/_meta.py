"""``init_empty``: build any model (Hugging Face models included) with its parameters on meta."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn as nn

__all__ = ["init_empty"]

M = TypeVar("M", bound=nn.Module)
# The patch below is process-wide while it lasts; the lock keeps two builds from interleaving it.
_PATCH_LOCK = threading.Lock()


def init_empty(build_fn: Callable[[], M], *, include_buffers: bool = False) -> M:
    """Call ``build_fn()`` so that every parameter it registers lands on the meta device.

    Communicates nothing. Buffers stay real by default (``include_buffers=False``), because
    non-persistent buffers (rotary frequencies, causal masks) are computed in ``__init__`` and no
    checkpoint holds them; ``include_buffers=True`` puts them on meta as well. Each parameter is
    allocated for a moment before it moves to meta, so peak memory is the largest parameter, not
    the model. Tied weights (``tie_weights()`` in ``__init__``) stay tied.

    Example::

        model = init_empty(lambda: AutoModelForCausalLM.from_config(config))
        assert all(p.is_meta for p in model.parameters())
    """
    if include_buffers:
        with torch.device("meta"):
            return build_fn()
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = dict(param.__dict__)
            moved = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(kwargs)
            module._parameters[name] = moved

    with _PATCH_LOCK:
        nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
        try:
            return build_fn()
        finally:
            nn.Module.register_parameter = original  # type: ignore[method-assign]
