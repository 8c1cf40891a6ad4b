"""Forking after a world has ended: collect its garbage in this process, before the fork.

A world leaves process groups behind in reference cycles: an FSDP2 or DDP model built inside
``in_process`` or ``distributed`` holds its groups through hook closures. If the first garbage
collection that meets them runs in a forked child (a DataLoader worker, ``spawn``, a process forked
by hand), the gloo group's destructor runs there, where its threads do not exist, and the child
hangs or dies of SIGSEGV. Reproduced in torch 2.13: train a ``shard``ed model in ``in_process``,
then fork a child that calls ``gc.collect()``.

So when a world ends, ``distributed`` calls :func:`collect_before_next_fork`, which sets one
flag. An ``os.register_at_fork`` hook, registered when this module is imported, checks it before
every fork (nanoseconds), and when it is set clears it and runs one full ``gc.collect()`` in the
parent (about 0.1-0.3 s with torch imported): once per ended world, and only in a process that
forks afterwards. The flag is module state on purpose, like ``_compat``'s in-process world lock:
it records a fact about this process's heap, is not configuration, and changes no result.

:func:`collector_frozen` is the other half, for the forks torchdist starts itself (``spawn``'s
ranks, a loader's workers): garbage the parent still holds must not be finalised in the child.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Iterator

_world_ended = threading.Event()


def collect_before_next_fork() -> None:
    """Ask for one ``gc.collect()`` in this process before its next fork."""
    _world_ended.set()


@contextlib.contextmanager
def collector_frozen() -> Iterator[None]:
    """``gc.freeze()`` for the block (a fork inside it gives the child nothing to collect), then
    ``gc.unfreeze()``, unless the caller had frozen objects already: ``unfreeze`` would thaw those
    too (a server that froze its heap before forking its own workers, a test session that froze
    its imports), so they, and what this block froze, stay frozen."""
    _collect_if_a_world_ended()  # first: a frozen heap is one the fork hook cannot collect
    callers_own = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        yield
    finally:
        if not callers_own:
            gc.unfreeze()


def _collect_if_a_world_ended() -> None:
    if _world_ended.is_set():
        _world_ended.clear()
        gc.collect()


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(before=_collect_if_a_world_ended)
