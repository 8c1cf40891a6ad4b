"""Device maps as values: ``parse_size``, ``DeviceMap`` and ``infer_device_map`` (pure, no I/O).

A map sends module names (a whole subtree) or tensor names (the direct parameters of a module
that had to be split) to ``"cuda:N"``, ``"cpu"`` or ``"disk"``. ``infer_device_map`` fills the
devices greedily in order (accelerators by index, then CPU, then disk), keeps each no-split block
whole, counts a tied tensor once (it is stored on the device of its first module), and reserves
room on the compute device for the largest offloaded unit, which is loaded there while it runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn as nn

from torchdist.errors import ConfigError, DeviceMapError, TopologyError
from torchdist.inference._tensors import Group, group_bytes, tensor_groups

__all__ = [
    "DeviceMap", "infer_device_map", "parse_size", "NoSplit", "normalize_device",
    "no_split_predicate",
]  # fmt: skip

NoSplit = Union[None, Sequence[Union[str, type]], Callable[[str, nn.Module], bool]]
_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(size: int | float | str, *, device: str = "") -> int:
    """Bytes of a budget: an int, or a string like ``"20GiB"``, ``"512MB"``, ``"1.5 GiB"``."""
    if isinstance(size, bool):
        size = str(size)
    if isinstance(size, (int, float)) and size >= 0:
        return int(size)
    match = _SIZE.match(size) if isinstance(size, str) else None
    if match is None or match.group(2).lower() not in _UNITS:
        where = f" for {device!r}" if device else ""
        raise ConfigError(
            f"cannot read the memory budget {size!r}{where}: expected a non-negative number of "
            "bytes or a string like '20GiB' or '512MB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, "
            "TiB; KB = 1000 bytes, KiB = 1024)."
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def normalize_device(device: str | int | torch.device) -> str:
    """``"cuda:N"``, ``"cpu"`` or ``"disk"``; raises ``TopologyError`` for one that is not here."""
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"
    if device == "disk":
        return "disk"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise TopologyError(
            f"unknown device {device!r}; expected 'cpu', 'disk', 'cuda:N' or an int N (cuda:N)."
        )
    if dev.type == "cpu":
        return "cpu"
    index = dev.index or 0
    count = torch.cuda.device_count()
    if index >= count:
        raise TopologyError(
            f"device cuda:{index} does not exist: this machine has {count} CUDA device(s). "
            "Use one of " + (", ".join(f"cuda:{i}" for i in range(count)) or "'cpu'/'disk'") + "."
        )
    return f"cuda:{index}"


def _order(device: str) -> tuple[int, int]:
    if device.startswith("cuda:"):
        return (0, int(device[5:]))
    return (1, 0) if device == "cpu" else (2, 0)


@dataclass(frozen=True)
class DeviceMap(Mapping):
    """Module or tensor name -> device, immutable and printable; ``""`` is the whole model.

    ``bytes_per_device`` holds the weight bytes per device the map was planned with (empty for
    a map built by hand with ``DeviceMap.of``).
    """

    entries: tuple[tuple[str, str], ...]
    bytes_per_device: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, mapping: Mapping[str, str | int]) -> DeviceMap:
        """A map from a plain dict (e.g. ``{"": "cpu"}`` or Accelerate's ``hf_device_map``)."""
        if isinstance(mapping, DeviceMap):
            return mapping
        return cls(tuple((str(k), normalize_device(v)) for k, v in mapping.items()))

    def __getitem__(self, name: str) -> str:
        for key, device in self.entries:
            if key == name:
                return device
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def device_of(self, name: str) -> str | None:
        """The device of tensor or module ``name``: its longest mapped prefix's, or None."""
        best, found = -1, None
        for key, device in self.entries:
            if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best:
                best, found = len(key), device
        return found

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(sorted({d for _, d in self.entries}, key=_order))

    @property
    def compute_device(self) -> str:
        """Where offloaded (CPU or disk) units run: the first accelerator in the map, else CPU."""
        accelerators = [d for d in self.devices if d.startswith("cuda:")]
        return accelerators[0] if accelerators else "cpu"

    def __str__(self) -> str:
        width = max((len(k) for k, _ in self.entries), default=0)
        lines = [f"DeviceMap ({len(self.entries)} entries, compute on {self.compute_device})"]
        lines += [f"  {k or '<model>':<{max(width, 7)}}  {d}" for k, d in self.entries]
        lines += [f"  [{d}: {_human(b)}]" for d, b in self.bytes_per_device]
        return "\n".join(lines)


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""  # not reached


def _budgets(max_memory: Mapping[str | int, int | str] | None) -> list[tuple[str, int]]:
    if max_memory is None:
        found = [(f"cuda:{i}", int(torch.cuda.mem_get_info(i)[0] * 0.9))
                 for i in range(torch.cuda.device_count())]  # fmt: skip
        try:
            import psutil

            found.append(("cpu", int(psutil.virtual_memory().available * 0.9)))
        except ImportError:  # pragma: no cover - psutil is nearly always there
            import os

            found.append(("cpu", int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))))
        return found
    budgets = {}
    for device, size in max_memory.items():
        name = normalize_device(device)
        budgets[name] = parse_size(size, device=name)
    if not budgets:
        raise ConfigError("max_memory is empty; give at least one device, e.g. {'cpu': '8GiB'}.")
    return sorted(budgets.items(), key=lambda item: _order(item[0]))


def no_split_predicate(model: nn.Module, no_split: NoSplit) -> Callable[[str, nn.Module], bool]:
    if callable(no_split) and not isinstance(no_split, type):
        return no_split
    if no_split is None:
        names = set(getattr(model, "_no_split_modules", None) or ())
        if not names:
            from torchdist.blocks import repeated_blocks

            names = {type(m).__name__ for _, m in repeated_blocks(model)}
        no_split = sorted(names)
    names = {n for n in no_split if isinstance(n, str)}
    types = tuple(t for t in no_split if isinstance(t, type))
    return lambda _, m: type(m).__name__ in names or (bool(types) and isinstance(m, types))


def infer_device_map(
    model: nn.Module,
    *,
    max_memory: Mapping[str | int, int | str] | None = None,
    no_split: NoSplit = None,
    dtype: torch.dtype | None = None,
) -> DeviceMap:
    """Plan where each block of ``model`` (meta or real) lives under per-device budgets.

    Communicates nothing. ``max_memory`` maps ``"cuda:N"``/``N``, ``"cpu"`` and ``"disk"`` to
    sizes (default: 90% of what is free on each GPU and in RAM, no disk). ``no_split`` names
    module classes (or gives types, or a ``(name, module) -> bool`` predicate) never split across
    devices; the default is the model's ``_no_split_modules`` (Hugging Face) or its repeated
    blocks. ``dtype`` sizes floating tensors as they will be loaded.

    Example::

        dmap = infer_device_map(model, max_memory={"cpu": "2GiB", "disk": "100GiB"})
        print(dmap)                     # module -> device, and MiB per device
    """
    budgets = _budgets(max_memory)
    keep_whole = no_split_predicate(model, no_split)
    groups = tensor_groups(model)
    by_id = {id(g.tensor): g for g in groups}
    compute = next((d for d, _ in budgets if d.startswith("cuda:")), "cpu")
    reserve = 0
    for _ in range(4):  # the reservation can change what is offloaded; it settles in a step or two
        placed, largest = _plan(model, budgets, keep_whole, by_id, dtype, compute, reserve)
        if largest <= reserve:
            break
        reserve = largest
    room = dict(budgets).get(compute)
    if room is not None and largest > room:
        unit = max((p for p in placed if p[1] != compute), key=lambda p: p[2])[0]
        raise DeviceMapError(
            f"the offloaded unit {unit or '<model>'} needs {_human(largest)} on {compute} while it "
            f"runs, but {compute}'s budget is {_human(room)}. Raise the {compute} budget, or let "
            "it split into smaller units (no_split=[...] naming smaller classes)."
        )
    entries = tuple((name, device) for name, device, _ in placed)
    per_device: dict[str, int] = {}
    for _, device, size in placed:
        per_device[device] = per_device.get(device, 0) + size
    return DeviceMap(entries, tuple(sorted(per_device.items(), key=lambda i: _order(i[0]))))


def _unit_tensors(module: nn.Module, recurse: bool) -> list[torch.Tensor]:
    return [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]


def _plan(model, budgets, keep_whole, by_id: dict[int, Group], dtype, compute: str, reserve: int):
    """Greedy placement: ``[(name, device, bytes)]`` and the largest offloaded unit's bytes."""
    placed: list[tuple[str, str, int]] = []
    counted: set[int] = set()
    queue: list[tuple[str, nn.Module | None, list[torch.Tensor]]] = [
        ("", model, _unit_tensors(model, True))
    ]
    index, used, largest = 0, 0, 0
    while queue:
        name, module, tensors = queue.pop(0)
        fresh = {id(t) for t in tensors if id(t) in by_id} - counted
        size = sum(group_bytes(by_id[i], dtype) for i in fresh)
        device, budget = budgets[index]
        if device == compute and index + 1 < len(budgets):
            budget -= reserve
        children = list(module.named_children()) if module is not None else []
        splittable = bool(children) and not keep_whole(name, module)
        offloaded = device != compute and not device.startswith("cuda:")
        if used + size <= budget and not (offloaded and splittable):
            placed.append((name, device, size))
            counted |= fresh
            used += size
            if offloaded:
                largest = max(largest, size)
            continue
        if splittable:  # offloaded units are split to blocks: hooks load one block at a time
            prefix = f"{name}." if name else ""
            own = [
                (f"{prefix}{attr}", None, [t])
                for attr, t in [*module.named_parameters(recurse=False),
                                *module.named_buffers(recurse=False)]
            ]  # fmt: skip
            kids = [(f"{prefix}{n}", m, _unit_tensors(m, True)) for n, m in children]
            queue[:0] = own + kids
            continue
        index, used = index + 1, 0
        if index == len(budgets):
            total = sum(group_bytes(g, dtype) for g in by_id.values())
            raise DeviceMapError(
                f"the model does not fit: {name or '<model>'} needs {_human(size)} and "
                f"the whole model {_human(total)}, but the budgets are "
                + ", ".join(f"{d}={_human(b)}" for d, b in budgets)
                + (
                    f" ({_human(reserve)} of {compute} kept to run offloaded units)"
                    if reserve
                    else ""
                )
                + ". Raise a budget or add 'disk' to max_memory, e.g. {'disk': '100GiB'}."
            )
        queue.insert(0, (name, module, tensors))
    return placed, largest
