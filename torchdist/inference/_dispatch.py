"""``load_and_dispatch``: weights straight from a checkpoint into a device map, with offload hooks.

Each tensor is stored once, where the map sends its first name: on a GPU or in RAM as a real
tensor, or on disk as a byte range of a safetensors file. A module whose tensors are stored
elsewhere than where it runs (its own GPU, or the compute device for CPU- and disk-mapped units)
holds meta placeholders; a forward pre-hook puts the real tensors in place (a copy to the device,
or a read from disk) and a forward hook puts the placeholders back, so the copy is freed. Tied
weights share one stored tensor; a module that shares it from another device gets a transient
copy. Inputs are moved to each unit's device.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchdist._model_record import record_dispatch, record_of
from torchdist.errors import CheckpointError, CompositionError, ConfigError, DeviceMapError
from torchdist.inference._device_map import (
    DeviceMap,
    NoSplit,
    infer_device_map,
    no_split_predicate,
)
from torchdist.inference._tensors import Group, Slot, tensor_groups
from torchdist.inference._weights import (
    TensorLoc,
    check_writable,
    open_source,
    read_tensor,
    write_offload,
)

__all__ = ["load_and_dispatch", "Dispatched", "dispatched"]

_LISTED = 12


@dataclass
class Dispatched:
    """What ``load_and_dispatch`` did to a model: its map, stored bytes per device, and hooks."""

    device_map: DeviceMap
    stored_bytes: dict[str, int]
    offloaded_units: int
    _handles: list[Any] = field(default_factory=list, repr=False)
    _files: dict[str, int] = field(default_factory=dict, repr=False)

    def close(self) -> None:
        """Remove the hooks and close the files (the model is unusable for offloaded units)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _close_all(self._files)


def dispatched(model: nn.Module) -> Dispatched | None:
    """The ``Dispatched`` record of a model ``load_and_dispatch`` returned, or None."""
    return record_of(model).dispatch


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _set(slot: Slot, tensor: torch.Tensor) -> None:
    if slot.is_param:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        slot.owner._parameters[slot.attr] = tensor
    else:
        slot.owner._buffers[slot.attr] = tensor


class _Unit:
    """The slots one hooked module fills before its forward and empties after."""

    def __init__(self, device: torch.device, store: _Store) -> None:
        self.device, self.store = device, store
        self.slots: list[tuple[Slot, int, torch.Tensor]] = []  # (slot, group index, placeholder)
        self.moves_inputs = True

    def pre(self, module: nn.Module, args: tuple, kwargs: dict):
        loaded: dict[int, torch.Tensor] = {}
        for slot, index, _ in self.slots:
            if index not in loaded:
                loaded[index] = self.store.materialize(index, self.device)
            _set(slot, loaded[index])
        if self.moves_inputs:
            return _move(args, self.device), _move(kwargs, self.device)
        return None

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        for slot, _, placeholder in self.slots:
            _set(slot, placeholder)
        return None


class _Store:
    """Each group's stored tensor: real (on a device) or a ``TensorLoc`` on disk."""

    def __init__(self, files: dict[str, int], dtype: torch.dtype | None) -> None:
        self.files, self.dtype = files, dtype
        self.stored: dict[int, torch.Tensor | TensorLoc] = {}
        self.targets: dict[int, torch.dtype] = {}  # group -> dtype its floating values load as

    def target(self, index: int, like: torch.Tensor) -> None:
        """Floating values of group ``index`` load as ``dtype`` if given, else as ``like``'s
        (the model's own dtype, as load_safetensors and Accelerate do)."""
        if like.is_floating_point():
            self.targets[index] = self.dtype or like.dtype

    def cast(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        want = self.targets.get(index)
        if want is not None and tensor.is_floating_point() and tensor.dtype != want:
            return tensor.to(want)
        return tensor

    def read(self, loc: TensorLoc, index: int) -> torch.Tensor:
        if loc.path not in self.files:
            self.files[loc.path] = os.open(loc.path, os.O_RDONLY)
        return self.cast(read_tensor(loc, self.files[loc.path]), index)

    def materialize(self, index: int, device: torch.device) -> torch.Tensor:
        stored = self.stored[index]
        if isinstance(stored, TensorLoc):
            return self.read(stored, index).to(device)
        return stored.to(device)


def load_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    device_map: str | Mapping[str, str | int] = "auto",
    *,
    max_memory: Mapping[str | int, int | str] | None = None,
    no_split: NoSplit = None,
    offload_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load ``checkpoint`` into ``model`` (meta or real) following ``device_map``; return it.

    Communicates nothing (one process; its devices). ``checkpoint`` is a safetensors file or a
    directory in the Hugging Face layout (what ``export_safetensors`` and ``save_pretrained``
    write), a ``torch.save``d state dict or a dict of tensors. ``device_map="auto"`` plans one with
    ``infer_device_map(model, max_memory=..., no_split=..., dtype=...)``. Disk-mapped weights
    are read from the safetensors files at each forward (written to ``offload_dir`` first when
    the source is not safetensors). Floating weights load as ``dtype``, or, when it is None, as
    the model's own tensors are typed (a bf16 checkpoint into an fp32 model loads as fp32).

    Example::

        model = init_empty(lambda: AutoModelForCausalLM.from_config(config))
        model = load_and_dispatch(model, "ckpt/", max_memory={"cpu": "1GiB", "disk": "50GiB"})
        model.generate(ids, max_new_tokens=8)
    """
    if dispatched(model) is not None:
        raise CompositionError(
            "load_and_dispatch was already applied to this model; build a fresh one "
            "(init_empty) to load it under another map."
        )
    if isinstance(device_map, str):
        if device_map != "auto":
            raise ConfigError(f"device_map must be 'auto' or a mapping, got {device_map!r}.")
        dmap = infer_device_map(model, max_memory=max_memory, no_split=no_split, dtype=dtype)
    else:
        dmap = DeviceMap.of(device_map)
    if offload_dir is not None:
        check_writable(offload_dir)
    groups = tensor_groups(model)
    homes = _homes(groups, dmap)
    index, state = open_source(checkpoint)
    names = set(index) if index is not None else set(state)
    _check(checkpoint, groups, names, index if index is not None else state, dmap)
    source = _source_of(groups, names)
    files: dict[str, int] = {}
    store = _Store(files, dtype)
    if index is None:
        on_disk = {source[i]: state[source[i]] for i in source if homes[i] == "disk"}
        index = write_offload(offload_dir, on_disk) if on_disk else {}
    stored_bytes: dict[str, int] = {}
    with torch.no_grad():
        for i, group in enumerate(groups):
            home = homes[i]
            if not group.persistent or i not in source:
                tensor = group.tensor if home == "disk" else group.tensor.to(home)
                store.stored[i] = tensor if home != "disk" else tensor.to("cpu")
                continue
            name = source[i]
            store.target(i, group.tensor)
            if home == "disk":
                store.stored[i] = index[name]
            elif name in index:
                store.stored[i] = store.read(index[name], i).to(home)
            else:
                store.stored[i] = store.cast(state[name].detach(), i).to(home, copy=True)
            stored = store.stored[i]
            size = (stored.end - stored.start) if isinstance(stored, TensorLoc) else (
                stored.numel() * stored.element_size())  # fmt: skip
            stored_bytes[home] = stored_bytes.get(home, 0) + size
    record = Dispatched(dmap, stored_bytes, 0, _files=files)
    _install(model, groups, dmap, store, record, no_split)
    record_dispatch(model, record)
    weakref.finalize(model, _close_all, files)  # the open checkpoint files go with the model
    return model


def _close_all(files: dict[str, int]) -> None:
    for fd in files.values():
        os.close(fd)
    files.clear()


def _homes(groups: list[Group], dmap: DeviceMap) -> list[str]:
    homes, unmapped = [], []
    for group in groups:
        device = dmap.device_of(group.name)
        if device is None:
            unmapped.append(group.name)
        homes.append(device or "cpu")
    if unmapped:
        raise DeviceMapError(
            f"the device map places nothing for {len(unmapped)} tensor(s): "
            f"{', '.join(unmapped[:_LISTED])}. Map them (or a module above them), or use "
            "device_map='auto'."
        )
    return homes


def _source_of(groups: list[Group], names: set[str]) -> dict[int, str]:
    found = {}
    for i, group in enumerate(groups):
        hit = next((n for n in group.names if n in names), None)
        if group.persistent and hit is not None:
            found[i] = hit
    return found


def _check(checkpoint, groups: list[Group], names: set[str], table, dmap: DeviceMap) -> None:
    where = checkpoint if not isinstance(checkpoint, Mapping) else "the state dict"
    missing, shapes, meta = [], [], []
    for group in groups:
        hit = next((n for n in group.names if n in names), None)
        if hit is None:
            if group.persistent and group.tensor.is_meta:
                missing.append(group.name)
            elif group.tensor.is_meta:
                meta.append(group.name)
            continue
        found = tuple(table[hit].shape)
        if found != tuple(group.tensor.shape):
            shapes.append(f"{hit}: checkpoint {found}, model {tuple(group.tensor.shape)}")
    if meta:
        raise CheckpointError(
            f"non-persistent buffer(s) {', '.join(meta[:_LISTED])} are on meta and no checkpoint "
            "holds them; build the model with init_empty(..., include_buffers=False)."
        )
    if missing or shapes:
        parts = []
        if missing:
            more = f", and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
            parts.append(f"missing ({len(missing)}): {', '.join(missing[:_LISTED])}{more}")
        if shapes:
            parts.append(f"shape mismatch ({len(shapes)}): {', '.join(shapes[:_LISTED])}")
        raise CheckpointError(
            f"{where} does not hold the weights this model needs; "
            + "; ".join(parts)
            + ". Load the checkpoint of this architecture (same names and shapes). "
            "Nothing was loaded."
        )


def _exec_device(entry_device: str, dmap: DeviceMap) -> str:
    return entry_device if entry_device.startswith("cuda:") else dmap.compute_device


def _hook_module(
    model: nn.Module, dmap: DeviceMap, slot: Slot, keep_whole
) -> tuple[str, nn.Module]:
    """The mapped entry ``slot`` falls under and the module to hook for it: below the entry,
    the no-split block on the slot's path, else the module that owns the slot, so a big entry
    is loaded a block at a time."""
    best = max(
        (k for k in dmap if k == "" or slot.name == k or slot.name.startswith(k + ".")), key=len
    )
    start = best if best != slot.name else slot.name.rpartition(".")[0]
    module = model.get_submodule(start) if start else model
    path = start
    rest = slot.name[len(start) + 1 :].split(".") if start else slot.name.split(".")
    while len(rest) > 1 and not keep_whole(path, module):
        path = f"{path}.{rest[0]}" if path else rest[0]
        module, rest = getattr(module, rest[0]), rest[1:]
    return best, module


def _install(model, groups, dmap: DeviceMap, store: _Store, record: Dispatched, no_split) -> None:
    keep_whole = no_split_predicate(model, no_split)
    units: dict[int, tuple[nn.Module, _Unit]] = {}
    for i, group in enumerate(groups):
        stored = store.stored[i]
        placeholder = None
        for slot in group.slots:
            entry, module = _hook_module(model, dmap, slot, keep_whole)
            device = _exec_device(dmap[entry], dmap)
            if not isinstance(stored, TensorLoc) and str(stored.device) == device:
                resident = stored
                if slot.is_param and not isinstance(resident, nn.Parameter):
                    resident = store.stored[i] = nn.Parameter(stored, requires_grad=False)
                    stored = resident
                _set(slot, resident)
                continue
            if placeholder is None:
                shape_of = stored if not isinstance(stored, TensorLoc) else torch.empty(
                    stored.shape, dtype=stored.dtype, device="meta")  # fmt: skip
                placeholder = store.cast(torch.empty_like(shape_of, device="meta"), i)
                if slot.is_param:
                    placeholder = nn.Parameter(placeholder, requires_grad=False)
            if id(module) not in units:
                units[id(module)] = (module, _Unit(torch.device(device), store))
            units[id(module)][1].slots.append((slot, i, placeholder))
            _set(slot, placeholder)
    for module, unit in units.values():
        record._handles.append(module.register_forward_pre_hook(unit.pre, with_kwargs=True))
        record._handles.append(
            module.register_forward_hook(unit.post, with_kwargs=True, always_call=True)
        )
    record.offloaded_units = len(units)
    # Modules mapped to another GPU than their inputs run there: move inputs at each entry.
    if len({d for d in dmap.devices if d != "disk"}) > 1:
        for entry, device in dmap.entries:
            target = _exec_device(device, dmap)
            try:
                module = model.get_submodule(entry) if entry else model
            except AttributeError:
                continue  # a tensor entry: its owner's unit moves the inputs
            if id(module) not in units:
                mover = _Unit(torch.device(target), store)
                record._handles.append(
                    module.register_forward_pre_hook(mover.pre, with_kwargs=True)
                )
