"""DeepSpeed engines in torchdist checkpoints: the engine's own save/load replace DCP's.

Everything else — per-rank extras, the atomic rename, the marker, the checks made before
anything is read — stays torchdist's (``torchdist.checkpoint._dcp``). An engine checkpoint loads
only at the same world size and ZeRO stage: DeepSpeed's partitioned optimizer state does not
reshard. DeepSpeed reads its files as pickles (``weights_only=False``): load engine checkpoints
only from sources you trust.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torchdist.checkpoint import _layout
from torchdist.collectives import gather_object
from torchdist.errors import CheckpointError
from torchdist.marks import deepspeed_engine
from torchdist.state import TrainState
from torchdist.topology import Topology

__all__ = ["engine_save", "engine_check", "engine_load"]

ENGINE_TAG = "engine"


def _engine(model: Any) -> Any:
    engine = deepspeed_engine(model)
    if engine is None:
        raise CheckpointError(f"expected a DeepSpeed engine, got {type(model).__name__}.")
    return engine


def save_engine(engine: Any, directory: str) -> dict[str, Any]:
    """Write the engine's checkpoint under ``directory/engine``; return what the marker records.

    Used by ``torchdist.checkpoint.save``. Communicates: DeepSpeed's own barriers; every rank
    writes its ZeRO partition of the optimizer state (rank 0 also the module's weights).
    """
    engine = _engine(engine)
    engine.save_checkpoint(directory, tag=ENGINE_TAG, client_state={}, save_latest=False)
    return {"engine": "deepspeed", "zero_stage": int(engine.zero_optimization_stage())}


def check_engine_checkpoint(engine: Any, contents: Mapping[str, Any], world_size: int,
                            topo: Topology, ckpt: str) -> str:  # fmt: skip
    """Why an engine checkpoint cannot load into ``engine`` at ``topo`` ("" when it can)."""
    stage = int(_engine(engine).zero_optimization_stage())
    if contents.get("engine") != "deepspeed":
        return (
            f"checkpoint {ckpt} was saved from a plain/DCP TrainState, but the model is a "
            "DeepSpeed engine; load it into the model before torchdist.sharding.deepspeed wraps "
            "it (checkpoint.load on a plain TrainState), then build the engine."
        )
    if contents.get("zero_stage") != stage or world_size != topo.world_size:
        return (
            f"checkpoint {ckpt} holds a DeepSpeed ZeRO-{contents.get('zero_stage')} checkpoint "
            f"from {world_size} ranks, but this engine is ZeRO-{stage} on {topo.world_size}; "
            "DeepSpeed's partitioned optimizer state loads only at the same stage and world "
            "size. Use the same ones, or export the weights (consolidated + export_safetensors)."
        )
    return ""


def load_engine(engine: Any, directory: str, *, optimizer: bool) -> None:
    """Load ``directory/engine`` into the engine in place (module, and optimizer if asked).

    Used by ``torchdist.checkpoint.load``; the scheduler comes from torchdist's per-rank
    extras. DeepSpeed's files are pickles read with ``weights_only=False``: load engine
    checkpoints only from sources you trust.
    """
    engine = _engine(engine)
    path, _ = engine.load_checkpoint(
        directory,
        tag=ENGINE_TAG,
        load_optimizer_states=optimizer,
        load_lr_scheduler_states=False,
        load_module_only=not optimizer,
    )
    if path is None:
        from torchdist.errors import CheckpointError

        raise CheckpointError(
            f"DeepSpeed found no engine checkpoint in {directory}/{ENGINE_TAG}; the checkpoint "
            "is damaged. Load an earlier one."
        )


# A DeepSpeed engine owns its partitioned state: its own save/load replace DCP's, everything
# else (extras, atomic rename, marker, checks before loading) stays torchdist's.
def engine_save(state: TrainState, tmp: str, topo: Topology) -> dict[str, Any]:
    try:
        contents, error = save_engine(state.model, tmp), ""
    except Exception as exc:  # noqa: BLE001 - carried to every rank below
        contents, error = (
            {},
            f"DeepSpeed's save_checkpoint into {tmp} failed: {_layout.first_line(exc)}",
        )
    # Every rank's partition is on disk before rank 0 writes the marker.
    _layout.raise_first(gather_object([error], topo))
    return contents


def engine_check(state: TrainState, marker: _layout.Marker, topo: Topology) -> None:
    if deepspeed_engine(state.model) is None:
        raise CheckpointError(
            f"checkpoint {marker.path} holds a DeepSpeed engine's checkpoint, but the model is "
            "not an engine; build it with torchdist.sharding.deepspeed (same ZeRO stage and "
            "world size) and load into that TrainState."
        )
    error = check_engine_checkpoint(state.model, marker.contents, marker.world_size, topo,
                                    marker.path)  # fmt: skip
    if error:
        raise CheckpointError(error + " Nothing was loaded.")


def engine_load(state: TrainState, ckpt: str, *, optimizer: bool) -> None:
    try:
        load_engine(state.model, ckpt, optimizer=optimizer)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - DeepSpeed's own read errors
        raise CheckpointError(
            f"reading DeepSpeed's checkpoint in {ckpt} failed: {_layout.first_line(exc)}. Load an "
            "earlier checkpoint."
        ) from exc
