"""Where each weight of a checkpoint lies, and reading one tensor into a fresh buffer.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range)
and the raw bytes, so a tensor is read with one ``preadv`` into memory we own and free: nothing is
memory-mapped, so disk-offloaded weights never linger in the process's RSS as file pages. Other
sources (a ``torch.save``d state dict, or a dict in memory) are written to ``offload_dir`` as one
safetensors file for the tensors mapped to disk, with the exporter's own header code.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from torchdist._hf_layout import INDEX, SINGLE, listed_files  # noqa: F401 - SINGLE: its names
from torchdist.errors import CheckpointError, ConfigError, DeviceMapError

__all__ = [
    "TensorLoc", "index_safetensors", "read_tensor", "open_source", "write_offload",
    "check_writable",
]  # fmt: skip

# The dtype codes export_safetensors writes (torchdist.checkpoint._safetensors; a test keeps
# them in step): importing that module would import DCP, which inference does not need.
_CODES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip

OFFLOAD_FILE = "offload.safetensors"


@dataclass(frozen=True)
class TensorLoc:
    """A tensor inside a safetensors file: its absolute byte range, dtype and shape."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _file_index(path: str) -> dict[str, TensorLoc]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > os.fstat(f.fileno()).st_size:
                raise ValueError(f"its header claims {length} bytes, more than the file holds")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(
            f"{path} is missing, truncated or not a safetensors file ({exc}). Export it again."
        ) from None
    base = 8 + length
    codes = _CODES
    found = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in codes:
            raise CheckpointError(f"{path}: {name} has dtype {info['dtype']}, unknown to torch.")
        lo, hi = info["data_offsets"]
        found[name] = TensorLoc(path, codes[info["dtype"]], tuple(info["shape"]),
                                base + lo, base + hi)  # fmt: skip
    return found


def index_safetensors(path: str) -> dict[str, TensorLoc]:
    """``{name: TensorLoc}`` of a ``.safetensors`` file or a directory in the Hugging Face layout
    (``model.safetensors``, or shards listed in ``model.safetensors.index.json``)."""
    if os.path.isfile(path):
        return _file_index(path) if path.endswith(".safetensors") else {}
    files = listed_files(path)
    if files is None:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors")) if (
            os.path.isdir(path)) else []  # fmt: skip
    found: dict[str, TensorLoc] = {}
    for name in files:
        found.update(_file_index(os.path.join(path, name)))
    return found


def read_tensor(loc: TensorLoc, fd: int) -> torch.Tensor:
    """Read ``loc`` from the open file ``fd`` into a new CPU tensor (one copy, no mmap)."""
    nbytes = loc.end - loc.start
    raw = torch.empty(nbytes, dtype=torch.uint8)
    view, done = memoryview(raw.numpy()), 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], loc.start + done)
        if got <= 0:
            raise CheckpointError(f"{loc.path} ended early: truncated? Export it again.")
        done += got
    return raw.view(loc.dtype).reshape(loc.shape)


def open_source(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]):
    """``(safetensors index or None, state dict or None)`` of a checkpoint source."""
    if isinstance(checkpoint, Mapping):
        return None, dict(checkpoint)
    path = os.fspath(checkpoint)
    if not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a safetensors file, a directory written by "
            "export_safetensors (or save_pretrained), or a torch.save'd state dict."
        )
    index = index_safetensors(path)
    if index:
        return index, None
    candidates = [path] if os.path.isfile(path) else [
        os.path.join(path, n) for n in ("pytorch_model.bin", "model.pt", "model.pth")
        if os.path.isfile(os.path.join(path, n))
    ]  # fmt: skip
    if not candidates:
        found = sorted(os.listdir(path))[:8]
        raise CheckpointError(
            f"{path} holds no weights: expected *.safetensors, {INDEX} or pytorch_model.bin, "
            f"found {found}. Pass the directory export_safetensors wrote."
        )
    try:
        state = torch.load(candidates[0], map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types
        raise CheckpointError(f"cannot read {candidates[0]} as a state dict: {exc}") from None
    return None, dict(state)


def write_offload(offload_dir: str | os.PathLike | None, tensors: dict[str, torch.Tensor]):
    """Write ``tensors`` to ``offload_dir/offload.safetensors``; return its index."""
    if offload_dir is None:
        raise DeviceMapError(
            f"{len(tensors)} tensor(s) are mapped to disk (e.g. {next(iter(tensors))}) but the "
            "checkpoint is not safetensors, so they must be written out: pass offload_dir=..."
        )
    from torchdist.checkpoint._safetensors import _header

    root = os.fspath(offload_dir)
    try:
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, OFFLOAD_FILE)
        entries = {k: v.detach().contiguous() for k, v in tensors.items()}
        with open(path + ".tmp", "wb") as out:
            out.write(_header(entries, list(entries)))
            for tensor in entries.values():
                out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        os.replace(path + ".tmp", path)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the offloaded weights into {root}: {exc}. Pass a writable "
            "offload_dir with room for the disk-mapped weights."
        ) from None
    return _file_index(path)


def check_writable(offload_dir: str | os.PathLike) -> None:
    """Raise ``ConfigError`` unless ``offload_dir`` exists (or can be made) and is writable."""
    root = os.fspath(offload_dir)
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, ".torchdist-write-probe")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(
            f"offload_dir {root} is not writable ({exc.strerror or exc}); expected a directory "
            "this process can create files in. Pass another offload_dir."
        ) from None
