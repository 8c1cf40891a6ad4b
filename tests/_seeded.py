"""`seeded(seed, build)`: a model built from ``seed`` without touching the global RNG (not
collected as tests). Build test models once, at import, in the main thread: in-process ranks are
threads that share torch's RNG."""

from __future__ import annotations

import torch


def seeded(seed: int, build):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()
