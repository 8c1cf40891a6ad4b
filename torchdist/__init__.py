"""torchdist: take a plain PyTorch training loop to many devices by composing small functions.

Every function receives the ``Topology`` it works on; there is no global state. Submodules
(``torchdist.data``, ``torchdist.transforms``, ``torchdist.sharding``, ``torchdist.precision``,
``torchdist.checkpoint``) load on first use, so ``import torchdist`` costs little over
``import torch``.
"""

from __future__ import annotations

import importlib
from typing import Any

from torchdist._progress import progress
from torchdist.collectives import (
    all_reduce,
    broadcast,
    gather,
    gather_object,
    pad_across_ranks,
)
from torchdist.control import (
    all_ranks,
    any_rank,
    barrier,
    find_executable_batch_size,
    is_main,
    join,
    main_first,
    print0,
    set_seed,
    split_between_ranks,
    stop_at_shortest,
    sync_rng,
)
from torchdist.errors import (
    CheckpointError,
    CollectiveError,
    CompositionError,
    ConfigError,
    DistributedTimeoutError,
    RankError,
    ShardingError,
    StepError,
    TopologyError,
    TorchdistError,
)
from torchdist.metrics import MetricsLogger, gather_for_metrics
from torchdist.placement import to_device
from torchdist.runtime import distributed, in_process, spawn
from torchdist.state import LossScale, TrainState
from torchdist.topology import Topology

__version__ = "0.1.0"

__all__ = [
    "Topology",
    "TrainState",
    "LossScale",
    "distributed",
    "spawn",
    "in_process",
    "all_reduce",
    "gather",
    "gather_object",
    "broadcast",
    "pad_across_ranks",
    "gather_for_metrics",
    "to_device",
    "distribution_of",
    "Distribution",
    "shard_loader",
    "progress",
    "MetricsLogger",
    "plot_metrics",
    "is_main",
    "main_first",
    "barrier",
    "print0",
    "split_between_ranks",
    "any_rank",
    "all_ranks",
    "find_executable_batch_size",
    "stop_at_shortest",
    "join",
    "set_seed",
    "sync_rng",
    "TorchdistError",
    "ConfigError",
    "TopologyError",
    "CompositionError",
    "CollectiveError",
    "CheckpointError",
    "RankError",
    "ShardingError",
    "StepError",
    "DistributedTimeoutError",
]

_LAZY_SUBMODULES = (
    "data",
    "transforms",
    "sharding",
    "precision",
    "checkpoint",
    "cli",
    "marks",
    "memory",
    "blocks",
    "inference",
)


# Public names whose modules import heavier parts of torch (DCP, dataloaders) on first use.
_LAZY_NAMES = {
    "shard_loader": "torchdist.data",
    "plot_metrics": "torchdist._plot",
    "distribution_of": "torchdist._distribution",
    "Distribution": "torchdist._distribution",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"torchdist.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'torchdist' has no attribute {name!r}")
