"""`shard_loader` over a stream: a torch or HF ``IterableDataset``, or a dispatched source.

See ``docs/data.md``. Two ways to shard a stream over the data-parallel ranks:

* **split** (default): every rank iterates the same stream and keeps its slice of each global
  batch of ``batch_size * dp`` samples (Accelerate's ``IterableDatasetShard``). Communicates
  nothing; needs a re-iterable stream that yields the same samples in the same order on every
  rank (``set_epoch(epoch)`` is called on it first when it has one, as HF's does for shuffling).
* **dispatch** (``dispatch=True``): data-parallel rank 0 alone iterates the source, collates the
  global batch and broadcasts it over the ``dp`` group; every rank keeps its rows. For sources
  that cannot be read on every rank (a socket, a one-shot generator). The end of the stream is
  broadcast too, so every rank stops on the same step.

Both know where the stream ends on every rank at once, so the last, partial global batch is
padded with the epoch's first samples (``even_batches=True``), dropped (``drop_last=True``) or
split unevenly, as the map-style loader does. ``batch_start``/``batch_real`` say where the last
batch sits, so ``gather_for_metrics(x, topo, loader=loader)`` drops the repeats. Resume: the
state is ``(epoch, cursor)``, ``cursor`` counting global samples; loading skips that many.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import optree
import torch

from torchdist.errors import CheckpointError, ConfigError
from torchdist.placement import to_device
from torchdist.topology import Topology

__all__ = ["StreamLoader", "is_stream"]

STATE_VERSION = 1
_KEYS = {"version", "kind", "epoch", "cursor"}


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is read by iteration only (no ``len`` + integer indexing)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return True
    if type(dataset).__name__ == "IterableDataset" and hasattr(dataset, "n_shards"):
        return True  # datasets.IterableDataset before torch's parent class is attached
    return hasattr(dataset, "__iter__") and not hasattr(dataset, "__len__")


class StreamLoader:
    """This rank's batches of a stream; see the module docstring. Iterate it like a DataLoader.

    Attributes: ``epoch``; ``batch_start`` (global index of the last batch's first sample);
    ``batch_real`` (real, non-repeated samples of that global batch); ``dataset_len`` (samples in
    an epoch, once one has ended, else ``None``).
    """

    def __init__(
        self,
        dataset: Any,
        topo: Topology,
        *,
        batch_size: int,
        drop_last: bool = False,
        even_batches: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        dispatch: bool = False,
    ) -> None:
        one_shot = iter(dataset) is dataset if hasattr(dataset, "__iter__") else None
        if one_shot is None:
            raise ConfigError(
                f"shard_loader cannot read a {type(dataset).__name__}: it has neither __iter__ "
                "nor __len__ and __getitem__. Pass a map-style dataset, an IterableDataset, or "
                "a datasets.Dataset / datasets.IterableDataset."
            )
        if one_shot and not dispatch:
            raise ConfigError(
                f"shard_loader got a one-shot iterator ({type(dataset).__name__}): it cannot be "
                "sharded, since every rank would have to read the same samples from it and a "
                "resume would have to read it again. Pass dispatch=True (rank 0 reads, the "
                "others receive their slice), or wrap the source in a re-iterable "
                "IterableDataset / datasets.IterableDataset.from_generator."
            )
        self.dataset = dataset
        self.topo = topo
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.even_batches = bool(even_batches)
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.dispatch = bool(dispatch)
        self.one_shot = bool(one_shot)
        self.dp_size = topo.size("dp")
        self.dp_rank = topo.dp_rank()
        self.global_batch_size = batch_size * self.dp_size
        self.epoch = 0
        self.batch_start = 0
        self.batch_real = 0
        self.dataset_len: int | None = None
        self._cursor = 0
        self._exhausted = False

    # ------------------------------------------------------------------ the source
    def _samples(self, epoch: int) -> Iterator[Any]:
        if self.one_shot:
            if self._exhausted:
                raise ConfigError(
                    "shard_loader(dispatch=True) over a one-shot iterator has no second epoch: "
                    "the iterator is spent. Pass a re-iterable source to train several epochs."
                )
            return self.dataset
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        return iter(self.dataset)

    def _global_batches(self, epoch: int, cursor: int) -> Iterator[tuple[int, int, list[Any]]]:
        """``(global start, real samples, the G samples of the global batch)``, from ``cursor``."""
        g = self.global_batch_size
        it = self._samples(epoch)
        if cursor:
            it = itertools.islice(it, cursor, None)
        head: list[Any] | None = None
        start = cursor
        while True:
            chunk = list(itertools.islice(it, g))
            real = len(chunk)
            if start == 0:
                head = chunk
            if real == 0:
                break
            if real < g:
                if self.drop_last:
                    break
                if self.even_batches:
                    head = head if head is not None else self._head(epoch)
                    chunk = chunk + [head[i % len(head)] for i in range(g - real)]
            yield start, real, chunk
            start += real
            if real < g:
                break
        self._exhausted = True

    def _head(self, epoch: int) -> list[Any]:
        """The epoch's first ``G`` samples (re-read from the start: the padding of even batches)."""
        if self.one_shot:
            raise ConfigError("even batches after a resume need a re-iterable source.")
        return list(itertools.islice(self._samples(epoch), self.global_batch_size))

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        lo, hi = self.dp_rank * self.batch_size, (self.dp_rank + 1) * self.batch_size
        batches = self._dispatched(epoch) if self.dispatch else self._split(epoch, lo, hi)
        from_start, steps = self._cursor == 0, 0
        for start, real, batch in batches:
            self.batch_start, self.batch_real, self._cursor = start, real, start + real
            steps += 1
            if batch is not None:
                yield to_device(batch, self.topo)
        if from_start and steps == 0:  # every rank sees it: they all read (or heard) the end
            raise ConfigError(
                f"shard_loader: the stream {type(self.dataset).__name__} yielded no "
                f"{'full ' if self.drop_last else ''}global batch (of {self.global_batch_size} "
                "= batch_size x data-parallel ranks) in a whole epoch, so a training loop over "
                "it would never step. Check the files/filter that built it, or lower batch_size "
                "(or pass drop_last=False)."
            )
        if self.epoch == epoch:  # ran to the end: the next iteration is the next epoch
            self.dataset_len = self._cursor
            self.epoch, self._cursor = epoch + 1, 0

    def _split(self, epoch: int, lo: int, hi: int) -> Iterator[tuple[int, int, Any]]:
        for start, real, chunk in self._global_batches(epoch, self._cursor):
            mine = chunk[lo:hi]
            yield start, real, (self.collate_fn(mine) if mine else None)

    def _dispatched(self, epoch: int) -> Iterator[tuple[int, int, Any]]:
        """dp rank 0 reads and broadcasts ``(start, real, global batch)``; ``None`` ends."""
        import torch.distributed as dist

        from torchdist.collectives import broadcast, resolve_group

        group = resolve_group(self.topo, "dp") if self.topo.is_live else None
        reader = self._global_batches(epoch, self._cursor) if self.dp_rank == 0 else None
        b = self.batch_size
        while True:
            header: list[Any] = [None]
            if reader is not None:
                try:  # the reader's failure reaches every rank: none waits for a batch
                    item = next(reader, None)
                    if item is not None:
                        start, real, chunk = item
                        batch = self.collate_fn(chunk)
                        header = [(start, real, optree.tree_map(_placeholder, batch))]
                except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                    header = [f"{type(exc).__name__}: {exc}"]
            if group is not None:
                dist.broadcast_object_list(header, group_src=0, group=group)
            if header[0] is None:
                return
            if isinstance(header[0], str):
                raise ConfigError(
                    f"shard_loader(dispatch=True): the reading rank (dp rank 0) failed: "
                    f"{header[0]}. Fix the source on that rank; every rank stopped with it."
                )
            start, real, placeholder = header[0]
            if group is not None:
                batch = broadcast(batch if self.dp_rank == 0 else placeholder, group, src=0)
            hi = b * (self.dp_rank + 1) if self.even_batches else min(b * (self.dp_rank + 1), real)
            lo = min(b * self.dp_rank, hi)
            yield start, real, (_rows(batch, lo, hi) if hi > lo else None)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands: ``epoch`` and ``cursor`` (global samples of the epoch read)."""
        return {"version": STATE_VERSION, "kind": "stream", "epoch": self.epoch,
                "cursor": self._cursor}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the ``cursor`` samples ``state`` recorded (at any world size)."""
        self.check_state_dict(state)
        self.epoch, self._cursor = state["epoch"], state["cursor"]
        self.batch_start = self._cursor

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``CheckpointError`` if ``state`` cannot resume this loader; change nothing."""
        if not isinstance(state, dict) or not _KEYS <= set(state) or state["kind"] != "stream":
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"loader state {found} is not a stream loader's state (expected keys "
                f"{sorted(_KEYS)} with kind='stream'). Pass the state_dict() of a loader built "
                "over the same stream."
            )
        for key in ("epoch", "cursor"):
            value = state[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(
                    f"loader state {key}={value!r}, expected an int >= 0; pass "
                    "StreamLoader.state_dict() unchanged."
                )
        if self.one_shot and state["cursor"] and (not self.dispatch or self.dp_rank == 0):
            raise CheckpointError(
                "cannot resume a one-shot iterator mid-epoch: it cannot be re-read. Rebuild it "
                "positioned after the samples already consumed, or use a re-iterable source."
            )

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first sample at the next iteration."""
        self.epoch, self._cursor, self.batch_start = epoch, 0, 0

    def __repr__(self) -> str:
        mode = "dispatch" if self.dispatch else "split"
        return (f"StreamLoader({mode}, batch_size={self.batch_size}, dp={self.dp_rank}/"
                f"{self.dp_size}, epoch={self.epoch}, cursor={self._cursor})")  # fmt: skip


def _placeholder(leaf: Any) -> Any:
    return torch.empty(0, dtype=leaf.dtype) if isinstance(leaf, torch.Tensor) else leaf


def _rows(batch: Any, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of every tensor (and list) leaf of a collated batch."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    if isinstance(batch, dict):
        return {k: _rows(v, lo, hi) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return (
            type(batch)(*(_rows(v, lo, hi) for v in batch))
            if hasattr(batch, "_fields")
            else (tuple(_rows(v, lo, hi) for v in batch))
        )
    if isinstance(batch, list):
        return (
            batch[lo:hi]
            if not batch or not isinstance(batch[0], torch.Tensor)
            else [_rows(v, lo, hi) for v in batch]
        )
    return batch
