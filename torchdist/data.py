"""`shard_loader`: a sharded, seeded, resumable loader (map-style here; streams: docs/data.md).

Every data-parallel rank gets its contiguous slice of every *global* batch; the order is a pure
function of ``(seed, epoch)``, so the loader communicates nothing; ``state_dict`` records the
epoch and the global cursor and resumes at any world size without repeating or skipping a
sample. The rules (padding of the last batch, uneven ranks, workers): ``docs/data.md``.

Example::

    loader = td.data.shard_loader(train_set, topo, batch_size=32, seed=0)
    for epoch in range(loader.epoch, epochs):
        for x, y in loader:                         # this rank's 32 of each 32*dp global batch
            state, metrics = step(state, (x, y))
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from torchdist._batches import BatchSamplerLoader
from torchdist._stream import StreamLoader, is_stream
from torchdist._tokens import count_tokens, token_mean_loss, with_window_tokens
from torchdist.errors import CheckpointError, ConfigError, TopologyError
from torchdist.placement import to_device
from torchdist.runtime._forksafe import collector_frozen
from torchdist.topology import Topology

__all__ = [
    "shard_loader",
    "ShardedLoader",
    "StreamLoader",
    "BatchSamplerLoader",
    "epoch_order",
    "count_tokens",
    "token_mean_loss",
    "with_window_tokens",
]

STATE_VERSION = 1


def epoch_order(n: int, seed: int, epoch: int, *, shuffle: bool = True) -> torch.Tensor:
    """The order of the ``n`` samples in ``epoch``: a pure function of ``(seed, epoch)``."""
    if not shuffle:
        return torch.arange(n)
    digest = hashlib.sha256(f"torchdist.data:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n, generator=generator)


class ShardedLoader:
    """This rank's batches of a dataset, one slice of each global batch; see the module docstring.

    Attributes: ``epoch``; ``batch_start``, the index within the epoch (over all ranks) of the
    first sample of the batch most recently yielded; ``batch_size`` (per rank);
    ``global_batch_size``; ``len(loader)``, the batches this rank yields in a whole epoch.
    """

    def __init__(
        self,
        dataset: Any,
        topo: Topology,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        even_batches: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
    ) -> None:
        _check_dataset(dataset)
        if not isinstance(topo, Topology):
            raise TopologyError(f"shard_loader needs a Topology, got {type(topo).__name__}.")
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"shard_loader: {name} must be an int >= {low}, got {value!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"shard_loader: seed must be an int, got {seed!r}.")
        _check_not_empty(dataset, batch_size * topo.size("dp"), drop_last)
        self.dataset = dataset
        self.topo = topo
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.even_batches = bool(even_batches)
        self.num_workers = num_workers
        self.dp_size = topo.size("dp")
        self.dp_rank = topo.dp_rank()
        self.global_batch_size = batch_size * self.dp_size
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.epoch = 0
        self.batch_start = 0
        self.batch_real = 0
        self._cursor = 0

    @property
    def dataset_len(self) -> int:
        """Samples in an epoch (``gather_for_metrics(..., loader=)`` reads it)."""
        return len(self.dataset)

    # ------------------------------------------------------------------ plan
    def _end(self) -> int:
        """Where the epoch ends for this loader: ``n``, or the last full global batch's end."""
        n = len(self.dataset)
        return n - n % self.global_batch_size if self.drop_last else n

    def _plan(self, epoch: int, cursor: int) -> Iterator[tuple[int, int, list[int]]]:
        """``(global start, real samples in the global batch, this rank's indices)`` per batch."""
        n, b, g = len(self.dataset), self.batch_size, self.global_batch_size
        end = self._end()
        if cursor >= end:
            return
        order = epoch_order(n, self.seed, epoch, shuffle=self.shuffle)
        lo, hi = self.dp_rank * b, (self.dp_rank + 1) * b
        start = cursor
        while start < end:
            real = min(g, end - start)
            if self.drop_last and real < g:  # only after a resume at a larger world size
                return
            if real < g and self.even_batches:
                pad = order[torch.arange(g - real) % n]
                batch = torch.cat([order[start : start + real], pad])
            else:
                batch = order[start : start + real]
            mine = batch[lo:hi].tolist()
            if mine:
                yield start, real, mine
            start += real

    def __len__(self) -> int:
        n, b, g = len(self.dataset), self.batch_size, self.global_batch_size
        full, rest = divmod(n, g)
        if self.drop_last or rest == 0:
            return full
        if self.even_batches:
            return full + 1
        return full + (rest > self.dp_rank * b)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        if 0 < self._cursor >= self._end():  # an exhausted epoch: start the next one
            self.epoch, self._cursor = self.epoch + 1, 0
        epoch = self.epoch
        plan = list(self._plan(epoch, self._cursor))
        batches = self._fetch(plan, epoch)
        for (start, real, _), batch in zip(plan, batches, strict=False):
            # The cursor moves before the yield: a state saved in the loop body that consumes
            # this batch resumes after it.
            self.batch_start, self.batch_real, self._cursor = start, real, start + real
            yield to_device(batch, self.topo)
        # Ran to the end (not broken out of): the epoch is done, also on a rank whose share of
        # the last batch was empty, or when the tail did not fill a batch (drop_last).
        if self.epoch == epoch:
            self.epoch, self._cursor = epoch + 1, 0

    def _fetch(self, plan: Sequence[tuple[int, int, list[int]]], epoch: int) -> Iterator[Any]:
        if self.num_workers == 0:
            return (self._collate(indices) for _, _, indices in plan)
        digest = hashlib.sha256(f"workers:{self.seed}:{epoch}:{self._cursor}".encode()).digest()
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=[indices for _, _, indices in plan],
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.topo.device.type == "cuda",
            generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1),
        )
        # Workers fork here. Freeze the collector across the fork (as td.spawn does): garbage
        # this process still holds (an earlier in-process world's gloo groups and stores) must
        # not be finalised in a worker, where that crashes it.
        with collector_frozen():
            return iter(loader)

    def _collate(self, indices: list[int]) -> Any:
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(indices) if callable(getitems) else [self.dataset[i] for i in indices]
        return self.collate_fn(samples)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"set_epoch: epoch must be a non-negative int, got {epoch!r}.")
        self.epoch, self._cursor, self.batch_start = epoch, 0, 0

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands, as ints and bools (``torch.load(weights_only=True)``-safe)."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "cursor": self._cursor,
            "seed": self.seed,
            "dataset_len": len(self.dataset),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the next sample ``state`` recorded, whatever the world size was then."""
        self.check_state_dict(state)
        self.epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        self.batch_start = self._cursor

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``CheckpointError`` if ``state`` cannot resume this loader; change nothing."""
        expected = {"version", "epoch", "cursor", "seed", "dataset_len", "shuffle"}
        if not isinstance(state, dict) or not expected <= set(state):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"loader state has keys {found}, expected {sorted(expected)}: it is not a "
                "ShardedLoader.state_dict(). Pass the state this loader type saved."
            )
        _check_state_types(state)
        if state["version"] > STATE_VERSION:
            raise CheckpointError(
                f"loader state version {state['version']} is newer than this torchdist reads "
                f"(<= {STATE_VERSION}); upgrade torchdist."
            )
        n = len(self.dataset)
        for key, mine in (("dataset_len", n), ("seed", self.seed), ("shuffle", self.shuffle)):
            if state[key] != mine:
                raise CheckpointError(
                    f"loader state was saved with {key}={state[key]!r}, but this loader has "
                    f"{key}={mine!r}; resuming would replay a different order of samples. Build "
                    f"the loader with {key}={state[key]!r} (the same dataset and seed), or start "
                    "a fresh epoch with set_epoch() instead of loading."
                )
        cursor = state["cursor"]
        if not 0 <= cursor <= n:
            raise CheckpointError(f"loader state cursor {cursor} is outside the epoch (0..{n}).")

    def __repr__(self) -> str:
        return (
            f"ShardedLoader(len(dataset)={len(self.dataset)}, batch_size={self.batch_size}, "
            f"dp={self.dp_rank}/{self.dp_size}, epoch={self.epoch}, cursor={self._cursor})"
        )


def shard_loader(
    dataset: Any,
    topo: Topology,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    even_batches: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_workers: int = 0,
    batch_sampler: Any = None,
    dispatch: bool = False,
) -> ShardedLoader | StreamLoader | BatchSamplerLoader:
    """This rank's sharded, seeded, resumable loader over ``dataset``: map-style or a stream.

    A torch or Hugging Face ``IterableDataset`` (or ``dispatch=True``) gets a ``StreamLoader``
    (``torchdist/_stream.py``; ``dispatch``: dp rank 0 reads and broadcasts); a
    ``batch_sampler`` (index lists of any size) a ``BatchSamplerLoader``. ``shuffle``/``seed``/
    ``num_workers`` apply to map-style datasets only (a stream shuffles itself, e.g. HF's
    ``.shuffle(seed)``, re-seeded per epoch through its ``set_epoch``).

    ``batch_size`` is per data-parallel rank; a global batch holds ``batch_size *
    topo.size("dp")`` samples. Shuffling is a pure function of ``(seed, epoch)``; see the module
    docstring for padding (``even_batches``), ``drop_last`` and resuming across world sizes.

    Communicates nothing: every rank computes the same global order and takes its slice.

    Example::

        loader = shard_loader(ds, topo, batch_size=4, seed=0)
        for batch in loader:
            preds = td.gather_for_metrics(model(batch[0]).argmax(-1), topo,
                                          loader=loader)
    """
    common = {"drop_last": drop_last, "even_batches": even_batches, "collate_fn": collate_fn}
    if dispatch or is_stream(dataset):
        _check_sizes(topo, batch_size)
        if batch_sampler is not None:
            raise ConfigError("batch_sampler= needs a map-style dataset, not a stream.")
        return StreamLoader(dataset, topo, batch_size=batch_size, dispatch=dispatch, **common)
    if batch_sampler is not None:
        _check_sizes(topo, 1)
        return BatchSamplerLoader(dataset, topo, batch_sampler=batch_sampler, **common)
    return ShardedLoader(
        dataset,
        topo,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        even_batches=even_batches,
        collate_fn=collate_fn,
        num_workers=num_workers,
    )


def _check_sizes(topo: Any, batch_size: int) -> None:
    if not isinstance(topo, Topology):
        raise TopologyError(f"shard_loader needs a Topology, got {type(topo).__name__}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"shard_loader: batch_size must be an int >= 1, got {batch_size!r}.")


def _check_not_empty(dataset: Any, global_batch: int, drop_last: bool) -> None:
    """An epoch with no batch would train zero steps without a word: refuse it."""
    n = len(dataset)
    if n == 0:
        raise ConfigError(
            f"shard_loader got an empty dataset ({type(dataset).__name__} of length 0): every "
            "epoch would yield no batch. Check the path, split or filter that built it."
        )
    if drop_last and n < global_batch:
        raise ConfigError(
            f"shard_loader(drop_last=True): the dataset has {n} samples, fewer than one global "
            f"batch ({global_batch} = batch_size x data-parallel ranks), so every epoch would be "
            "empty. Lower batch_size, or pass drop_last=False."
        )


def _check_state_types(state: dict[str, Any]) -> None:
    """Refuse a loader state whose fields have the wrong type or sign, before any is used."""
    for key in ("version", "epoch", "cursor", "seed", "dataset_len"):
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(
                f"loader state {key}={value!r} is a {type(value).__name__}, expected an int; "
                "the state was edited or comes from another loader. Pass "
                "ShardedLoader.state_dict() unchanged."
            )
        if key != "seed" and value < 0:
            raise CheckpointError(
                f"loader state {key}={value} is negative, expected an int >= 0; pass "
                "ShardedLoader.state_dict() unchanged."
            )
    if not isinstance(state["shuffle"], bool):
        raise CheckpointError(
            f"loader state shuffle={state['shuffle']!r} is a {type(state['shuffle']).__name__}, "
            "expected a bool; pass ShardedLoader.state_dict() unchanged."
        )


def _check_dataset(dataset: Any) -> None:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise TypeError(
            f"shard_loader needs a map-style dataset (len and integer indexing), got the "
            f"IterableDataset {type(dataset).__name__}: an iterable cannot be shuffled, sliced "
            "per rank or resumed by index. Build it with shard_loader(...), which streams it "
            "(a StreamLoader), or materialise it into a map-style Dataset."
        )
    missing = [name for name in ("__len__", "__getitem__") if not hasattr(dataset, name)]
    if missing:
        raise TypeError(
            f"shard_loader needs a map-style dataset with __len__ and __getitem__; "
            f"{type(dataset).__name__} has no {' or '.join(missing)}. Wrap it in a "
            "torch.utils.data.Dataset, or pass a list or a TensorDataset."
        )
