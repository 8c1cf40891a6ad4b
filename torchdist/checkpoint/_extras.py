"""The per-rank part of a checkpoint: step, RNG states, scheduler, loss scale, ``extra``, loader.

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
import random
from typing import Any

import torch

from torchdist.errors import CheckpointError
from torchdist.state import LossScale, TrainState
from torchdist.topology import Topology

__all__ = [
    "pack",
    "serialize",
    "extras_path",
    "read",
    "check",
    "restore",
    "restore_rng",
    "capture_rng",
]

EXTRAS_DIR = "extras"


def extras_path(root: str, rank: int) -> str:
    return os.path.join(root, EXTRAS_DIR, f"rank_{rank:05d}.pt")


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def capture_rng(topo: Topology) -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA of ``topo.device``, Python, NumPy), as data."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    version, internal, gauss = random.getstate()
    rng["python"] = {"version": version, "state": list(internal), "gauss_next": gauss}
    if topo.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(topo.device)
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return rng


def restore_rng(rng: dict[str, Any], topo: Topology) -> None:
    """Set this process's RNGs to ``rng`` (as ``capture_rng`` made it)."""
    torch.set_rng_state(rng["torch"])
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in rng and topo.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], topo.device)
    np = _numpy()
    if np is not None and "numpy" in rng:
        state = rng["numpy"]
        np.random.set_state(
            (
                state["kind"],
                state["keys"].numpy().astype(np.uint32),
                state["pos"],
                state["has_gauss"],
                state["cached_gaussian"],
            )
        )


def pack(state: TrainState, topo: Topology, loader: Any, *, optimizer: str) -> dict[str, Any]:
    """Everything of ``state`` that DCP does not hold, for this rank; ``optimizer`` says what
    DCP holds of the optimizer (``"none"``, ``"empty"``: not stepped yet, ``"state"``)."""
    scaler = None
    if state.scaler is not None:
        scaler = {
            k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
            for k, v in state.scaler.state_dict().items()
        }
    return {
        "step": int(state.step),
        "optimizer": optimizer,
        "rank": topo.rank,
        "world_size": topo.world_size,
        "rng": capture_rng(topo),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "scaler": scaler,
        "extra": dict(state.extra),
        "loader": loader.state_dict() if loader is not None else None,
    }


def serialize(extras: dict[str, Any]) -> bytes:
    """``torch.save`` bytes of ``extras``, checked to load back with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(extras, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything weights_only refuses
        raise CheckpointError(
            "part of the state cannot be checkpointed safely: loading it back would need "
            f"unpickling arbitrary objects ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Keep TrainState.extra and the scheduler's state to tensors, numbers, strings and "
            "lists/tuples/dicts of them (convert custom objects to such data first)."
        ) from None
    return data


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
    if (extras["scheduler"] is None) != (state.scheduler is None):
        has = "holds" if extras["scheduler"] is not None else "does not hold"
        given = "None" if state.scheduler is None else type(state.scheduler).__name__
        raise CheckpointError(
            f"the checkpoint {has} a scheduler state, but TrainState.scheduler is {given}. Pass "
            "a TrainState with the same kind of scheduler the run was saved with (or none)."
        )
    if (extras["scaler"] is None) != (state.scaler is None):
        has = "holds" if extras["scaler"] is not None else "does not hold"
        raise CheckpointError(
            f"the checkpoint {has} an fp16 loss scale, but TrainState.scaler is "
            f"{'None' if state.scaler is None else 'set'}. Pass a TrainState with a scaler "
            "exactly when the saved run had one (LossScale.initial(device) as a placeholder)."
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
    """``state`` with step, scaler and extra from ``extras``; RNG, scheduler, loader restored.

    Call ``check`` first: this assumes ``extras`` fits.
    """
    if state.scheduler is not None:
        state.scheduler.load_state_dict(extras["scheduler"])
    if loader is not None:
        loader.load_state_dict(extras["loader"])
    scaler = None
    if extras["scaler"] is not None:
        values = {
            k: v.to(topo.device) if isinstance(v, torch.Tensor) else v
            for k, v in extras["scaler"].items()
        }
        scaler = LossScale.from_state_dict(values)
    restore_rng(extras["rng"], topo)
    return state.replace(step=int(extras["step"]), scaler=scaler, extra=extras["extra"])
