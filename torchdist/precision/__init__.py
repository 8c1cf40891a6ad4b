"""Precision below bf16: fp8 matmuls, low-bit optimizer state, MS-AMP.

* ``autocast_fp8(model, recipe)`` -- a model transform: the Linear layers ``Float8Recipe``
  selects train with float8 matmuls (torchao); under ``shard``, tensorwise weights are
  all-gathered in float8 and ``optimize`` precomputes their scales. Apply it first:
  ``autocast_fp8 -> parallelize -> checkpoint_activations -> shard | replicate``.
* ``low_bit_adamw(params, bits=8 | 4, fp8=False)`` -- AdamW with quantized moments (torchao).
* ``msamp_initialize(model, optimizer, opt_level)`` -- Microsoft MS-AMP, where it is installed.

torchao (``pip install 'torchdist[fp8]'``) is imported when a model or optimizer is converted,
not by importing this package.
"""

from torchdist.precision._float8 import Float8Recipe, autocast_fp8, converted_layers, fp8_compatible
from torchdist.precision._msamp import msamp_initialize
from torchdist.precision._optimizers import low_bit_adamw, optimizer_state_bytes

__all__ = [
    "Float8Recipe",
    "autocast_fp8",
    "converted_layers",
    "fp8_compatible",
    "low_bit_adamw",
    "optimizer_state_bytes",
    "msamp_initialize",
]
