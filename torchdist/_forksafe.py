"""Forking after a world has ended: collect its garbage in this process, before the fork.

A world leaves process groups behind in reference cycles: an FSDP2 or DDP model built inside
``in_process`` or ``distributed`` holds its groups through hook closures. If the first garbage
collection that meets them runs in a forked child (a DataLoader worker, ``spawn``, a process forked
by hand), the gloo group's destructor runs there, where its threads do not exist, and the child
hangs or dies of SIGSEGV. Reproduced in torch 2.13: train a ``shard``ed model in ``in_process``,
then fork a child that calls ``gc.collect()``.

So when a world ends, ``distributed`` calls :func:`collect_before_next_fork`. It registers, once
per process, an ``os.register_at_fork`` hook that runs one full ``gc.collect()`` in the parent
before the next fork (about 0.1-0.3 s with torch imported), and only if a world has ended since
the last fork. This is process bookkeeping, not configuration: nothing here changes what any
torchdist function does, and a process that never forks after a world never pays for it.
"""

from __future__ import annotations

import gc
import os
import threading

_lock = threading.Lock()
_hook_registered = False
_collect_pending = False


def collect_before_next_fork() -> None:
    """Ask for one ``gc.collect()`` in this process before its next fork."""
    global _hook_registered, _collect_pending
    with _lock:
        _collect_pending = True
        if not _hook_registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(before=_collect_if_pending)
            _hook_registered = True


def _collect_if_pending() -> None:
    global _collect_pending
    if _collect_pending:
        _collect_pending = False
        gc.collect()
