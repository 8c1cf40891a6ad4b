"""`shard_loader(..., batch_sampler=...)`: a custom batch sampler's batches dealt over the dp ranks.

A batch sampler yields lists of indices of varying size (length bucketing, token budgets). Global
step ``k`` takes the sampler's batches ``k*dp .. k*dp + dp - 1``; data-parallel rank ``d`` gets
batch ``k*dp + d``. Every rank draws the same batches (``set_epoch(epoch)`` is called on the
sampler first when it has one; it must be deterministic), so this communicates nothing. When the
batch count does not divide by ``dp`` the last step is completed with the epoch's first batches
(``even_batches=True``), dropped (``drop_last=True``), or left short (ranks past the end get no
batch). Resume: ``cursor`` counts batches of the epoch consumed over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchdist.errors import CheckpointError, ConfigError
from torchdist.placement import to_device
from torchdist.topology import Topology

__all__ = ["BatchSamplerLoader"]

STATE_VERSION = 1


class BatchSamplerLoader:
    """This rank's batches of ``dataset`` as ``batch_sampler`` groups them (module docstring).

    Attributes: ``epoch``; ``batch_start`` (sampler batches of the epoch before this step);
    ``batch_real`` (real samples of the last global step, repeats excluded).
    """

    def __init__(
        self,
        dataset: Any,
        topo: Topology,
        *,
        batch_sampler: Any,
        drop_last: bool = False,
        even_batches: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if not hasattr(batch_sampler, "__iter__"):
            raise ConfigError(
                f"batch_sampler must be an iterable of index lists, got "
                f"{type(batch_sampler).__name__}. Pass e.g. a torch BatchSampler."
            )
        self.dataset = dataset
        self.topo = topo
        self.batch_sampler = batch_sampler
        self.drop_last = bool(drop_last)
        self.even_batches = bool(even_batches)
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.dp_size = topo.size("dp")
        self.dp_rank = topo.dp_rank()
        self.epoch = 0
        self.batch_start = 0
        self.batch_real = 0
        self._cursor = 0

    def _batches(self, epoch: int) -> list[list[int]]:
        set_epoch = getattr(self.batch_sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        batches = [list(map(int, b)) for b in self.batch_sampler]
        if not batches:
            raise ConfigError("the batch_sampler yielded no batch for this epoch; check it.")
        return batches

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        batches = self._batches(epoch)
        dp, d = self.dp_size, self.dp_rank
        start = self._cursor
        while start < len(batches):
            group = batches[start : start + dp]
            real = len(group)
            if real < dp and self.drop_last:
                break
            self.batch_real = sum(len(b) for b in group)
            if real < dp and self.even_batches:
                group = group + [batches[i % len(batches)] for i in range(dp - real)]
            self.batch_start, self._cursor = start, start + real
            start += real
            if d < len(group):
                yield to_device(self._collate(group[d]), self.topo)
        if self.epoch == epoch:
            self.epoch, self._cursor = epoch + 1, 0

    def __len__(self) -> int:
        n = len(self._batches(self.epoch))
        full, rest = divmod(n, self.dp_size)
        if rest == 0 or self.drop_last:
            return full
        return full + (self.even_batches or rest > self.dp_rank)

    def _collate(self, indices: list[int]) -> Any:
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(indices) if callable(getitems) else [self.dataset[i] for i in indices]
        return self.collate_fn(samples)

    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and ``cursor`` (sampler batches of the epoch consumed over all ranks)."""
        return {"version": STATE_VERSION, "kind": "batch_sampler", "epoch": self.epoch,
                "cursor": self._cursor}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the sampler batch after ``cursor`` (at any world size)."""
        self.check_state_dict(state)
        self.epoch, self._cursor = state["epoch"], state["cursor"]

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``CheckpointError`` if ``state`` cannot resume this loader; change nothing."""
        keys = {"version", "kind", "epoch", "cursor"}
        if (
            not isinstance(state, dict)
            or not keys <= set(state)
            or (state["kind"] != "batch_sampler")
        ):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"loader state {found} is not a batch-sampler loader's state (expected keys "
                f"{sorted(keys)} with kind='batch_sampler'). Pass this loader's state_dict()."
            )
        for key in ("epoch", "cursor"):
            if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
                raise CheckpointError(f"loader state {key}={state[key]!r}, expected an int >= 0.")

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration."""
        self.epoch, self._cursor, self.batch_start = epoch, 0, 0
