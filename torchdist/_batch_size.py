"""`find_executable_batch_size`: retry with a smaller batch after out-of-memory, ranks agreeing.

Accelerate's decorator of the same name retries on each process alone, so ranks can settle on
different sizes (one rank had less free memory) and then train with mismatched batches. Here,
after every attempt the ranks all-reduce (max) their outcome, ok / out of memory / another
error, and move together: all accept the size, all retry smaller, or all raise. The function is
called with the size as its only argument, as in Accelerate, and its result is returned with
the size that worked.

What counts as out of memory: ``torch.OutOfMemoryError`` (CUDA, XPU, MPS) and the
``RuntimeError`` texts torch uses for the same (CPU allocator, cuDNN's "not supported" that a
too-large batch triggers, as in Accelerate). Between attempts the exception, with the frames
that hold the attempt's tensors, is dropped, then ``gc.collect()`` and, on CUDA,
``torch.cuda.empty_cache()``.

Limitation (docs/faults.md): the agreement runs after ``fn`` returns or raises. A rank that runs
out of memory *before* a collective inside ``fn`` that its peers already entered leaves them
waiting there until the world's timeout (``DistributedTimeoutError``), since a blocked
collective cannot be interrupted. Same-sized batches on same-sized devices fail at the same
point on every rank, which is the common case; keep ``fn`` to one trial step.

Example::

    def trial(batch_size):
        loader = td.shard_loader(ds, topo, batch_size=batch_size, seed=0)
        state, _ = step(state, next(iter(loader)))
        return loader

    batch_size, loader = td.find_executable_batch_size(trial, topo, start=256)
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from torchdist.errors import ConfigError, StepError
from torchdist.topology import Topology

__all__ = ["find_executable_batch_size", "is_out_of_memory"]

_OOM_TEXTS = (
    "out of memory",
    "can't allocate memory",  # DefaultCPUAllocator
    "cudnn_status_not_supported",  # cuDNN on a batch too large for its workspace
    "cuda_error_out_of_memory",
)
_OK, _OOM, _OTHER = 0, 1, 2


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors torch raises when an allocation fails."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXTS)


def find_executable_batch_size(
    fn: Callable[[int], Any],
    topo: Topology,
    *,
    start: int,
    factor: float = 0.5,
    min_size: int = 1,
) -> tuple[int, Any]:
    """Call ``fn(batch_size)`` from ``start`` down until it runs on every rank; return
    ``(batch_size, fn's result)``.

    After an out-of-memory error on any rank, every rank retries with ``int(size * factor)``
    (at least one less). Communicates: one ``all_reduce`` (max) of one int64 per attempt, over
    every rank of ``topo`` (nothing on a one-process topology that is not live).

    Raises ``StepError`` when ``min_size`` still runs out of memory, or, on the ranks whose
    ``fn`` succeeded, when another rank's ``fn`` raised something else (that rank re-raises
    its own error); ``ConfigError`` for a bad ``start``/``factor``/``min_size``.
    """
    from torchdist.collectives import all_reduce

    if not isinstance(start, int) or isinstance(start, bool) or start < 1:
        raise ConfigError(f"find_executable_batch_size: start={start!r}; expected an int >= 1.")
    if not 0.0 < factor < 1.0:
        raise ConfigError(f"find_executable_batch_size: factor={factor!r}; expected 0 < f < 1.")
    if not isinstance(min_size, int) or not 1 <= min_size <= start:
        raise ConfigError(
            f"find_executable_batch_size: min_size={min_size!r}; expected 1 <= min_size <= "
            f"start ({start})."
        )
    device = topo.device if topo.backend == "nccl" else torch.device("cpu")
    size, tried = start, []
    while True:
        result, failure, status = None, None, _OK
        try:
            result = fn(size)
        except Exception as exc:  # noqa: BLE001 - agreed on below, then re-raised or retried
            status = _OOM if is_out_of_memory(exc) else _OTHER
            failure = exc if status == _OTHER else None
            del exc  # its frames hold the attempt's tensors
        worst = int(all_reduce(torch.tensor([status], device=device), topo, op="max").item())
        if worst == _OK:
            return size, result
        tried.append(size)
        if worst == _OTHER:
            if failure is not None:
                raise failure
            raise StepError(
                f"find_executable_batch_size: at batch size {size}, fn raised an error other "
                "than out-of-memory on another rank (its log has it); every rank stops here."
            )
        result = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        smaller = min(int(size * factor), size - 1)
        if smaller < min_size:
            raise StepError(
                f"find_executable_batch_size: out of memory on some rank at every batch size "
                f"tried ({tried}), down to min_size {min_size}. Make one example cheaper "
                "(shorter sequences, activation checkpointing, shard the model) or lower "
                "min_size."
            )
        size = smaller
