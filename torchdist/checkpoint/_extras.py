"""The per-rank part of a checkpoint: step, RNG states, scheduler, transform states, ``extra``,
loader.

Each rank writes ``extras/rank_<rank:05d>.pt`` with ``torch.save`` and every value in it is
something ``torch.load(weights_only=True)`` accepts: tensors, numbers, strings, and lists,
tuples and dicts of them. RNG states are converted to that form (Python's ``random`` state is a
tuple of ints already; NumPy's is turned into a tensor and ints). ``pack`` checks the round trip
at save time, so a user ``extra`` that could not be loaded safely fails the save, not the resume.

Communicates nothing.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from torchdist import _rng
from torchdist.checkpoint import _transform_state
from torchdist.errors import CheckpointError
from torchdist.state import TrainState
from torchdist.topology import Topology

__all__ = [
    "pack",
    "serialize",
    "extras_path",
    "read",
    "check",
    "restore",
]

EXTRAS_DIR = "extras"


def extras_path(root: str, rank: int) -> str:
    return os.path.join(root, EXTRAS_DIR, f"rank_{rank:05d}.pt")


def pack(state: TrainState, topo: Topology, loader: Any, *, optimizer: str) -> dict[str, Any]:
    """Everything of ``state`` that DCP does not hold, for this rank; ``optimizer`` says what
    DCP holds of the optimizer (``"none"``, ``"empty"``: not stepped yet, ``"state"``)."""
    return {
        "step": int(state.step),
        "optimizer": optimizer,
        "rank": topo.rank,
        "world_size": topo.world_size,
        "rng": _rng.capture(topo),
        "scheduler": _scheduler_state(state.scheduler),
        "transforms": _transform_state.pack(state),
        "extra": dict(state.extra),
        "loader": loader.state_dict() if loader is not None else None,
    }


def serialize(extras: dict[str, Any]) -> bytes:
    """``torch.save`` bytes of ``extras``, checked to load back with ``weights_only=True``."""
    try:
        return _round_trip(extras)
    except Exception as exc:  # noqa: BLE001 - unpicklable, or anything weights_only refuses
        bad = "; ".join(_offending(extras)) or f"{type(exc).__name__}: {_line(exc)}"
        raise CheckpointError(
            f"part of the state cannot be checkpointed safely (saving it, or loading it back "
            f"without unpickling arbitrary objects, fails): {bad}. Keep TrainState.extra and "
            "the scheduler's state to tensors, numbers, strings and lists/tuples/dicts of them "
            "(convert custom objects to such data first)."
        ) from None


def read(root: str, topo: Topology) -> tuple[dict[str, Any], int]:
    """This rank's extras from checkpoint ``root``: its own file, or rank 0's if it has none.

    Returns the extras and the rank whose file was read.
    """
    source = topo.rank if os.path.exists(extras_path(root, topo.rank)) else 0
    path = extras_path(root, source)
    try:
        extras = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {root} has no per-rank state ({os.path.relpath(path, root)}); it is "
            "incomplete. Load an earlier checkpoint."
        ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged or unsafe file
        raise CheckpointError(
            f"the per-rank state {path} is corrupted or holds objects that cannot be loaded "
            f"safely ({type(exc).__name__}: {str(exc).splitlines()[0]}). Load an earlier "
            "checkpoint."
        ) from None
    return extras, source


def check(extras: dict[str, Any], state: TrainState, loader: Any) -> None:
    """Raise ``CheckpointError`` if ``extras`` cannot be restored into ``state``; change nothing."""
    if state.scheduler is not None:
        _scheduler_state(state.scheduler)  # refuses one without state_dict/load_state_dict
    if (extras["scheduler"] is None) != (state.scheduler is None):
        has = "holds" if extras["scheduler"] is not None else "does not hold"
        given = "None" if state.scheduler is None else type(state.scheduler).__name__
        raise CheckpointError(
            f"the checkpoint {has} a scheduler state, but TrainState.scheduler is {given}. Pass "
            "a TrainState with the same kind of scheduler the run was saved with (or none)."
        )
    if loader is None:
        return
    if extras["loader"] is None:
        raise CheckpointError(
            "a loader was passed to checkpoint.load, but the checkpoint holds no loader state "
            "(it was saved without loader=). Load without loader=, or set the loader's "
            "position yourself (loader.set_epoch)."
        )
    check_loader = getattr(loader, "check_state_dict", None)
    if callable(check_loader):
        check_loader(extras["loader"])


def restore(state: TrainState, extras: dict[str, Any], topo: Topology, loader: Any) -> TrainState:
    """``state`` with step, transform states and extra from ``extras``; RNG, scheduler, loader
    restored.

    Call ``check`` first: this assumes ``extras`` fits.
    """
    if state.scheduler is not None:
        state.scheduler.load_state_dict(extras["scheduler"])
    if loader is not None:
        loader.load_state_dict(extras["loader"])
    _rng.restore(extras["rng"], topo)
    saved = extras.get("transforms") or {"states": {}, "partial_grads": None}
    if extras.get("scaler") is not None:  # written before transform states were keyed by name
        saved["states"]["autocast"] = extras["scaler"]
    state = _transform_state.restore(
        state, saved, same_world=extras["world_size"] == topo.world_size, topo=topo
    )
    return state.replace(step=int(extras["step"]), extra=extras["extra"])


# --------------------------------------------------------------------------- checks
_SECTIONS = ("extra", "scheduler", "transforms", "loader")  # user-supplied parts, named on error


def _line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]


def _round_trip(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = buffer.getvalue()
    torch.load(io.BytesIO(data), weights_only=True)
    return data


def _offending(extras: dict[str, Any]) -> list[str]:
    """``"extra['key']: <type> (<why>)"`` for each deepest value that does not round-trip."""
    found: list[str] = []

    def walk(where: str, value: Any) -> None:
        try:
            _round_trip(value)
            return
        except Exception as exc:  # noqa: BLE001
            why = _line(exc)
        children = (
            list(value.items()) if isinstance(value, dict)
            else list(enumerate(value)) if isinstance(value, (list, tuple)) else []
        )  # fmt: skip
        before = len(found)
        for key, child in children:
            walk(f"{where}[{key!r}]", child)
        if len(found) == before:
            found.append(f"{where}: a {type(value).__name__} ({why})")

    for section in _SECTIONS:
        if section in extras:
            walk(section if section != "extra" else "TrainState.extra", extras[section])
    return found[:12]


def _scheduler_state(scheduler: Any) -> Any:
    if scheduler is None:
        return None
    if not callable(getattr(scheduler, "state_dict", None)) or not callable(
        getattr(scheduler, "load_state_dict", None)
    ):
        raise CheckpointError(
            f"TrainState.scheduler is a {type(scheduler).__name__} ({scheduler!r:.80}), which has "
            "no state_dict()/load_state_dict(), so its position cannot be saved or restored. "
            "Pass a torch.optim.lr_scheduler.LRScheduler, or give it both methods."
        )
    return scheduler.state_dict()
