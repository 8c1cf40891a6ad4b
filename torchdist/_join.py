"""`join(...)`: uneven inputs under `replicate` (DDP) or `sync_grads`, with torch's ``Join``.

Ranks that run out of batches early leave the loop and wait at the end of the ``with`` block;
until every rank has, they *shadow* the others' gradient all-reduces (zeros), so the ranks that
still have data keep training and nobody waits in a collective that a finished rank never
issues. Gradients are divided by the initial world size by default (a finished rank counts as a
zero gradient, as in torch), or by the ranks still training with
``divide_by_initial_world_size=False``. Nothing is dropped, unlike ``stop_at_shortest``.

* ``join(model)`` for a ``replicate``d model (or a ``DistributedDataParallel``): torch's DDP
  join hook.
* ``join(state)`` for a ``TrainState`` bound to a step with ``sync_grads``: its bucket engine is
  the joinable (``state.transforms["sync_grads"]``). At the end of the block every rank takes
  the parameters of a rank that trained to the end (one broadcast per parameter over the
  data-parallel group), as DDP's join does; a rank that finished early keeps its optimizer
  state from its own last step (as in torch).

The loop body may issue no other collective (a metric ``all_reduce``, a ``barrier``, a DTensor
gradient norm), since a finished rank cannot shadow those; for such loops use
``stop_at_shortest``, which stops every rank at the shortest input (docs/faults.md).

Example::

    model = replicate(model, topo)
    with td.join(model):
        for batch in my_uneven_batches:          # ranks may have different counts
            state, _ = step(state, batch)

    state = step.init(td.TrainState(plain_model, opt))      # compose(..., sync_grads(topo))
    with td.join(state):
        for batch in my_uneven_batches:
            state, _ = step(state, batch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from torchdist.errors import CompositionError

__all__ = ["join"]


@contextlib.contextmanager
def join(target: Any, *, divide_by_initial_world_size: bool = True) -> Iterator[None]:
    """Let ranks with fewer batches finish early inside the block (torch ``Join``).

    ``target``: a ``replicate``d model, or a ``TrainState`` whose step has ``sync_grads``.
    Communicates: one all-reduce of a join flag per step on the ranks still training (per
    forward under DDP; before the first bucket under ``sync_grads``), the shadowed gradient
    all-reduces on the ranks that finished, over the data-parallel group; under ``sync_grads``,
    at the end, one all-reduce to pick a rank that trained to the end and a broadcast of every
    parameter from it. Raises ``CompositionError`` for anything else.
    """
    from torch.distributed.algorithms.join import Join
    from torch.nn.parallel import DistributedDataParallel

    from torchdist.state import TrainState

    if isinstance(target, TrainState):
        engine = _sync_grads_engine(target)
        if engine is None:
            with join(target.model, divide_by_initial_world_size=divide_by_initial_world_size):
                yield
            return
        joinable = _joinable(engine)
        engine.join_notify = lambda: Join.notify_join_context(joinable)
        engine.divide_by_active = not divide_by_initial_world_size
        try:
            with Join([joinable]):
                yield
        finally:
            engine.join_notify, engine.divide_by_active = None, False
        return
    ddp = target if isinstance(target, DistributedDataParallel) else _replicated_ddp(target)
    with Join([ddp], divide_by_initial_world_size=divide_by_initial_world_size):
        yield


def _sync_grads_engine(state: Any) -> Any:
    found = state.transforms.get("sync_grads")
    if found is not None and getattr(found, "engine", None) is not None:
        return found.engine
    return None


def _joinable(engine: Any) -> Any:
    """torch's ``Joinable`` over sync_grads' bucket engine (``GradSync``)."""
    from torch.distributed.algorithms.join import Joinable, JoinHook

    class Hook(JoinHook):
        def main_hook(self) -> None:
            engine.shadow()

        def post_hook(self, is_last_joiner: bool) -> None:
            engine.sync_parameters_from_last_joiner(is_last_joiner)

    class SyncGradsJoinable(Joinable):
        def __init__(self) -> None:
            super().__init__()

        def join_hook(self, **kwargs: Any) -> JoinHook:
            return Hook()

        @property
        def join_device(self) -> torch.device:
            return engine.buckets[0].device if engine.buckets else torch.device("cpu")

        @property
        def join_process_group(self) -> Any:
            return engine.group

    return SyncGradsJoinable()


def _replicated_ddp(model: torch.nn.Module):
    from torchdist._compat import composable_ddp_instance

    ddp = composable_ddp_instance(model) if isinstance(model, torch.nn.Module) else None
    if ddp is None:
        raise CompositionError(
            f"join needs a model whose gradients DDP syncs (torchdist.sharding.replicate(model, "
            f"topo), or a DistributedDataParallel) or a TrainState bound to a step with "
            f"sync_grads (td.join(state)); got a plain {type(model).__name__}. For shard, or a "
            "loop with other collectives, use td.stop_at_shortest(batches, topo), which stops "
            "every rank at the shortest input."
        )
    return ddp
