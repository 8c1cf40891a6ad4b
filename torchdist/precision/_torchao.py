"""The one place torchdist touches torchao internals. Each use says why and what would replace it.

Imported only once a precision transform runs (it imports torchao at the top), so neither
``import torchdist`` nor ``import torchdist.precision`` pays for torchao (~4 s on a 2-core CPU).
Written against torchao 0.18; the tests in ``tests/test_precision*.py`` exercise every path here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torchao.float8.float8_linear import Float8Linear
from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8
from torchao.optim.adam import single_param_adam

__all__ = ["ByteGatheredFloat8Weight", "gather_float8_weights_as_bytes", "low_bit_adamw_class"]


# --------------------------------------------------------------------------- fp8 all-gather
class ByteGatheredFloat8Weight(WeightWithDynamicFloat8CastTensor):
    """torchao's fp8-all-gather weight, handing FSDP2 its float8 bytes as ``uint8``.

    FSDP2 asks a weight for its all-gather input (``fsdp_pre_all_gather``); torchao answers with
    the float8 data, so a unit whose weights are all float8 is all-gathered in a float8 dtype,
    which gloo rejects ("Invalid scalar type"). Here the same bytes go out as a ``uint8`` view
    and come back viewed as float8 -- no copy, the same number of bytes. FSDP2 itself gathers as
    ``uint8`` whenever a unit mixes dtypes (a float8 weight beside an fp32 bias), so NCCL sees
    nothing new. Replace with torchao's class if it ever gathers as bytes itself.
    """

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        # torchao re-wraps results in its own class (FSDP2 slices, pads and copies the weight
        # when it shards it); keep ours so the sharded local tensor still gathers as bytes.
        out = super().__torch_dispatch__(func, types, args, kwargs)
        return pytree.tree_map_only(WeightWithDynamicFloat8CastTensor, cls._adopt, out)

    @classmethod
    def _adopt(cls, t: WeightWithDynamicFloat8CastTensor):
        if type(t) is cls:
            return t
        return cls(t._tensor, t._linear_mm_config, t._dtype, t._precomputed_scale)

    def fsdp_pre_all_gather(self, mesh):
        (data,), metadata = super().fsdp_pre_all_gather(mesh)
        return (data.view(torch.uint8),), metadata

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (data,) = all_gather_outputs
        if data.dtype == torch.uint8:
            data = data.view(self._dtype)
        return super().fsdp_post_all_gather((data,), metadata, param_dtype, out=out)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, flatten_spec, outer_size, outer_stride):
        return ByteGatheredFloat8Weight(
            inner_tensors["_tensor"],
            flatten_spec["mm_config"],
            flatten_spec["dtype"],
            inner_tensors.get("_precomputed_scale"),
        )

    def __repr__(self) -> str:
        return f"ByteGatheredFloat8Weight(dtype={self._dtype}, tensor={self._tensor})"


# torch.load(weights_only=True) of a state dict holding these weights, as torchao does for its own.
torch.serialization.add_safe_globals([ByteGatheredFloat8Weight])


def gather_float8_weights_as_bytes(model: nn.Module) -> None:
    """Swap every torchao fp8-all-gather weight of ``model`` for ``ByteGatheredFloat8Weight``."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, Float8Linear) and type(weight) is WeightWithDynamicFloat8CastTensor:
            module.weight = nn.Parameter(
                ByteGatheredFloat8Weight._adopt(weight), requires_grad=weight.requires_grad
            )


# --------------------------------------------------------------------------- low-bit AdamW
class _EagerStep:
    """torchao's low-bit Adam step without its per-parameter ``torch.compile``.

    torchao compiles ``single_param_adam`` for every parameter shape; on a CPU that costs 20-50 s
    before the first step (measured: AdamW8bit 50 s, AdamW4bit 37 s, AdamWFp8 22 s for a 3-layer
    MLP), while eager runs the same arithmetic on the same quantized state subclasses. The loop
    below is torchao 0.18's ``_AdamBase.step`` with the call left uncompiled.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Sparse gradient is not supported")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = self._new_buffer(p, True)
                    state["exp_avg_sq"] = self._new_buffer(p, False)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = self._new_buffer(p, False)
                state["step"] += 1
                if not isinstance(group["lr"], torch.Tensor):
                    raise RuntimeError(
                        "lr was changed to a non-Tensor object; update it in place with "
                        "optimizer.param_groups[i]['lr'].fill_(new_lr)."
                    )
                single_param_adam(
                    p.detach(),
                    p.grad,
                    state["step"],
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state.get("max_exp_avg_sq", None),
                    group["lr"],
                    group["betas"][0],
                    group["betas"][1],
                    group["weight_decay"],
                    group["eps"],
                    self.is_adamw,
                    self.bf16_stochastic_round and p.dtype is torch.bfloat16,
                )
        return loss


class EagerAdamW8bit(_EagerStep, AdamW8bit):
    """``torchao.optim.AdamW8bit`` with an uncompiled step (see ``_EagerStep``)."""


class EagerAdamW4bit(_EagerStep, AdamW4bit):
    """``torchao.optim.AdamW4bit`` with an uncompiled step (see ``_EagerStep``)."""


class EagerAdamWFp8(_EagerStep, AdamWFp8):
    """``torchao.optim.AdamWFp8`` with an uncompiled step (see ``_EagerStep``)."""


def low_bit_adamw_class(kind: str, compiled: bool) -> type:
    """torchao's AdamW class for ``kind`` ("8bit", "4bit", "fp8"), or its eager variant."""
    if compiled:
        return {"8bit": AdamW8bit, "4bit": AdamW4bit, "fp8": AdamWFp8}[kind]
    return {"8bit": EagerAdamW8bit, "4bit": EagerAdamW4bit, "fp8": EagerAdamWFp8}[kind]
