"""How pytree leaves travel between ranks: dtype codes, shape metadata, packed buffers.

Leaves of one dtype are packed into one flat buffer per collective (``coalesced``); collectives
that only move data pack every leaf's *bytes* into one uint8 buffer (``moved_as_bytes``), so any
dtype moves — float8 and uint32 included, which gloo rejects as themselves. Shape metadata is one
int64 row per leaf: dtype code, ndim, then the shape padded with -1. The dtype code table is part
of that wire format: only append to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchdist.errors import CollectiveError

MAX_DIMS = 8
# Dtype codes for shape metadata; the order is part of the wire format, so only append.
DTYPES = tuple(
    getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
        "bool", "complex64", "complex128", "uint16", "uint32", "uint64", "complex32",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    )
    if hasattr(torch, name)
)  # fmt: skip


def metadata(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One int64 row per tensor: dtype code, ndim, then the shape padded with -1."""
    meta = torch.full((len(tensors), 2 + MAX_DIMS), -1, dtype=torch.int64)
    for row, tensor in enumerate(tensors):
        if tensor.dim() > MAX_DIMS:
            raise CollectiveError(f"tensors of more than {MAX_DIMS} dims are not supported.")
        if tensor.dtype not in DTYPES:
            raise CollectiveError(f"torchdist cannot communicate tensors of dtype {tensor.dtype}.")
        meta[row, 0] = DTYPES.index(tensor.dtype)
        meta[row, 1] = tensor.dim()
        meta[row, 2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return meta


def all_gather_metadata(tensors: Sequence[torch.Tensor], group) -> torch.Tensor:
    """``[world, len(tensors), 2 + MAX_DIMS]``: every rank's metadata.

    Two small all-gathers: the leaf counts first (so a structure mismatch is an error, not a
    hang), then the metadata rows."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    meta = metadata(tensors)
    count = torch.tensor([len(tensors)], dtype=torch.int64)
    counts = [torch.empty_like(count) for _ in range(size)]
    dist.all_gather(counts, count, group=group)
    if len({int(c) for c in counts}) != 1:
        raise CollectiveError(
            f"ranks hold different numbers of tensors ({[int(c) for c in counts]}); every rank "
            "must pass a pytree of the same structure."
        )
    out = torch.empty((size * meta.shape[0], meta.shape[1]), dtype=torch.int64)
    dist.all_gather_single(out, meta, group=group)
    return out.view(size, *meta.shape)


def by_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    buckets: dict[tuple, list[int]] = {}
    for index, tensor in enumerate(tensors):
        buckets.setdefault((tensor.dtype, tensor.device), []).append(index)
    return buckets


def coalesced(tensors: list[torch.Tensor], run) -> list[torch.Tensor]:
    """Apply the in-place collective ``run(flat)`` to each dtype's tensors as one flat buffer."""
    out: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for indices in by_dtype(tensors).values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        run(flat)
        offset = 0
        for i in indices:
            numel = tensors[i].numel()
            out[i] = flat[offset : offset + numel].view(tensors[i].shape)
            offset += numel
    return out


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes (1-D uint8): collectives that only move data then work for
    every dtype, including those gloo rejects (float8, uint32, ...)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return data.clone().view(dtype).view(shape)  # clone: aligned storage for the wider dtype


def moved_as_bytes(tensors: list[torch.Tensor], run) -> list[torch.Tensor]:
    """Apply the in-place data-movement collective ``run(flat)`` once, to every tensor's bytes
    packed into one uint8 buffer per device."""
    out: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    for indices in by_device.values():
        parts = [as_bytes(tensors[i]) for i in indices]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        run(flat)
        offset = 0
        for i, part in zip(indices, parts):
            out[i] = from_bytes(flat[offset : offset + part.numel()], tensors[i].dtype,
                                 tuple(tensors[i].shape))  # fmt: skip
            offset += part.numel()
    return out


REDUCIBLE = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)  # fmt: skip


def check_same(rows: torch.Tensor, index: int, *, skip_first_dim: bool) -> None:
    compare = rows.clone()
    if skip_first_dim:
        compare[:, 2] = 0
    if not bool((compare == compare[0]).all()):

        def describe(row):
            dtype = DTYPES[int(row[0])]
            return f"{dtype}{tuple(int(d) for d in row[2 : 2 + int(row[1])])}"

        found = ", ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(rows))
        what = "dtype and all dims but the first" if skip_first_dim else "dtype and shape"
        raise CollectiveError(
            f"leaf {index} differs across ranks in {what} ({found}). Make them agree, or pad "
            "with pad_across_ranks first."
        )
