"""NVIDIA Transformer Engine behind ``autocast_fp8(model, Float8Recipe.transformer_engine())``.

The selected ``nn.Linear`` layers become ``transformer_engine.pytorch.Linear`` layers holding the
same weights (names unchanged), and the model's forward runs under TE's ``fp8_autocast`` with a
``DelayedScaling`` recipe, entered by a forward pre-hook and left by a forward hook that runs
even when the forward raises. TE needs CUDA and dimensions that are multiples of 16; it is not
installed in CI, where only the ImportError path below is exercised. What Accelerate and
Lightning do with TE, as a model transform.

Communicates nothing itself (TE reduces amaxes across its ``fp8_group``, by default none).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["convert_to_transformer_engine"]

_INSTALL = (
    "Float8Recipe.transformer_engine() needs NVIDIA Transformer Engine (CUDA only), which could "
    "not be imported ({exc}). Install it on a CUDA machine with: pip install --no-build-isolation "
    "'transformer_engine[pytorch]' (see https://github.com/NVIDIA/TransformerEngine). Without "
    "it, Float8Recipe.tensorwise() / .rowwise() (torchao) give fp8 training on any device."
)


def _import_te():
    try:
        import transformer_engine.common.recipe as te_recipe
        import transformer_engine.pytorch as te
    except ImportError as exc:
        raise ImportError(_INSTALL.format(exc=exc)) from exc
    return te, te_recipe


def convert_to_transformer_engine(
    model: nn.Module, layers: tuple[str, ...], options: dict[str, Any]
) -> nn.Module:
    """Swap the Linear layers named in ``layers`` for TE Linears; run the forward in fp8."""
    te, te_recipe = _import_te()
    recipe = te_recipe.DelayedScaling(
        fp8_format=getattr(te_recipe.Format, options.get("fp8_format", "HYBRID")),
        amax_history_len=options.get("amax_history_len", 16),
        amax_compute_algo=options.get("amax_compute_algo", "max"),
        margin=options.get("margin", 0),
    )
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = te.Linear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            params_dtype=old.weight.dtype,
            device=old.weight.device,
        )
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, child, new)
    _run_forward_in_fp8(model, te, recipe)
    return model


def _run_forward_in_fp8(model: nn.Module, te, recipe) -> None:
    if hasattr(te, "fp8_autocast"):
        make = lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)
    else:  # TE >= 2.8 renamed it
        make = lambda: te.autocast(enabled=True, recipe=recipe)
    contexts: list = []  # a stack: a model may call itself re-entrantly

    def enter(module, args):
        ctx = make()
        ctx.__enter__()
        contexts.append(ctx)

    def leave(module, args, output):
        contexts.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
