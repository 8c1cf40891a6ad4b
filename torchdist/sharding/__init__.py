"""Model transforms that distribute a model: ``model -> model`` over an explicit mesh.

The order that works, first to last: ``autocast_fp8`` -> ``parallelize`` ->
``checkpoint_activations`` -> ``shard`` | ``replicate``.
"""

from torchdist.sharding.ddp import replicate
from torchdist.sharding.fsdp import MixedPrecision, is_sharded, materialize, shard
from torchdist.sharding.tensor_parallel import parallelize

__all__ = ["shard", "replicate", "parallelize", "materialize", "MixedPrecision", "is_sharded"]
