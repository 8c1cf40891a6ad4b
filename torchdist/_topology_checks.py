"""Validation of single ``Topology`` fields: device, backend, timeout (``TopologyError``)."""

from __future__ import annotations

import math

import torch

from torchdist.errors import TopologyError

_BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


def check_timeout(value: object, name: str = "timeout") -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TopologyError(f"{name}={value!r} is not a number of seconds.") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise TopologyError(f"{name}={value!r}: expected a positive, finite number of seconds.")
    return seconds


def check_device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TopologyError(f"device {device!r} is not a torch device: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TopologyError(
                f"device {device} asks for CUDA, but this machine has no usable CUDA device "
                f"(torch {torch.__version__}, cuda build: {torch.version.cuda}). "
                "Use device='cpu' (gloo), or run on a machine with a GPU."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise TopologyError(
                f"device {device} does not exist: this machine has {count} CUDA device(s). "
                "Launch at most one process per GPU per host."
            )
    return device


def check_backend(backend: str, device: torch.device) -> str:
    if not backend:
        return "nccl" if device.type == "cuda" else "gloo"
    if backend not in _BACKENDS:
        raise TopologyError(f"unknown backend {backend!r}; expected one of {list(_BACKENDS)}.")
    if backend == "nccl" and device.type != "cuda":
        raise TopologyError(
            f"backend 'nccl' needs CUDA devices, but the device is {device}. "
            "Use backend='gloo' on CPU (the default), or a device='cuda:N'."
        )
    return backend
