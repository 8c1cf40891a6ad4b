"""Model transforms that distribute a model: ``model -> model`` over an explicit mesh.

The order that works, first to last: ``autocast_fp8`` -> ``pipeline`` -> ``parallelize`` ->
``checkpoint_activations`` -> ``compile`` -> ``shard`` | ``replicate`` (enforced; see
docs/model_transforms.md). ``deepspeed`` (a ZeRO engine, returned
in a ``TrainState``) replaces ``shard``/``replicate``; it imports DeepSpeed only when called.
"""

from torchdist.sharding._ddp import replicate
from torchdist.sharding._deepspeed import consolidated, deepspeed
from torchdist.sharding._fsdp import MixedPrecision, is_sharded, materialize, shard
from torchdist.sharding._pipeline import PipelinePlan, pipeline
from torchdist.sharding._tensor_parallel import parallelize

__all__ = [
    "shard",
    "replicate",
    "parallelize",
    "pipeline",
    "PipelinePlan",
    "deepspeed",
    "consolidated",
    "materialize",
    "MixedPrecision",
    "is_sharded",
]
