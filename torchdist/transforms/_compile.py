"""`compile(model, **kwargs)`: regional torch.compile, a model transform in torchtitan's slot.

Each repeated block's ``forward`` is compiled (same-class blocks share one compiled code, so
compile time does not grow with depth and graph breaks stay local), then the rest of the model:
every largest submodule that holds no block (embeddings, final norm, head), as Accelerate's
regional compilation does. The root's own forward (the glue between them) stays eager, so each
block runs its compiled code rather than being inlined into one whole-model graph. ``forward`` and
not ``nn.Module.compile``: dynamo skips a torch.nn built-in's ``_call_impl`` (``nn.Linear.compile``
compiles nothing in torch 2.13), and module hooks (FSDP2's all-gathers) stay outside the graphs.
Apply after ``checkpoint_activations`` and before ``shard`` / ``replicate``; see
docs/model_transforms.md. Communicates nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from torchdist._model_record import MODEL_ORDER
from torchdist.blocks import BlockSpec, find_blocks
from torchdist.errors import CompositionError
from torchdist.marks import mark, record_of
from torchdist.sharding._common import check_has_parameters, check_order

__all__ = ["compile", "compiled_regions"]


def compile(
    model: nn.Module, *, blocks: BlockSpec = None, rest: bool = True, **torch_compile_kwargs: Any
) -> nn.Module:
    """torch.compile ``model`` region by region, in place: each block, then the rest of it.

    ``blocks``: which submodules are the repeated regions (default: the repeated blocks,
    ``torchdist.blocks.repeated_blocks``); the whole model is compiled when there are none.
    ``rest=False`` leaves everything outside the blocks eager. ``torch_compile_kwargs`` go to
    ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``, ``backend``, ...). AOTAutograd
    compiles the backward with each region; losses equal eager ones up to floating-point
    reassociation. Which regions were compiled: ``compiled_regions(model)``.

    Communicates nothing (under ``shard`` FSDP2's hooks run at each block's boundary).

    Example::

        model = checkpoint_activations(model)
        model = compile(model, dynamic=False)          # blocks, then embeddings, norm, head
        model = shard(model, topo)
    """
    check_has_parameters(model, "compile")
    check_order(model, "compile")
    from torchdist._distribution import distributed_by_hand

    by_hand = distributed_by_hand(model)
    if by_hand is not None and by_hand != "DTensor parameters (tensor parallel)":
        raise CompositionError(
            f"compile after {by_hand}: compile each block before the model is wrapped for data "
            f"parallelism, so its hooks stay outside the graphs. The order that works, first to "
            f"last: {MODEL_ORDER}."
        )
    found = find_blocks(model, blocks, transform="compile")
    if not found:
        regions: tuple[str, ...] = ("",)
        others: tuple[str, ...] = ()
    else:
        regions = tuple(name for name, _ in found)
        others = tuple(_outside(model, {id(b) for _, b in found})) if rest else ()
    for name in regions + others:
        module = model.get_submodule(name)
        object.__setattr__(module, "forward", _CompiledForward(module, torch_compile_kwargs))
    options = {"blocks": regions, "rest": others,
               "torch_compile_kwargs": dict(torch_compile_kwargs)}  # fmt: skip
    return mark(model, "compile", options=options)


def compiled_regions(model: nn.Module) -> tuple[str, ...]:
    """Names of the submodules ``compile`` compiled, blocks first (``""``: the whole model)."""
    found = record_of(model).find("compile")
    return () if found is None else tuple(found.options["blocks"]) + tuple(found.options["rest"])


def _outside(model: nn.Module, blocks: set[int]) -> list[str]:
    """The largest submodules that contain no block and own parameters or buffers, in order."""

    def holds_block(module: nn.Module) -> bool:
        return any(id(m) in blocks for m in module.modules())

    out: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if id(child) in blocks:
                continue
            if holds_block(child):
                visit(f"{full}.", child)
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                out.append(full)

    visit("", model)
    return out


class _CompiledForward:
    """A module's ``forward``, compiled on first call. A callable object, not a closure, so that
    ``copy.deepcopy(model)`` gives the copy a forward bound to the copy (compiled afresh)."""

    def __init__(self, module: nn.Module, kwargs: dict[str, Any]) -> None:
        self.module, self.kwargs, self._compiled = module, dict(kwargs), None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            eager = type(self.module).forward.__get__(self.module)
            self._compiled = torch.compile(eager, **self.kwargs)
        return self._compiled(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> _CompiledForward:
        import copy

        return _CompiledForward(copy.deepcopy(self.module, memo), copy.deepcopy(self.kwargs, memo))

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self.module, "kwargs": self.kwargs, "_compiled": None}

    def __repr__(self) -> str:
        return f"<torchdist.compile: {type(self.module).__name__}.forward, {self.kwargs}>"
