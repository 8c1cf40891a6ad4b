"""`save` / `load`: a whole training state through torch.distributed.checkpoint (DCP).

In ``<root>/step_<step:08d>/``: DCP's files (model and optimizer, each rank its own shards,
loadable at another world size or mesh), ``extras/rank_<r>.pt`` (step, RNG, scheduler, step
transforms' state, ``extra``, loader position) and the completion marker. Written atomically
(a ``.tmp-`` directory renamed when every rank wrote), checked in full before anything is read
into the model, metadata unpickled safely. The whole design: ``docs/checkpoints.md``.

Example::

    state = td.TrainState(model=model, optimizer=opt, scheduler=sched)
    state = checkpoint.load(ckpt_dir, state, topo, loader=loader)   # newest complete step
    for batch in loader:
        state, metrics = step(state, batch)
        if state.step % 1000 == 0:
            checkpoint.save(ckpt_dir, state, topo, loader=loader, keep=3)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from torchdist.checkpoint import _engine, _extras, _layout, _safety
from torchdist.checkpoint._safe import SafeFileSystemReader, SafeLoadPlanner, read_metadata
from torchdist.collectives import broadcast, gather_object
from torchdist.errors import CheckpointError
from torchdist.marks import deepspeed_engine
from torchdist.state import TrainState
from torchdist.topology import Topology

__all__ = ["save", "load"]

_LISTED = 12  # names shown per kind of mismatch before "and N more"


def save(
    path: str | os.PathLike,
    state: TrainState,
    topo: Topology,
    *,
    loader: Any = None,
    keep: int | None = None,
    checksum: bool = True,
    timeout: float = 300.0,
) -> str:
    """Write ``state`` (and ``loader``'s position) to ``path/step_<state.step>``; return that path.

    Every rank must call it, with the same step and path; a rank that does not call it within
    ``timeout`` seconds fails the ranks that did. ``keep=k`` deletes all but the newest ``k``
    complete checkpoints under ``path`` afterwards (never the one just written).
    ``checksum`` records every file's SHA-256 (for ``load(verify=True)``). A failed save (a full
    disk) is removed and raises ``CheckpointError`` naming the path and the free space; the
    previous checkpoints stay loadable. See ``docs/checkpoints.md``.

    Communicates: one all-gather of ``[step, path hash]``, one ``all_gather_object`` (each
    rank's readiness, rank 0's token), DCP's own collectives, one ``all_gather_object`` of each
    rank's outcome and checksums, one ``broadcast`` of rank 0's outcome.
    """
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise CheckpointError(f"keep must be None or an int >= 1, got {keep!r}.")
    if not isinstance(state, TrainState):
        raise CheckpointError(f"save needs a TrainState, got {type(state).__name__}.")
    root = os.fspath(path)
    final = os.path.join(root, _layout.step_dirname(int(state.step)))
    _safety.agree(topo, int(state.step), root, timeout)
    optimizer = _optimizer_mode(state)
    token = secrets.token_hex(6) if topo.rank == 0 else ""
    try:
        extras = _extras.pack(state, topo, loader, optimizer=optimizer)
        extras, error = _extras.serialize(extras), ""
        if topo.rank == 0:
            _safety.prepare_root(root, token)
    except CheckpointError as exc:
        extras, error = b"", str(exc)
    replies = gather_object([(error, token)], topo)
    locked = topo.rank == 0 and not error
    try:
        _layout.raise_first([e for e, _ in replies])
        tmp = f"{final}.tmp-{replies[0][1]}"
        return _write(state, topo, loader, root, final, tmp, extras, optimizer, keep, checksum)
    finally:
        if locked:
            _safety.release_lock(root, token)


def _write(state, topo, loader, root, final, tmp, extras, optimizer, keep, checksum) -> str:
    """Every rank writes its part into ``tmp``; rank 0 finishes, or removes ``tmp`` if any rank
    failed (every rank then raises the same ``CheckpointError``)."""
    import torch.distributed.checkpoint as dcp

    error, digests = "", {}
    try:
        extras_file = _extras.extras_path(tmp, topo.rank)
        os.makedirs(os.path.dirname(extras_file), exist_ok=True)
        with open(extras_file, "wb") as f:
            f.write(extras)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # still enter DCP: the other ranks are in it
        error = _layout.first_line(exc)
    engine_contents: dict[str, Any] = {}
    try:
        if deepspeed_engine(state.model) is not None:
            engine_contents = _engine.engine_save(state, tmp, topo)
        else:
            # DCP returns on every rank only after every rank's writes are done (its final
            # all-reduce), and every rank wrote its extras before entering it.
            with _quiet_single_process(topo):
                dcp.save(
                    _state_dicts(state, optimizer=optimizer == "state"),
                    storage_writer=dcp.FileSystemWriter(tmp),
                    no_dist=not topo.is_live,
                )
        if checksum and not error:
            digests = _safety.hash_share(tmp, topo)
    except (Exception, dcp.CheckpointException) as exc:  # noqa: BLE001 - a BaseException in DCP
        error = error or _safety.describe_failure(exc)
    replies = gather_object([(error, digests)], topo)
    failed = [(rank, e) for rank, (e, _) in enumerate(replies) if e]
    outcome = {"error": ""}
    if topo.rank == 0 and failed:
        shutil.rmtree(tmp, ignore_errors=True)
        outcome["error"] = _safety.failed_save(final, root, failed)
    elif topo.rank == 0:
        contents = {
            **engine_contents,
            "optimizer": optimizer,
            "scheduler": state.scheduler is not None,
            "transforms": sorted(state.transforms),
            "loader": loader is not None,
            "torch": torch.__version__,
        }
        checksums = {k: v for _, d in replies for k, v in d.items()} if checksum else None
        try:
            _layout.finish(tmp, final, step=int(state.step), world_size=topo.world_size,
                           mesh=topo.axes, contents=contents, checksums=checksums)  # fmt: skip
            if keep is not None:
                _layout.prune(root, keep, protect=final)
        except OSError as exc:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            outcome["error"] = _safety.failed_save(final, root, [(0, _layout.first_line(exc))])
    outcome = broadcast(outcome, topo)
    _layout.raise_first([outcome["error"]])
    return final


def load(
    path: str | os.PathLike,
    state: TrainState,
    topo: Topology,
    *,
    loader: Any = None,
    verify: bool = False,
) -> TrainState:
    """Restore ``state`` (and ``loader``) from ``path``; return the new ``TrainState``.

    ``path`` is a checkpoint directory, or a directory of them: the newest complete one is
    loaded. The model and optimizer in ``state`` are filled in place (freshly built ones are
    fine, at any world size or mesh); step, transform states and ``extra`` come back in the returned
    state; the scheduler, the loader and this process's RNGs are restored. Every rank must call it.
    ``verify=True`` first checks every file against the SHA-256 the save recorded.

    Communicates: one ``broadcast`` (rank 0 picks the checkpoint), one ``all_gather_object``
    (every rank's checks agree before anything is read), then DCP's collectives.
    """
    if not isinstance(state, TrainState):
        raise CheckpointError(f"load needs a TrainState, got {type(state).__name__}.")
    import torch.distributed.checkpoint as dcp

    chosen = {"dir": "", "error": ""}
    if topo.rank == 0:
        try:
            chosen["dir"] = _layout.resolve(os.fspath(path))
        except CheckpointError as exc:
            chosen["error"] = str(exc)
    chosen = broadcast(chosen, topo)
    _layout.raise_first([chosen["error"]])
    ckpt = chosen["dir"]

    try:
        marker = _layout.read_marker(ckpt)
        _layout.check_files(marker)
        if verify and not marker.checksums:
            raise CheckpointError(
                f"load(verify=True): checkpoint {ckpt} has no checksums (saved with "
                "checksum=False, or by an older torchdist). Load without verify=True."
            )
        if verify:
            _safety.verify_share(ckpt, marker.checksums, topo)
        extras, _ = _extras.read(ckpt, topo)
        saved = extras["optimizer"]
        if state.optimizer is not None and saved == "none":
            raise CheckpointError(
                f"checkpoint {ckpt} holds no optimizer state (it was saved from a TrainState "
                "without an optimizer), but the TrainState being loaded has one. Load with "
                "optimizer=None to restore the model only, then build the optimizer. Nothing "
                "was loaded."
            )
        with_optimizer = state.optimizer is not None and saved == "state"
        engine = deepspeed_engine(state.model)
        if engine is not None or marker.contents.get("engine"):
            _engine.engine_check(state, marker, topo)
        else:
            state_dicts = _state_dicts(state, optimizer=with_optimizer)
            _check_against_metadata(ckpt, state_dicts, optimizer=with_optimizer,
                                    elsewhere=held_by_other_stages(state.model))  # fmt: skip
        _extras.check(extras, state, loader)
        error = ""
    except CheckpointError as exc:
        error = str(exc)
    _layout.raise_first(gather_object([error], topo))

    if engine is not None:
        _engine.engine_load(state, ckpt, optimizer=with_optimizer)
        return _extras.restore(state, extras, topo, loader)
    try:
        with _quiet_single_process(topo):
            dcp.load(
                state_dicts,
                storage_reader=SafeFileSystemReader(ckpt),
                planner=SafeLoadPlanner(),
                no_dist=not topo.is_live,
            )
    except (Exception, dcp.CheckpointException) as exc:  # noqa: BLE001 - a BaseException in DCP
        raise CheckpointError(
            f"reading checkpoint {ckpt} failed; a file is corrupted or unreadable: "
            f"{_layout.first_line(exc)}. Load an earlier checkpoint, or copy this one again from "
            "its source."
        ) from exc
    _set_state_dicts(state, state_dicts)
    if state.optimizer is not None and saved == "empty":
        state.optimizer.state.clear()  # saved before its first step: back to that
    return _extras.restore(state, extras, topo, loader)


# --------------------------------------------------------------------------- state dicts
def _optimizer_mode(state: TrainState) -> str:
    """``"none"`` (no optimizer), ``"empty"`` (not stepped yet) or ``"state"``."""
    if state.optimizer is None:
        return "none"
    if deepspeed_engine(state.model) is not None:
        return "state"  # the engine saves its optimizer's state, stepped or not
    return "state" if state.optimizer.state else "empty"


def held_by_other_stages(model: Any) -> tuple[str, ...]:
    """The modules of a pipelined model that other ranks' stages hold (none if not pipelined)."""
    from torchdist.sharding._pipeline import plan_of

    plan = plan_of(model)
    if plan is None:
        return ()
    others = [b for s, names in enumerate(plan.stage_blocks) if s not in plan.local_stages
              for b in names]  # fmt: skip
    return tuple(others) + (() if plan.holds_first else plan.first) + (
        () if plan.holds_last else plan.last
    )


def _state_dicts(state: TrainState, *, optimizer: bool) -> dict[str, Any]:
    """DCP's input. An optimizer that has not stepped is left out: ``get_state_dict`` would
    initialise its state with a zero-gradient step (Adam's step count would then start at 1)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not optimizer:
        return {"model": get_model_state_dict(state.model)}
    model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _set_state_dicts(state: TrainState, state_dicts: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if "optim" not in state_dicts:
        set_model_state_dict(state.model, state_dicts["model"])
    else:
        set_state_dict(
            state.model,
            state.optimizer,
            model_state_dict=state_dicts["model"],
            optim_state_dict=state_dicts["optim"],
        )


def _flatten(state_dicts: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """DCP's flattened key of every leaf, with its global shape (``None``: a non-tensor value).

    Follows DCP's traversal (``_traverse.traverse_state_dict``): mappings are walked, lists
    only when they hold tensors or mappings; keys are joined with dots.
    """
    out: dict[str, tuple[int, ...] | None] = {}

    def terminal(value: Any) -> bool:
        if isinstance(value, Mapping):
            return False
        if not isinstance(value, list):
            return True
        return not any(
            isinstance(v, torch.Tensor) or (isinstance(v, (Mapping, list)) and not terminal(v))
            for v in value
        )

    def walk(prefix: tuple, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(prefix + (str(k),), v)
        elif terminal(value):
            key = ".".join(map(str, prefix))
            out[key] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        else:
            for i, v in enumerate(value):
                walk(prefix + (i,), v)

    for key, value in state_dicts.items():
        walk((str(key),), value)
    return out


def _check_against_metadata(
    ckpt: str, state_dicts: dict[str, Any], *, optimizer: bool, elsewhere: tuple[str, ...] = ()
) -> None:
    """``elsewhere``: module names another pipeline stage holds; their keys are not unexpected."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = read_metadata(ckpt).state_dict_metadata
    expected = _flatten(state_dicts)
    stored_keys = [k for k in stored if (optimizer or k.startswith("model."))
                   and not _under(k, elsewhere)]  # fmt: skip
    # Listed in state-dict order (parameters before optimizer state before hyperparameters).
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored_keys if k not in expected]
    shapes = []
    for key in (k for k in expected if k in stored):
        want, have = expected[key], stored[key]
        have_shape = tuple(have.size) if isinstance(have, TensorStorageMetadata) else None
        if want != have_shape:
            describe = lambda s: "a non-tensor value" if s is None else str(tuple(s))  # noqa: E731
            shapes.append(f"{key}: checkpoint {describe(have_shape)}, expected {describe(want)}")
    if not (missing or unexpected or shapes):
        return
    parts = []
    for what, names in (
        ("missing from the checkpoint", missing),
        ("unexpected in the checkpoint", unexpected),
        ("shape mismatch", shapes),
    ):
        if names:
            shown = ", ".join(names[:_LISTED])
            more = f", and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
            parts.append(f"{what} ({len(names)}): {shown}{more}")
    raise CheckpointError(
        f"checkpoint {ckpt} does not fit the state being loaded; " + "; ".join(parts) + ". "
        "Keys are 'model.<parameter name>' and 'optim.<state|param_groups>...'. Load into the "
        "same architecture (same parameter names and shapes) and optimizer type the checkpoint "
        "was saved from, or convert the checkpoint first. Nothing was loaded."
    )


def _under(key: str, modules: tuple[str, ...]) -> bool:
    for head in ("model.", "optim.state.", "optim.param_groups."):
        if key.startswith(head):
            name = key[len(head) :]
            return any(name.startswith(f"{m}.") for m in modules)
    return False


@contextlib.contextmanager
def _quiet_single_process(topo: Topology) -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process; that is what we meant."""
    if topo.is_live:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
