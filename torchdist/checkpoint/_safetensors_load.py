"""`load_safetensors`: a safetensors directory (an export, an HF checkpoint) into a model.

Each rank reads only the slice it owns: for a ``DTensor`` parameter the slice is computed from
its placements and this rank's mesh coordinate (``Shard(d)`` splits dimension ``d`` with
``torch.chunk`` semantics, nested left to right over the mesh dimensions, as DTensor and FSDP2
do) and read with ``safe_open(...).get_slice(name)[slices]`` (safetensors maps the file and
copies only the slice), then copied into the local tensor. FSDP2 over tensor parallel
(``_StridedShard`` then ``Shard`` on one dimension) holds one box too: the one the DTensor
reports to DCP (``__create_chunk_list__``). ``Partial`` placements, and a box whose shape is not
the local tensor's, read the full tensor and keep the local part; plain tensors are
read whole. Values are cast to the parameter's dtype (an HF checkpoint in bf16 fills an fp32
model). Missing, unexpected and shape-mismatched names raise ``CheckpointError`` before
anything is copied. safetensors files hold no code, only a JSON header and raw bytes: safe to
read from untrusted sources. Key renames that transformers applies while loading some
architectures (its conversion mappings) are not applied: names must match ``state_dict()``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from torchdist._hf_layout import INDEX, SINGLE, listed_files
from torchdist.checkpoint._safetensors import _LISTED, _entries, _is_dtensor
from torchdist.errors import CheckpointError
from torchdist.topology import Topology

__all__ = ["load_safetensors", "SafetensorsLoad"]


@dataclass(frozen=True)
class SafetensorsLoad:
    """What ``load_safetensors`` read on this rank: tensor bytes (slices only) and tensor count."""

    bytes_read: int
    tensors: int


def load_safetensors(
    model: torch.nn.Module, path: str | os.PathLike, topo: Topology
) -> SafetensorsLoad:
    """Fill ``model`` (plain, sharded, or still on the meta device) in place from a safetensors
    directory in ``path`` (an export, or a Hugging Face checkpoint); each rank reads only its
    slices. Returns what this rank read.

    A model whose tensors are on the meta device (built under ``torch.device("meta")``, sharded
    or not) is first given storage on ``topo.device`` with ``materialize(model, topo.device,
    init=...)`` (non-persistent buffers re-initialised, see ``materialize``), then filled. A tied
    parameter is read under whichever of its names the files hold (HF checkpoints keep the
    embedding and drop ``lm_head.weight``). Communicates nothing: every rank reads the files itself
    (a shared filesystem).

    Example::

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir))
        load_safetensors(shard(model, topo), hf_dir, topo)   # each rank reads its shards
    """
    from safetensors import safe_open

    root = os.fspath(path)
    layout = _read_layout(root)
    entries, aliases = _entries(model)
    source = _sources(root, layout, entries, aliases)
    if any(_local(t).is_meta for t in entries.values()):
        from torchdist.sharding import materialize

        materialize(model, topo.device, init=lambda m: None)
        entries, aliases = _entries(model)
    by_file: dict[str, list[str]] = {}
    for name in entries:
        by_file.setdefault(layout[source[name]][0], []).append(name)
    total, count = 0, 0
    with torch.no_grad():
        for file_name, names in by_file.items():
            with safe_open(os.path.join(root, file_name), framework="pt", device="cpu") as f:
                for name in names:
                    total += _load_one(f, source[name], entries[name])
                    count += 1
    return SafetensorsLoad(bytes_read=total, tensors=count)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _sources(root: str, layout, entries: dict[str, torch.Tensor], aliases) -> dict[str, str]:
    """``{model name: name in the files}``: a tied parameter missing under its first name is
    read under another of its names. Raises ``CheckpointError`` (nothing loaded) on a misfit."""
    others: dict[str, list[str]] = {}
    for alias, first in aliases.items():
        others.setdefault(first, []).append(alias)
    source = {}
    for name in entries:
        found = [n for n in [name, *others.get(name, [])] if n in layout]
        source[name] = found[0] if found else name
    _check_names(root, layout, entries, aliases, source)
    return source


def _read_layout(root: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (file, shape)}`` of an export directory."""
    from safetensors import safe_open

    files = listed_files(root)
    if files is None:
        found = (
            sorted(os.listdir(root))[:8] if os.path.isdir(root) else "nothing (no such directory)"
        )
        raise CheckpointError(
            f"{root} is not a safetensors export: expected {SINGLE} or {INDEX}, found {found}. "
            "Pass the directory export_safetensors wrote."
        )
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file_name in files:
        try:
            with safe_open(os.path.join(root, file_name), framework="pt", device="cpu") as f:
                for key in f.keys():
                    layout[key] = (file_name, tuple(f.get_slice(key).get_shape()))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(
                f"{os.path.join(root, file_name)} is missing, truncated or corrupted "
                f"({type(exc).__name__}: {exc}). Export again."
            ) from None
    return layout


def _check_names(root: str, layout, entries, aliases, source: dict[str, str]) -> None:
    missing = sorted(n for n in entries if source[n] not in layout)
    unexpected = sorted(n for n in layout if n not in entries and n not in aliases)
    shapes = [
        f"{n}: file {layout[source[n]][1]}, model {tuple(t.shape)}"
        for n, t in entries.items()
        if source[n] in layout and layout[source[n]][1] != tuple(t.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    kinds = (
        ("missing from the files", missing),
        ("unexpected in the files", unexpected),
        ("shape mismatch", shapes),
    )
    for what, names in kinds:
        if names:
            more = f", and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
            parts.append(f"{what} ({len(names)}): {', '.join(names[:_LISTED])}{more}")
    raise CheckpointError(
        f"the weights in {root} do not fit the model; "
        + "; ".join(parts)
        + ". Load into the architecture the weights were exported from (same names and shapes). "
        "Nothing was loaded."
    )


def _load_one(f, name: str, target: torch.Tensor) -> int:
    """Copy this rank's part of ``name`` into ``target``; return the bytes read."""
    if not _is_dtensor(target):
        data = f.get_tensor(name)
        target.copy_(data)
        return data.numel() * data.element_size()
    local = target.to_local()
    region = _local_region(target)
    if region is not None and tuple(hi - lo for lo, hi in region) == tuple(local.shape):
        if local.numel() == 0:
            return 0
        data = f.get_slice(name)[tuple(slice(lo, hi) for lo, hi in region)]
        local.copy_(data)
        return data.numel() * data.element_size()
    from torch.distributed.tensor import distribute_tensor

    full = f.get_tensor(name).to(local.dtype)
    # src_data_rank=None: every rank already holds the full tensor, so no communication.
    part = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    local.copy_(part.to_local())
    return full.numel() * full.element_size()


def _local_region(tensor: Any) -> list[tuple[int, int]] | None:
    """The ``[lo, hi)`` per dimension this rank holds of a DTensor, or None when it is no box."""
    from torch.distributed.tensor import Replicate, Shard

    region = [(0, size) for size in tensor.shape]
    coordinate = tensor.device_mesh.get_coordinate()
    if coordinate is None:
        return None
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement).__name__ == "_StridedShard":  # FSDP2 over tp (private in 2.13)
            return _chunk_region(tensor)  # the box DCP writes for it
        if type(placement) is not Shard:  # Partial: no slice of the file holds it
            return None
        dim = placement.dim % len(region)
        lo, hi = region[dim]
        pieces = tensor.device_mesh.size(mesh_dim)
        chunk = math.ceil((hi - lo) / pieces) if hi > lo else 0
        start = min(lo + coordinate[mesh_dim] * chunk, hi)
        region[dim] = (start, min(start + chunk, hi))
    return region


def _chunk_region(tensor: Any) -> list[tuple[int, int]] | None:
    """The box DTensor reports to DCP for this rank's shard (``__create_chunk_list__``, what a
    DCP save writes), or None when it reports several chunks. FSDP2 over a tensor-parallel dim
    (``_StridedShard`` then ``Shard`` on one dim) still holds one contiguous box of rows."""
    chunks = tensor.__create_chunk_list__()
    if len(chunks) != 1:
        return None
    offsets, sizes = chunks[0].offsets, chunks[0].sizes
    return [(int(o), int(o) + int(n)) for o, n in zip(offsets, sizes)]
