"""What keeps a save from losing or mixing data: the save lock, the ranks' agreement on what they
save, checksums, and the free-space report of a failed save. See ``docs/checkpoints.md``.

* **Lock.** Rank 0 holds ``<root>/.torchdist_save.lock`` (JSON: pid, host, save token, time)
  from the start of a save to its end, created with ``O_EXCL``. Another save into the same root
  while it exists is refused, naming the holder. A lock whose process is gone (same host, pid
  not alive) or that is unreadable is stale and taken over.
* **Agreement.** Before anything is written, every rank all-gathers ``[step, hash of the root]``
  with a deadline, so ranks saving different steps or directories fail together, and a save
  called on some ranks only fails on those within ``timeout`` instead of hanging.
* **Checksums.** After DCP wrote, each rank hashes (SHA-256) a share of the files, and rank 0
  records them in the marker; ``load(verify=True)`` rehashes and names a file that differs.

Lock and free space run on rank 0; hashing on every rank; communicates only in ``agree``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import socket
import time
from typing import Any

import torch

from torchdist.checkpoint import _layout
from torchdist.errors import CheckpointError
from torchdist.topology import Topology

__all__ = ["LOCK", "acquire_lock", "release_lock", "agree", "hash_share", "verify_share",
           "free_space", "prepare_root", "failed_save"]  # fmt: skip

LOCK = ".torchdist_save.lock"
CHECKSUM = "sha256"
# Marks the agreement's first int64 (the step sits in the low 48 bits). Without
# TORCH_DISTRIBUTED_DEBUG=DETAIL, gloo pairs a rank's agreement with whatever 16-byte collective
# a peer that skipped save runs next (a torchdist collective's fingerprint check): the tag tells
# "that rank is elsewhere" from "that rank saves another step".
_TAG = 0x7D15 << 48
_STEP_BITS = (1 << 48) - 1


# --------------------------------------------------------------------------- lock
def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # never os.kill(0 or -1, ...): those address process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def acquire_lock(root: str, token: str) -> None:
    """Create ``root``'s save lock for the save ``token`` (rank 0), or raise ``CheckpointError``
    naming the job that holds it."""
    path = os.path.join(root, LOCK)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "token": token,
            "since": time.time()}  # fmt: skip
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fd = None
        if fd is None:
            holder = _read_lock(path)
            if holder is None or (holder.get("host") == mine["host"]
                                  and not _alive(holder.get("pid"))):  # fmt: skip
                with _ignore_missing():
                    os.unlink(path)  # stale: its save died (SIGKILL, node crash)
                continue
            since = datetime.datetime.fromtimestamp(float(holder.get("since", 0)))
            raise CheckpointError(
                f"another save is writing into {root}: {path} is held by pid {holder.get('pid')} "
                f"on host {holder.get('host')} since {since:%Y-%m-%d %H:%M:%S}. Two jobs saving "
                "into one directory would overwrite and prune each other's checkpoints. Give "
                "each job its own directory; if that job is gone (a crash on another host), "
                f"delete {path}."
            )
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(mine, f)
        return
    raise CheckpointError(f"could not take the save lock {path}; another save keeps taking it.")


def release_lock(root: str, token: str) -> None:
    """Remove ``root``'s save lock if this save (``token``) holds it."""
    path = os.path.join(root, LOCK)
    holder = _read_lock(path)
    if holder is not None and holder.get("token") == token:
        with _ignore_missing():
            os.unlink(path)


def _read_lock(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) and "pid" in holder else None
    except (OSError, ValueError):  # released meanwhile, or half-written by a dead save
        return None


class _ignore_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:  # noqa: ANN001
        return kind is not None and issubclass(kind, FileNotFoundError)


# --------------------------------------------------------------------------- agreement
def agree(topo: Topology, step: int, root: str, timeout: float) -> None:
    """Raise ``CheckpointError`` on every rank unless all ranks save ``step`` into ``root``; on
    the ranks that called it when some rank does not call ``save`` within ``timeout`` seconds.

    Communicates: one all-gather of two int64 (asynchronous, waited on with the deadline).
    """
    if not topo.is_live or topo.world_size == 1:
        return
    import torch.distributed as dist

    where = int.from_bytes(
        hashlib.blake2b(os.path.abspath(root).encode(), digest_size=7).digest(), "little"
    )
    device = topo.device if dist.get_backend() == "nccl" else "cpu"
    mine = torch.tensor([_TAG | (step & _STEP_BITS), where], dtype=torch.int64, device=device)
    out = mine.new_empty(topo.world_size * 2)
    work = dist.all_gather_single(out, mine, async_op=True)
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint.save(step {step}) on rank {topo.rank}: not every one of the "
            f"{topo.world_size} ranks called save within {timeout:g} s "
            f"({str(exc).splitlines()[0]}). "
            "Every rank must call checkpoint.save (each writes its own shards), not only rank 0: "
            "drop an `if rank == 0:` around it."
        ) from None
    rows = out.view(topo.world_size, 2).tolist()
    elsewhere = [rank for rank, row in enumerate(rows) if row[0] & ~_STEP_BITS != _TAG]
    if elsewhere:
        raise CheckpointError(
            f"checkpoint.save(step {step}) on rank {topo.rank}: rank(s) {elsewhere} of "
            f"{topo.world_size} did not call save; they were in another collective. Every rank "
            "must call checkpoint.save (each writes its own shards), not only rank 0: drop an "
            "`if rank == 0:` around it. Nothing was written."
        )
    steps, roots = [r[0] & _STEP_BITS for r in rows], [r[1] for r in rows]
    if len(set(steps)) > 1:
        raise CheckpointError(
            f"ranks disagree on the step being saved (by rank: {steps}); a checkpoint holds one "
            "step of one run. Save from a TrainState every rank advanced the same way "
            "(state.step), e.g. after the same number of step() calls. Nothing was written."
        )
    if len(set(roots)) > 1:
        groups: dict[int, list[int]] = {}
        for rank, value in enumerate(roots):
            groups.setdefault(value, []).append(rank)
        raise CheckpointError(
            f"ranks save into different directories (ranks grouped by directory: "
            f"{sorted(groups.values())}; this rank: {os.path.abspath(root)}). Pass every rank "
            "the same path (on a shared filesystem). Nothing was written."
        )


# --------------------------------------------------------------------------- checksums
def _listing(directory: str) -> list[str]:
    names = []
    for dirpath, _, files in os.walk(directory):
        names += [os.path.relpath(os.path.join(dirpath, n), directory) for n in files]
    return sorted(names)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, CHECKSUM).hexdigest()


def hash_share(directory: str, topo: Topology) -> dict[str, str]:
    """SHA-256 of this rank's share (every ``world_size``-th) of the files under ``directory``."""
    names = _listing(directory)
    return {n: _digest(os.path.join(directory, n)) for n in names[topo.rank :: topo.world_size]}


def verify_share(directory: str, checksums: dict[str, str], topo: Topology) -> None:
    """Rehash this rank's share of the files ``checksums`` lists; raise naming one that differs."""
    names = sorted(checksums)[topo.rank :: topo.world_size]
    for name in names:
        found = _digest(os.path.join(directory, name))
        if found != checksums[name]:
            raise CheckpointError(
                f"checkpoint {directory} is corrupted: {name} has {CHECKSUM} {found[:16]}..., "
                f"but the save recorded {checksums[name][:16]}... (a flipped bit on disk or in a "
                "copy). Load an earlier checkpoint (pass its step_* directory) or copy this one "
                "again from its source. Nothing was loaded."
            )


# --------------------------------------------------------------------------- disk
def prepare_root(root: str, token: str) -> None:
    """Rank 0, before any rank writes: ``root`` is a directory, locked, interrupted renames of
    an earlier save recovered."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise CheckpointError(
            f"cannot save into {root}: it is a file, not a directory. Pass a directory path "
            "(checkpoint.save creates it), or move the file away."
        )
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create the checkpoint directory {root}: {exc}; {free_space(root)}."
        ) from None
    acquire_lock(root, token)
    try:
        _layout.recover(root)
    except OSError as exc:
        release_lock(root, token)
        raise CheckpointError(f"cannot recover an interrupted save in {root}: {exc}.") from None


def failed_save(final: str, root: str, failed: list[tuple[int, str]]) -> str:
    complete = _layout.complete_checkpoints(root) if os.path.isdir(root) else []
    previous = f"the newest complete one, {complete[-1][1]}, is intact" if complete else (
        "there is no earlier complete checkpoint")  # fmt: skip
    ranks = ", ".join(str(r) for r, _ in failed)
    return (
        f"saving checkpoint {final} failed on rank(s) {ranks}: {failed[0][1]}; "
        f"{free_space(root)}. The partial save was removed and {previous}. Free disk "
        "space (or save with a smaller keep=) and save again."
    )


def describe_failure(exc: BaseException) -> str:
    """The first line of ``exc``; for DCP's ``CheckpointException``, of each rank's cause."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        causes = []
        for rank, pair in sorted(failures.items()):
            cause = pair[0] if isinstance(pair, tuple) else pair
            causes.append(f"{_layout.first_line(cause)} (DCP, rank {rank})")
        return "; ".join(causes[:4])
    return _layout.first_line(exc)


def free_space(path: str) -> str:
    """``"<n> MiB free on <mount>"`` for the filesystem holding ``path`` (or its nearest parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.1f} MiB ({free} bytes) free on the filesystem of {probe}"
