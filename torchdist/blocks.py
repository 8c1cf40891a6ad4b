"""Which submodules a model transform acts on: "blocks", chosen by default or by the caller.

The default (``default_blocks``):

* a Hugging Face ``transformers`` model (recognised by its ``config`` and ``_no_split_modules``,
  without importing transformers): its decoder/encoder layers, i.e. the ``nn.ModuleList`` entries
  whose class is named in ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``,
  ``BertLayer``; not ``BertEmbeddings``, which is no list entry), outermost only. This is what
  Accelerate's FSDP auto-wrap policy reads; unlike the repeated-blocks rule it finds the one layer
  of a 1-layer model and never an MoE's expert list inside a layer. A transformers model in which
  neither rule finds a layer is a ``ShardingError`` (pass ``blocks=``), never a silent no-op;
* otherwise the repeated blocks: the entries of every ``nn.ModuleList`` whose entries all share
  one class (the transformer layers of a GPT-style model).

A caller may instead give a predicate over ``(fully_qualified_name, module)`` or a list of module
types. Communicates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch.nn as nn

from torchdist.errors import ShardingError

__all__ = ["BlockSpec", "find_blocks", "repeated_blocks", "default_blocks", "hf_layer_classes"]

BlockSpec = Union[None, Callable[[str, nn.Module], bool], Sequence[type]]


class PipelineBlocks(nn.ModuleList):
    """The blocks of one pipeline stage, under their original indices (``blocks.2`` stays
    ``blocks.2``, so parameter names and checkpoints match the whole model's).

    Iterates over the blocks it holds, in order; ``len`` and positional indexing count only
    those. ``torchdist.sharding.pipeline`` puts one in place of the model's ``ModuleList``;
    ``repeated_blocks`` treats it as blocks even when it holds a single one.
    """

    def __init__(self, blocks: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        for key, block in (blocks or {}).items():
            self.add_module(key, block)

    def __getitem__(self, idx):  # positional, over the blocks this stage holds
        values = list(self._modules.values())
        return nn.ModuleList(values[idx]) if isinstance(idx, slice) else values[idx]


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the entries of each ModuleList of more than one same-class entry
    (or of a ``PipelineBlocks``, a pipeline stage's share of them, whatever its length)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (
            len(module) > 1 or (isinstance(module, PipelineBlocks) and len(module))
        ):
            if len({type(child) for child in module}) == 1:
                prefix = f"{name}." if name else ""
                found.extend((f"{prefix}{key}", child) for key, child in module._modules.items())
    return found


def hf_layer_classes(model: nn.Module) -> frozenset[str] | None:
    """Class names in the ``_no_split_modules`` of a transformers model and its sub-models, or
    None when ``model`` is not a transformers model (duck-typed: nothing is imported)."""
    if not (hasattr(model, "config") and hasattr(type(model), "_no_split_modules")):
        return None
    names: set[str] = set()
    for module in model.modules():
        if hasattr(module, "config"):
            names.update(getattr(module, "_no_split_modules", None) or ())
    return frozenset(names)


def default_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks a transform uses when given ``blocks=None`` (see the module docstring)."""
    classes = hf_layer_classes(model)
    if classes:
        found: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList):
                continue
            if any(name.startswith(f"{outer}.") for outer, _ in found):
                continue  # inside a layer already found (an MoE's experts)
            prefix = f"{name}." if name else ""
            found.extend(  # keys, not positions: a PipelineBlocks keeps the original indices
                (f"{prefix}{key}", child)
                for key, child in module._modules.items()
                if type(child).__name__ in classes
            )
        if found:
            return found
    return repeated_blocks(model)


def find_blocks(
    model: nn.Module, blocks: BlockSpec, *, transform: str, required: bool = False
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``blocks`` selects, outermost first, the root excluded.

    Raises ``ShardingError`` when an explicit spec selects nothing (a typo in a predicate should
    not silently leave a model unsharded), or when ``required`` and the default finds nothing.
    """
    if blocks is None:
        found = default_blocks(model)
        classes = hf_layer_classes(model)
        if not found and (required or classes is not None):
            hf = (
                f" It is a transformers model whose _no_split_modules ({sorted(classes or ())}) "
                "names no entry of an nn.ModuleList, so its layers were not found."
                if classes is not None
                else ""
            )
            raise ShardingError(
                f"{transform}: found no repeated blocks (a ModuleList of same-class layers) in "
                f"{type(model).__name__}.{hf} Pass blocks= a predicate over (name, module) or a "
                "list of block types, e.g. blocks=[type(model.model.layers[0])]."
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
