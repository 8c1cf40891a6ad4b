"""Where checkpoints live on disk: names, the completion marker, atomic finishing, pruning.

A checkpoint is a directory ``<root>/step_<step:08d>``. It is written as
``<root>/step_<step:08d>.tmp-<token>`` and only renamed to its final name once every rank has
finished and rank 0 has written the marker ``torchdist_checkpoint.json`` into it. So:

* a directory with a marker is complete; a ``.tmp-`` directory is an interrupted save and is
  never loaded;
* the marker records the format version, the step, the world size and mesh axes of the saving
  job, the byte size of every file (a truncated file is found before anything is read) and,
  by default, the SHA-256 of every file (``load(verify=True)``);
* replacing an existing step renames it aside (``.old-``) first; a crash between the two renames
  leaves a marked ``.tmp-`` (the new save) or ``.old-`` directory: it counts as that step's
  checkpoint (``complete_checkpoints``), the next save renames it back (``recover``), and
  ``prune`` never deletes it while its step has no final directory.

These helpers run on one rank (rank 0 for everything that writes) and communicate nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from torchdist.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "MARKER",
    "Marker",
    "step_dirname",
    "complete_checkpoints",
    "resolve",
    "read_marker",
    "check_files",
    "finish",
    "prune",
    "recover",
]

#: Version of the on-disk layout this torchdist writes; it reads this version and older.
FORMAT_VERSION = 1
#: Name of the completion marker inside a checkpoint directory.
MARKER = "torchdist_checkpoint.json"
_FORMAT = "torchdist.checkpoint"
_STEP_RE = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class Marker:
    """What the marker of a complete checkpoint says."""

    path: str
    version: int
    step: int
    world_size: int
    mesh: dict[str, int]
    files: dict[str, int]
    contents: dict[str, Any]
    checksums: dict[str, str] = field(default_factory=dict)  # empty: saved with checksum=False


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _has_marker(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _candidates(root: str) -> dict[int, str]:
    """Each step's complete checkpoint: ``step_N``, else a marked ``step_N.tmp-*`` (a save whose
    final rename was interrupted), else a marked ``step_N.old-*`` (the one it was replacing)."""
    rank = {"": 0, ".tmp-": 1, ".old-": 2}
    best: dict[int, tuple[int, str]] = {}
    for name in os.listdir(root):
        stem, kind = name, ""
        for sep in (".tmp-", ".old-"):
            if sep in name:
                stem, kind = name.split(sep)[0], sep
        match = _STEP_RE.match(stem)
        path = os.path.join(root, name)
        if not (match and os.path.isdir(path) and _has_marker(path)):
            continue
        step = int(match.group(1))
        if step not in best or (rank[kind], name) < best[step]:
            best[step] = (rank[kind], name)
    return {step: os.path.join(root, name) for step, (_, name) in best.items()}


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the complete checkpoints under ``root``, oldest first (one per step;
    see ``_candidates`` for the leftovers of an interrupted rename)."""
    return sorted(_candidates(root).items())


def recover(root: str) -> list[str]:
    """Rename each step's interrupted-rename leftover to its final name (rank 0, under the
    save lock); return the recovered paths."""
    recovered = []
    for step, path in _candidates(root).items():
        final = os.path.join(root, step_dirname(step))
        if path != final:
            os.rename(path, final)
            recovered.append(final)
    if recovered:
        _fsync_dir(root)
    return recovered


def resolve(path: str) -> str:
    """The checkpoint ``path`` names: itself if it is one, else the newest complete one in it."""
    if not os.path.exists(path):
        raise CheckpointError(
            f"no checkpoint at {path}: the path does not exist. Pass the directory given to "
            "checkpoint.save (or one of its step_* directories)."
        )
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path} is a file, not a checkpoint directory. Pass the directory given to "
            "checkpoint.save (or one of its step_* directories)."
        )
    if _has_marker(path):
        return path
    complete = complete_checkpoints(path)
    if complete:
        return complete[-1][1]
    raise CheckpointError(_not_a_checkpoint(path))


def _not_a_checkpoint(path: str) -> str:
    entries = sorted(os.listdir(path))
    partial = [e for e in entries if ".tmp-" in e and _STEP_RE.match(e.split(".tmp-")[0])]
    shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
    if ".tmp-" in os.path.basename(os.path.normpath(path)):
        why = "it is an unfinished save (a .tmp- directory: the saving job stopped before the end)"
    elif ".metadata" in entries:
        why = (
            "it holds a raw torch.distributed.checkpoint (a .metadata file) but no "
            f"{MARKER}, so it was not written by torchdist.checkpoint.save; load it with "
            "torch.distributed.checkpoint.load"
        )
    elif partial:
        why = f"it holds only unfinished saves ({', '.join(partial)}), no complete checkpoint"
    else:
        why = f"it contains {shown or 'nothing'}"
    return (
        f"{path} is not a torchdist checkpoint: {why}. Expected a directory with {MARKER}, or "
        "one holding step_* directories written by checkpoint.save."
    )


def read_marker(path: str) -> Marker:
    """Parse and check the marker of checkpoint directory ``path``."""
    marker_path = os.path.join(path, MARKER)
    try:
        with open(marker_path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(_not_a_checkpoint(path)) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"the marker {marker_path} is unreadable ({exc}); the checkpoint is corrupted. Load "
            "an earlier checkpoint (pass its step_* directory)."
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise CheckpointError(
            f"{marker_path} is not a torchdist checkpoint marker (format "
            f"{raw.get('format') if isinstance(raw, dict) else type(raw).__name__!r}, expected "
            f"{_FORMAT!r}); the checkpoint is corrupted."
        )
    version = raw.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}, newer than this torchdist reads "
            f"(<= {FORMAT_VERSION}): it was written by a newer torchdist. Upgrade torchdist to "
            "load it."
        )
    try:
        return Marker(
            path=path,
            version=version,
            step=int(raw["step"]),
            world_size=int(raw["world_size"]),
            mesh=dict(raw["mesh"]),
            files={str(k): int(v) for k, v in raw["files"].items()},
            contents=dict(raw.get("contents", {})),
            checksums={
                str(k): str(v) for k, v in raw.get("checksums", {}).get("files", {}).items()
            },
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"the marker {marker_path} lacks or mangles a field ({exc!r}); the checkpoint is "
            "corrupted. Load an earlier checkpoint."
        ) from None


def check_files(marker: Marker) -> None:
    """Every file the marker lists exists with the size it recorded (truncation, deletion)."""
    problems = []
    for rel, size in sorted(marker.files.items()):
        full = os.path.join(marker.path, rel)
        try:
            actual = os.path.getsize(full)
        except OSError:
            problems.append(f"{rel}: missing (expected {size} bytes)")
            continue
        if actual != size:
            kind = "truncated" if actual < size else "grown"
            problems.append(f"{rel}: {actual} bytes, expected {size} ({kind})")
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise CheckpointError(
            f"checkpoint {marker.path} is damaged: {shown}. The files differ from what the save "
            "recorded (an interrupted copy, a full disk, a manual edit). Load an earlier "
            "checkpoint (pass its step_* directory) or copy this one again from its source."
        )


def _file_sizes(path: str) -> dict[str, int]:
    sizes = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            sizes[os.path.relpath(full, path)] = os.path.getsize(full)
    return dict(sorted(sizes.items()))


def finish(
    tmp: str,
    final: str,
    *,
    step: int,
    world_size: int,
    mesh: dict[str, int],
    contents: dict[str, Any],
    checksums: dict[str, str] | None = None,
) -> None:
    """Write the marker into ``tmp`` and rename it to ``final`` (rank 0, after every rank wrote).

    A checkpoint already at ``final`` (the same step saved again) is moved aside first and
    deleted after the rename, so a crash in between leaves the older steps loadable.
    """
    marker = {
        "format": _FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "mesh": mesh,
        "contents": contents,
        "files": _file_sizes(tmp),
    }
    if checksums is not None:
        marker["checksums"] = {"algorithm": "sha256", "files": dict(sorted(checksums.items()))}
    marker_path = os.path.join(tmp, MARKER)
    with open(marker_path, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.path.basename(tmp).rsplit('-', 1)[-1]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(os.path.dirname(final) or ".")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(root: str, keep: int, protect: str | None = None) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints, and leftovers of crashed saves.

    ``protect`` (the checkpoint just written) is never deleted, even when ``keep`` newer steps
    exist (a run resumed from an older step): those are kept too, nothing newer is deleted.
    A step's only complete copy is never deleted as a leftover (see ``recover``).
    """
    complete = complete_checkpoints(root)
    newest = {path for _, path in complete[-keep:]}
    doomed = [p for _, p in complete if p not in newest and p != protect]
    kept = {p for _, p in complete}
    for name in os.listdir(root):
        stem = name.split(".tmp-")[0].split(".old-")[0]
        path = os.path.join(root, name)
        if (".tmp-" in name or ".old-" in name) and _STEP_RE.match(stem) and path not in kept:
            doomed.append(path)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for errors carried across ranks."""
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:500]}"


def raise_first(errors: list[str]) -> None:
    """Raise ``CheckpointError`` for the first non-empty error (one per rank, or a single one)."""
    for rank, error in enumerate(errors):
        if error:
            raise CheckpointError(error if len(errors) == 1 else f"{error} (found on rank {rank})")
