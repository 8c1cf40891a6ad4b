"""`export_safetensors` / `load_safetensors`: consolidated weights in the Hugging Face layout.

``export_safetensors`` writes the full (unsharded) weights of a plain, ``replicate``d,
``shard``ed or tensor-parallel model, from rank 0, as ``model.safetensors``, or, when they
exceed ``max_shard_bytes``, as ``model-00001-of-0000N.safetensors`` files plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {name:
file}}``): the layout ``transformers``, vLLM and ``safetensors`` itself read. Files are written
tensor by tensor: the header is planned from global shapes first, then each parameter is
gathered (``DTensor.full_tensor()``, on every rank, one at a time) and its bytes appended, so
peak memory stays near the largest parameter, not the model. Plain tensors are taken from rank
0 (they are replicated). A tied parameter (one tensor under two names) is written under its
first name only, as ``transformers`` does; loading fills both names. Old ``model*.safetensors``
files and the index in the directory are replaced.

``load_safetensors`` (in ``_safetensors_load.py``) reads such an export, or a Hugging Face
checkpoint directory, into a plain, sharded or meta-device model built with the same parameter
names. Each rank reads only the slice it owns: for a ``DTensor`` parameter the slice
is computed from its placements and this rank's mesh coordinate (``Shard(d)`` splits dimension
``d`` with ``torch.chunk`` semantics, nested left to right over the mesh dimensions, as DTensor
and FSDP2 do) and read with ``safe_open(...).get_slice(name)[slices]``, then copied into the
local tensor. Placements without a contiguous slice (``Partial``, strided shards) read the full
tensor and keep the local part. Values are cast to the parameter's dtype. Missing, unexpected and
shape-mismatched names raise ``CheckpointError`` before anything is copied. safetensors files
hold no code, only a JSON header and raw bytes: safe to read from untrusted sources.

Example::

    export_safetensors(model, "out/hf", topo)                 # every rank calls it
    load_safetensors(model, "out/hf", topo).bytes_read        # this rank's bytes
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import torch

from torchdist._hf_layout import INDEX, SINGLE
from torchdist.collectives import broadcast
from torchdist.errors import CheckpointError
from torchdist.topology import Topology

__all__ = ["export_safetensors"]

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' default "5GB"
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}  # fmt: skip
_LISTED = 12


# --------------------------------------------------------------------------- model entries
def _entries(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``{name: tensor}`` of the model's state, and ``{alias: name}`` for tied duplicates."""
    entries: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        entries[name] = tensor
    return entries, aliases


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _nbytes(tensor: torch.Tensor) -> int:
    return math.prod(tensor.shape) * tensor.element_size()


# --------------------------------------------------------------------------- export
def export_safetensors(
    model: torch.nn.Module,
    path: str | os.PathLike,
    topo: Topology,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config: Any = "auto",
) -> list[str]:
    """Write ``model``'s full weights into directory ``path`` (rank 0); return the files written.

    ``config``: a Hugging Face ``PretrainedConfig`` or a dict, written as ``config.json`` so
    ``AutoModelForCausalLM.from_pretrained(path)`` loads the directory; ``"auto"`` (default)
    writes ``model.config`` when the model has one (any ``transformers`` model); ``None`` none.

    Every rank must call it. Communicates: one all-gather per ``DTensor`` parameter
    (``full_tensor()`` over its mesh), in state-dict order, and one ``broadcast`` of rank 0's
    outcome at the end, so every rank returns only once the files are complete.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise CheckpointError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}.")
    config_text = _config_text(model, config)
    entries, _ = _entries(model)
    for name, tensor in entries.items():
        if tensor.dtype not in _DTYPES:
            raise CheckpointError(
                f"{name} has dtype {tensor.dtype}, which safetensors cannot store; cast it "
                f"(one of {sorted(str(d) for d in _DTYPES)}) before exporting."
            )
    groups = _plan_files(entries, max_shard_bytes)
    names = _file_names(len(groups))
    root = os.fspath(path)
    writing = topo.rank == 0
    error = ""
    if writing:
        try:
            _prepare_dir(root)
        except OSError as exc:
            writing, error = False, f"cannot write into {root}: {exc}"
    for file_name, group in zip(names, groups, strict=True):
        out = None
        if writing:
            try:
                out = open(os.path.join(root, file_name + ".tmp"), "wb")
                out.write(_header(entries, group))
            except OSError as exc:
                writing, error = False, f"writing {file_name} failed: {exc}"
        for name in group:
            full = _full(entries[name])  # every rank: DTensor gathers are collective
            if out is not None and writing:
                try:
                    out.write(memoryview(full.reshape(-1).view(torch.uint8).numpy()))
                except OSError as exc:
                    writing, error = False, f"writing {file_name} failed: {exc}"
            del full
        if out is not None:
            out.close()
    if writing:
        try:
            _finish(root, names, groups, entries)
            if config_text is not None:
                with open(os.path.join(root, "config.json"), "w", encoding="utf-8") as out:
                    out.write(config_text)
        except OSError as exc:
            error = f"finishing the export in {root} failed: {exc}"
    outcome = broadcast({"error": error}, topo)
    if outcome["error"]:
        raise CheckpointError(outcome["error"] + ". Check the disk (space, permissions).")
    return (
        [os.path.join(root, n) for n in names]
        + ([os.path.join(root, INDEX)] if len(names) > 1 else [])
        + ([os.path.join(root, "config.json")] if config_text is not None else [])
    )


def _config_text(model: torch.nn.Module, config: Any) -> str | None:
    """The ``config.json`` text (HF layout) to write, or ``None``; checked on every rank."""
    if isinstance(config, str) and config == "auto":
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "to_json_string"):
            return None
    if config is None:
        return None
    if hasattr(config, "to_json_string"):
        return config.to_json_string(use_diff=False)
    if isinstance(config, dict):
        return json.dumps(config, indent=2, sort_keys=True) + "\n"
    raise CheckpointError(
        f"config={type(config).__name__} is neither a transformers PretrainedConfig nor a "
        "dict; pass model.config, a dict, or config=None."
    )


def _plan_files(entries: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in entries.items():
        nbytes = _nbytes(tensor)
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(entries: dict[str, torch.Tensor], group: list[str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in group:
        tensor = entries[name]
        end = offset + _nbytes(tensor)
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _full(tensor: torch.Tensor) -> torch.Tensor:
    if _is_dtensor(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous()


def _prepare_dir(root: str) -> None:
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if (
            name == SINGLE
            or name == INDEX
            or (name.startswith("model-") and ".safetensors" in name)
        ):
            os.remove(os.path.join(root, name))


def _finish(root: str, names: list[str], groups: list[list[str]], entries) -> None:
    for name in names:
        os.replace(os.path.join(root, name + ".tmp"), os.path.join(root, name))
    if len(names) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in entries.values())},
            "weight_map": {
                t: file for file, group in zip(names, groups, strict=True) for t in group
            },
        }
        with open(os.path.join(root, INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
