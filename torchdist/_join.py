"""`join(model)`: uneven inputs on a `replicate`d (DDP) model, with torch's ``Join``.

Ranks that run out of batches early leave the loop and wait at the end of the ``with`` block;
until every rank has, they *shadow* the others' gradient all-reduces (DDP's join hook: zeros),
so the ranks that still have data keep training and nobody waits in a collective that a
finished rank never issues. Gradients are divided by the initial world size by default (a
finished rank counts as a zero gradient, as in torch), so every rank applies the same update
and the weights stay identical. Nothing is dropped, unlike ``stop_at_shortest``.

Only for models whose gradients DDP syncs (``torchdist.sharding.replicate``): the loop body may
issue no other collective (a metric ``all_reduce``, a ``barrier``), since a finished rank
cannot shadow those. For ``sync_grads`` or a loop with other collectives use
``stop_at_shortest``, which stops every rank at the shortest input instead (docs/faults.md).

Example::

    model = replicate(model, topo)
    with td.join(model):
        for batch in my_uneven_batches:          # ranks may have different counts
            state, _ = step(state, batch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from torchdist.errors import CompositionError

__all__ = ["join"]


@contextlib.contextmanager
def join(model: torch.nn.Module, *, divide_by_initial_world_size: bool = True) -> Iterator[None]:
    """Let ranks with fewer batches finish early inside the block (torch ``Join`` over DDP).

    Communicates: one all-reduce of a join flag per forward pass on the ranks still training,
    and the shadowed gradient all-reduces on the ranks that finished, over the model's DDP
    group. Raises ``CompositionError`` for a model that ``replicate`` did not prepare.
    """
    from torch.distributed.algorithms.join import Join
    from torch.nn.parallel import DistributedDataParallel

    ddp = model if isinstance(model, DistributedDataParallel) else _replicated_ddp(model)
    with Join([ddp], divide_by_initial_world_size=divide_by_initial_world_size):
        yield


def _replicated_ddp(model: torch.nn.Module):
    from torchdist._compat import composable_ddp_instance

    ddp = composable_ddp_instance(model) if isinstance(model, torch.nn.Module) else None
    if ddp is None:
        raise CompositionError(
            f"join needs a model whose gradients DDP syncs: torchdist.sharding.replicate(model, "
            f"topo) (or a DistributedDataParallel), got a plain {type(model).__name__}. For "
            "sync_grads, shard, or a loop with other collectives, use "
            "td.stop_at_shortest(batches, topo), which stops every rank at the shortest input."
        )
    return ddp
