"""Which submodules a model transform acts on: "blocks", chosen by default or by the caller.

The default is the repeated blocks: the entries of every ``nn.ModuleList`` whose entries all
share one class (the transformer layers of a GPT-style model). A caller may instead give a
predicate over ``(fully_qualified_name, module)`` or a list of module types. Communicates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch.nn as nn

from torchdist.errors import ShardingError

__all__ = ["BlockSpec", "find_blocks", "repeated_blocks"]

BlockSpec = Union[None, Callable[[str, nn.Module], bool], Sequence[type]]


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the entries of each ModuleList of more than one same-class entry."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            if len({type(child) for child in module}) == 1:
                prefix = f"{name}." if name else ""
                found.extend((f"{prefix}{i}", child) for i, child in enumerate(module))
    return found


def find_blocks(
    model: nn.Module, blocks: BlockSpec, *, transform: str, required: bool = False
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``blocks`` selects, outermost first, the root excluded.

    Raises ``ShardingError`` when an explicit spec selects nothing (a typo in a predicate should
    not silently leave a model unsharded), or when ``required`` and the default finds nothing.
    """
    if blocks is None:
        found = repeated_blocks(model)
        if required and not found:
            raise ShardingError(
                f"{transform}: found no repeated blocks (a ModuleList of same-class layers) in "
                f"{type(model).__name__}; pass blocks= a predicate over (name, module) or a list "
                "of block types."
            )
        return found
    if isinstance(blocks, type):
        blocks = [blocks]
    if callable(blocks) and not isinstance(blocks, (list, tuple)):
        found = [(n, m) for n, m in model.named_modules() if n and blocks(n, m)]
        what = "the blocks predicate"
    else:
        types = tuple(blocks) if isinstance(blocks, (list, tuple, set)) else (blocks,)
        if not all(isinstance(t, type) for t in types):
            raise ShardingError(
                f"{transform}: blocks must be None, a predicate (name, module) -> bool, or a list "
                f"of module types; got {blocks!r}."
            )
        found = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
        what = f"blocks={[t.__name__ for t in types]}"
    if not found:
        children = [n for n, _ in model.named_children()]
        raise ShardingError(
            f"{transform}: {what} matched no submodule of {type(model).__name__} (its children: "
            f"{children}). Fix the predicate or types, or pass blocks=None for the default."
        )
    return found
