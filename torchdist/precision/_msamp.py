"""`msamp_initialize(model, optimizer, opt_level)`: Microsoft MS-AMP's fp8 training, as one call.

``msamp.initialize`` replaces the model's ``nn.Linear`` layers with MS-AMP's fp8 ones and the
Adam/AdamW optimizer with its low-bit one. Levels (MS-AMP's table): **O1** -- fp8 matmuls, fp8
weight gradients and gradient communication, fp16 weights, fp32 optimizer state; **O2** -- O1
plus optimizer moments in fp8 (first) and fp16 (second). (O3, fp8 in the ZeRO optimizer, is
configured through MS-AMP's DeepSpeed integration, not here.)

MS-AMP is not on the package index and needs CUDA. Without it ``msamp_initialize`` raises an
ImportError saying how to install it and which torchdist paths give the same savings:
``autocast_fp8`` for O1's fp8 matmuls (and, with ``shard``, fp8 weight all-gather), plus
``low_bit_adamw`` for O2's low-bit optimizer state.

Arguments are checked before MS-AMP is imported, so a wrong call fails the same way everywhere:
an unknown ``opt_level``, an optimizer MS-AMP cannot convert (only ``torch.optim.Adam``/``AdamW``
and DeepSpeed's ``FusedAdam``), an optimizer over other parameters, or a model that is already
distributed or float8 raise ``CompositionError``. MS-AMP must see the plain model: its
distributed support is its own (DeepSpeed, Megatron, its FSDP1 wrapper), not torchdist's
``shard`` (FSDP2) -- for FSDP2 use ``autocast_fp8`` + ``low_bit_adamw``.

Communicates nothing itself.

Example::

    model, opt = msamp_initialize(model, torch.optim.AdamW(model.parameters()), opt_level="O2")
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from torchdist._model_record import check_order
from torchdist.errors import CompositionError
from torchdist.marks import mark

__all__ = ["msamp_initialize"]

OPT_LEVELS = ("O1", "O2")

_INSTALL = """\
msamp_initialize needs MS-AMP (Microsoft's fp8 mixed precision), which could not be imported \
({exc}). MS-AMP is not on PyPI and needs an NVIDIA GPU with CUDA >= 11. Install it from source \
(https://azure.github.io/MS-AMP/docs/getting-started/installation):
    git clone https://github.com/Azure/MS-AMP.git && cd MS-AMP
    git submodule update --init --recursive
    # multi-GPU only: build MSCCL in third_party/msccl as the guide says (~7 min on H100)
    python3 -m pip install . && make postinstall
or use its container ghcr.io/azure/msamp. The same savings without MS-AMP, on any device:
    O1, fp8 matmuls:        model = autocast_fp8(model, Float8Recipe.tensorwise())
    O2, + low-bit state:    opt = low_bit_adamw(model.parameters(), bits=8)  # or fp8=True
(both from torchdist.precision), with torchdist.sharding.shard for fp8 weight all-gather."""

def msamp_initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    opt_level: str = "O1",
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Cast ``model`` and ``optimizer`` to MS-AMP's fp8 training at ``opt_level`` ("O1" | "O2").

    Returns ``(model, optimizer)`` as ``msamp.initialize`` does -- use both returned objects
    (the optimizer is a new MS-AMP ``LBAdamW``/``LBAdam``). ``optimizer=None`` lets MS-AMP build
    an AdamW with default settings. Call it on the plain model, before any distribution.

    Communicates nothing.
    """
    if opt_level not in OPT_LEVELS:
        hint = (
            " O3 (fp8 in ZeRO) is set in MS-AMP's DeepSpeed config, not here."
            if opt_level == "O3"
            else ""
        )
        raise CompositionError(
            f"msamp_initialize: opt_level must be one of {list(OPT_LEVELS)}, got {opt_level!r}."
            f"{hint} O1: fp8 matmuls and weight gradients; O2: O1 plus low-bit optimizer state."
        )
    if not isinstance(model, nn.Module):
        raise CompositionError(f"msamp_initialize takes an nn.Module, got {type(model).__name__}.")
    _check_model(model)
    if optimizer is not None:
        _check_optimizer(model, optimizer, opt_level)
    try:
        import msamp
    except ImportError as exc:
        raise ImportError(_INSTALL.format(exc=exc)) from exc
    model, optimizer = msamp.initialize(model, optimizer, opt_level=opt_level)
    return mark(model, "msamp", options={"opt_level": opt_level}), optimizer


def _check_model(model: nn.Module) -> None:
    check_order(model, "msamp")
    from torchdist._distribution import distributed_by_hand

    found = distributed_by_hand(model)
    if found is not None:
        raise CompositionError(
            f"msamp_initialize after {found}: MS-AMP must see the plain nn.Linear layers. Call "
            "it before distributing, or use autocast_fp8 + low_bit_adamw, which compose with "
            "shard."
        )


def _check_optimizer(model: nn.Module, optimizer: Any, opt_level: str) -> None:
    kind = type(optimizer)
    supported = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) or (
        kind.__name__ == "FusedAdam" and kind.__module__.startswith("deepspeed")
    )
    if not supported:
        raise CompositionError(
            f"msamp_initialize: MS-AMP converts torch.optim.Adam, torch.optim.AdamW or "
            f"DeepSpeed's FusedAdam, got {kind.__module__}.{kind.__qualname__}. Build one of those "
            f"over model.parameters() (opt_level={opt_level!r} replaces it with MS-AMP's own)."
        )
    owned = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in owned)
    if foreign:
        raise CompositionError(
            f"msamp_initialize: the optimizer holds {foreign} parameter(s) that are not the "
            "model's; MS-AMP maps the optimizer onto the model's converted parameters. Build "
            "the optimizer over model.parameters() of this model."
        )
