"""`low_bit_adamw(params, bits=8 | 4, fp8=False)`: AdamW with quantized optimizer state (torchao).

AdamW keeps two fp32 moments per parameter, 8 bytes per element: twice the fp32 weights. torchao's
low-bit AdamW stores them block-wise quantized -- 8-bit dynamic-tree codes (``bits=8``), 4-bit
codes (``bits=4``) or float8 e4m3 (``fp8=True``), each block with an fp32 scale -- and computes
the update in fp32. This is the optimizer-state half of what MS-AMP's O2 level gives; pair it
with ``autocast_fp8`` for the fp8-matmul half.

Measured on CPU (``tests/test_precision_optim.py``): state bytes are 26.5% (8-bit), 25.8% (fp8)
and 13.8% (4-bit) of torch AdamW's fp32 state on an MLP whose tensors are all quantized, and
over 50 steps of a small GPT the loss stays within 0.1% (8-bit), 0.3% (fp8) and 2.3% (4-bit) of
torch AdamW's at every step. torchao only quantizes a
tensor of at least 4096 elements whose size is a multiple of ``block_size`` (256 for 8-bit and
fp8, 128 for 4-bit); smaller ones (biases, norms) keep fp32 moments. Under ``shard`` that test
applies to each rank's local shard.

Decisions:

* **compile.** torchao ``torch.compile``-s the per-parameter update once per parameter shape.
  That is what makes it fast on GPUs, and costs 20-50 s on a CPU before the first step (measured,
  torch 2.13, 2 cores). ``compile=None`` (the default) compiles when the parameters are on CUDA
  and runs the same update eagerly elsewhere; pass ``compile=True`` / ``False`` to choose.
* **shard.** Works with FSDP2 (``shard``) as is: torchao allocates each rank's quantized state for
  its local shard and wraps it in a DTensor like the parameter, so the state is sharded too and
  the step is local. Create the optimizer after ``shard``, from the sharded parameters.
* **learning rate.** torchao keeps ``lr`` as a tensor; torch's LR schedulers update it in place.
  Set it by hand with ``opt.param_groups[i]["lr"].fill_(value)``.

torchao is imported on the first call; without it, an ImportError names
``pip install 'torchdist[fp8]'``.

Communicates nothing (the step is local to each rank's shard).

Example::

    model = shard(build_model(), topo)
    opt = low_bit_adamw(model.parameters(), bits=8, lr=3e-4, weight_decay=0.1)
    step = compose(optimize(opt), clip_grads(1.0))(value_and_grad(loss_fn))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from torchdist.errors import CompositionError

__all__ = ["low_bit_adamw", "optimizer_state_bytes"]


def low_bit_adamw(
    params: Iterable[Any],
    bits: int = 8,
    fp8: bool = False,
    *,
    compile: bool | None = None,
    **adamw_kwargs: Any,
) -> torch.optim.Optimizer:
    """AdamW whose two moments are stored in ``bits`` (8 or 4) bits, or in float8 (``fp8=True``).

    ``params``: parameters or parameter groups, as for ``torch.optim.AdamW`` (sharded DTensor
    parameters included). ``adamw_kwargs``: ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``amsgrad``, and torchao's ``block_size`` and ``bf16_stochastic_round``. ``compile``: see the
    module docstring. Returns a ``torchao.optim.AdamW8bit`` / ``AdamW4bit`` / ``AdamWFp8``.

    Communicates nothing.

    Example::

        opt = low_bit_adamw(model.parameters(), bits=4, lr=1e-3)
    """
    if fp8:
        if bits != 8:
            raise CompositionError(
                f"low_bit_adamw: fp8=True stores the moments in float8 (8 bits); got bits={bits}. "
                "Use fp8=True alone, or bits=4 without fp8."
            )
        kind = "fp8"
    elif bits in (8, 4):
        kind = f"{bits}bit"
    else:
        raise CompositionError(
            f"low_bit_adamw: bits must be 8 or 4, got {bits!r}. For float8 moments pass "
            "fp8=True; for full-precision moments use torch.optim.AdamW."
        )
    if compile not in (None, True, False):
        raise CompositionError(
            f"low_bit_adamw: compile must be None, True or False, got {compile!r}."
        )
    params = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
    if not params:
        raise CompositionError("low_bit_adamw got an empty parameter list.")
    from torchdist.precision._float8 import _require_torchao

    _require_torchao(f"low_bit_adamw(bits={bits}, fp8={fp8})", "optim")
    from torchdist.precision._torchao import low_bit_adamw_class

    _check_some_tensor_quantized(params, kind, adamw_kwargs.get("block_size"))
    if compile is None:
        compile = any(p.device.type == "cuda" for p in _tensors(params))
    return low_bit_adamw_class(kind, compile)(params, **adamw_kwargs)


_MIN_QUANTIZED = 4096  # torchao (after bitsandbytes) keeps fp32 moments for smaller tensors


def _check_some_tensor_quantized(params: list, kind: str, block_size: Any) -> None:
    """Refuse a configuration under which torchao would quantize no tensor: it would silently
    keep fp32 moments for all of them, the memory this optimizer exists to save."""
    default = 128 if kind == "4bit" else 256
    if block_size is None:
        block_size = default
    elif not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise CompositionError(
            f"low_bit_adamw: block_size must be a positive int, got {block_size!r} "
            f"(default {default})."
        )
    sizes = [_local(p).numel() for p in _tensors(params)]
    big = [n for n in sizes if n >= _MIN_QUANTIZED]
    if any(n % block_size == 0 for n in big):
        return
    if not big:
        raise CompositionError(
            f"low_bit_adamw: no parameter has {_MIN_QUANTIZED} or more elements (largest: "
            f"{max(sizes, default=0)}, on this rank), so torchao would keep fp32 moments for "
            "all of them and save nothing. Use torch.optim.AdamW for a model this small."
        )
    raise CompositionError(
        f"low_bit_adamw: block_size={block_size} divides the size of no parameter large enough "
        f"to quantize (sizes: {sorted(set(big))[:5]}), so every moment would stay fp32. Use a "
        f"block size that divides them, e.g. the default {default}."
    )


def _local(p: torch.Tensor) -> torch.Tensor:
    to_local = getattr(p, "to_local", None)  # a DTensor: torchao quantizes the local shard
    return to_local() if callable(to_local) else p


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds: every tensor in ``optimizer.state``.

    Quantized state (torchao's tensor subclasses) counts its codes, scales and lookup tables;
    a DTensor counts its local shard.
    """
    return sum(
        _nbytes(value)
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def _nbytes(tensor: torch.Tensor) -> int:
    flatten = getattr(tensor, "__tensor_flatten__", None)  # DTensor and torchao's subclasses
    if flatten is not None:
        inner = (getattr(tensor, name) for name in flatten()[0])
        return sum(_nbytes(t) for t in inner if isinstance(t, torch.Tensor))
    return tensor.numel() * tensor.element_size()


def _tensors(params: list) -> Iterable[torch.Tensor]:
    for item in params:
        if isinstance(item, dict):
            yield from item["params"]
        else:
            yield item
