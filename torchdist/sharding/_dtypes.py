"""Parameter dtypes under ``shard``: fp32 master weights, or an error that names the parameters.

FSDP2 flattens each unit's trainable parameters into one all-gather and one reduce-scatter, so
it requires one original dtype per unit, and says so only at the first forward, with an
``AssertionError("FSDP expects uniform original parameter dtype ...")``. A Hugging Face model
loaded with ``torch_dtype=torch.bfloat16`` keeps some parameters in fp32 (``_keep_in_fp32_modules``:
norms, routers), so its layers mix dtypes. ``shard`` therefore, before calling ``fully_shard``:

* with ``mixed_precision`` given: upcasts every *trainable* parameter stored in fewer than 32 bits
  (bf16, fp16) to fp32 in place (``param.data = ...``, so tied parameters stay one object). The
  sharded fp32 copies are the master weights the optimizer updates, and FSDP2 all-gathers them in
  ``param_dtype`` for compute, as Accelerate does for FSDP with mixed precision (it warns once
  about the upcast too). Frozen parameters keep their dtype: FSDP2 does not check them, and
  upcasting them would only cost memory. One ``UserWarning`` per ``shard`` call says what was
  upcast.
* always: checks that the trainable parameters of each FSDP unit share one dtype; otherwise the
  model's first forward raises a ``ShardingError`` (a forward pre-hook that runs before FSDP2's
  lazy init) that names the unit and its parameters by dtype, with the fixes (mixed precision,
  one dtype for the model, or freezing). Not ``shard`` itself: a sharded model that never runs
  a forward (exported, loaded, inspected) works with mixed dtypes.

Without ``mixed_precision`` no dtype is changed. Tied parameters (one ``Parameter`` under
several names: GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) must fall into one
unit; ``check_tied_in_one_unit`` refuses, at ``shard`` time, blocks that would split them (FSDP2
would refuse at the first forward). Communicates nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from torchdist.errors import ShardingError

__all__ = [
    "upcast_trainable_to_fp32",
    "check_uniform_dtypes",
    "check_tied_in_one_unit",
    "refuse_forward",
]

_LISTED = 6


def upcast_trainable_to_fp32(model: nn.Module) -> list[str]:
    """Upcast trainable floating parameters narrower than fp32 to fp32, in place; return their
    names (first name of a tied parameter). Warns once per call when something was upcast."""
    upcast: list[str] = []
    seen: set[int] = set()
    dtypes: set[torch.dtype] = set()
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param.requires_grad and param.is_floating_point() and param.element_size() < 4:
                dtypes.add(param.dtype)
                param.data = param.data.to(torch.float32)
                upcast.append(name)
    if upcast:
        listed = ", ".join(upcast[:_LISTED]) + (
            f", and {len(upcast) - _LISTED} more" if len(upcast) > _LISTED else ""
        )
        warnings.warn(
            f"shard: upcast {len(upcast)} trainable {'/'.join(sorted(map(str, dtypes)))} "
            f"parameters of {type(model).__name__} to fp32 master weights ({listed}), because "
            "mixed_precision is set: FSDP2 computes in its param_dtype and the optimizer updates "
            "the fp32 shards (as Accelerate does). Checkpoints and exports then hold fp32; cast "
            "after loading if you need the original dtype.",
            UserWarning,
            stacklevel=3,
        )
    return upcast


def _unit_params(
    model: nn.Module, units: Sequence[tuple[str, nn.Module]]
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{unit name: [(param name, param)]}``: each parameter in the innermost unit holding it,
    the root ``""`` holding the rest; a shared parameter counts once, in its first unit."""
    unit_names = sorted((name for name, _ in units), key=len, reverse=True)
    owned: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name, _ in units}
    owned[""] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        owned[_unit_of(name, unit_names)].append((name, param))
    return owned


def _unit_of(name: str, unit_names: Sequence[str]) -> str:
    return next((u for u in unit_names if name.startswith(f"{u}.")), "")


def check_tied_in_one_unit(model: nn.Module, units: Sequence[tuple[str, nn.Module]]) -> None:
    """Raise ``ShardingError`` when the names of one tied parameter fall into different units."""
    unit_names = sorted((name for name, _ in units), key=len, reverse=True)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for tied in names.values():
        homes = {n: _unit_of(n, unit_names) or "<root>" for n in tied}
        if len(set(homes.values())) > 1:
            raise ShardingError(
                f"shard: the tied parameters {tied} would fall into different FSDP units "
                f"({homes}); FSDP2 keeps one parameter in one unit. Choose blocks= so that "
                "both owners are in one unit (the default leaves embeddings and the LM head in "
                "the root), or untie them."
            )


def check_uniform_dtypes(
    model: nn.Module, units: Sequence[tuple[str, nn.Module]], *, mixed_precision: bool
) -> str | None:
    """The ``ShardingError`` message when some FSDP unit's trainable parameters mix dtypes,
    else None."""
    problems = []
    for unit, params in _unit_params(model, units).items():
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, param in params:
            if param.requires_grad:
                by_dtype.setdefault(param.dtype, []).append(name)
        if len(by_dtype) > 1:
            groups = "; ".join(
                f"{dtype}: {', '.join(names[:_LISTED])}"
                + (f" (+{len(names) - _LISTED} more)" if len(names) > _LISTED else "")
                for dtype, names in sorted(by_dtype.items(), key=lambda kv: str(kv[0]))
            )
            problems.append(f"unit {unit or '<root>'!r} has {groups}")
    if not problems:
        return None
    fix = (
        "freeze the odd ones (requires_grad=False) or cast the model to one dtype first"
        if mixed_precision
        else "pass mixed_precision=MixedPrecision(param_dtype=torch.bfloat16) (trainable "
        "bf16/fp16 parameters then become fp32 master weights, computed in bf16), or cast the "
        "model to one dtype first (model.float() or model.to(torch.bfloat16))"
    )
    return (
        f"shard: FSDP2 needs the trainable parameters of each unit to share one dtype to run a "
        f"forward (they are all-gathered and reduce-scattered as one flat buffer), but "
        f"{'; '.join(problems)}. Fix: {fix}."
    )


def refuse_forward(model: nn.Module, message: str) -> None:
    """Make ``model``'s forward raise ``ShardingError(message)`` before FSDP2's lazy init would
    assert. A hook, not an error in ``shard``: a sharded model that never runs a forward (an
    export, a load, a state dict) is fine with mixed dtypes."""

    def refuse(module: nn.Module, args: object) -> None:
        raise ShardingError(message)

    model.register_forward_pre_hook(refuse, prepend=True)
