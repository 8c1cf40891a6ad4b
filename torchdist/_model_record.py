"""The model-transform protocol: one phase per transform, one table of reasons, one record.

Every model transform (``autocast_fp8``, ``msamp_initialize``, ``pipeline``, ``parallelize``,
``checkpoint_activations``, ``compile``, ``shard``, ``replicate``, ``deepspeed``) calls
``check_order(model, name)`` before it touches the model and ``record(model, name, ...)`` after;
nothing else writes what was applied. See docs/model_transforms.md. Communicates nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torchdist.errors import CompositionError

__all__ = [
    "ModelPhase",
    "PHASES",
    "MODEL_ORDER",
    "REASONS",
    "AppliedTransform",
    "ModelRecord",
    "record_of",
    "record",
    "check_order",
]


class ModelPhase(enum.IntEnum):
    """Where a model transform sits in torchtitan's order; lower phases are applied first."""

    PRECISION = 0  # autocast_fp8, msamp: must see the plain nn.Linear layers
    PIPELINE = 1  # pipeline: keeps this rank's stage; the rest act on the stage (torchtitan)
    TENSOR_PARALLEL = 2  # parallelize: turns weights into DTensors on the tp mesh
    ACTIVATIONS = 3  # checkpoint_activations: wraps blocks for recomputation
    COMPILE = 4  # compile: traces the blocks as they now are
    DATA_PARALLEL = 5  # shard | replicate | deepspeed: owns gradient sync, outermost


PHASES: Mapping[str, ModelPhase] = types.MappingProxyType(
    {
        "autocast_fp8": ModelPhase.PRECISION,
        "msamp": ModelPhase.PRECISION,
        "pipeline": ModelPhase.PIPELINE,
        "parallelize": ModelPhase.TENSOR_PARALLEL,
        "checkpoint_activations": ModelPhase.ACTIVATIONS,
        "compile": ModelPhase.COMPILE,
        "shard": ModelPhase.DATA_PARALLEL,
        "replicate": ModelPhase.DATA_PARALLEL,
        "deepspeed": ModelPhase.DATA_PARALLEL,
    }
)

MODEL_ORDER = (
    "autocast_fp8 -> pipeline -> parallelize -> checkpoint_activations -> compile -> shard | "
    "replicate | deepspeed (msamp_initialize in autocast_fp8's place)"
)

_FP8_FIRST = "float8 conversion must see the plain nn.Linear layers"

# (later, earlier): why ``later`` cannot be applied to a model ``earlier`` was applied to. A pair
# missing here but out of phase order gets a reason built from the phases (``_phase_reason``).
REASONS: Mapping[tuple[str, str], str] = types.MappingProxyType(
    {
        # -- precision: first of all
        ("autocast_fp8", "autocast_fp8"): "its Linear layers are already float8; apply "
        "autocast_fp8 once.",
        ("autocast_fp8", "msamp"): "MS-AMP has already replaced its Linear layers with its own "
        "fp8 ones; use one fp8 system.",
        ("autocast_fp8", "shard"): "FSDP2 has already turned the weights into sharded DTensors; "
        "the float8 layers (and their fp8 all-gather) must exist before fully_shard sees them.",
        ("autocast_fp8", "replicate"): "DDP has already registered gradient hooks on the Linear "
        "weights that autocast_fp8 would replace.",
        ("autocast_fp8", "parallelize"): "tensor parallelism has already split the Linear "
        f"weights into DTensors; {_FP8_FIRST}.",
        ("autocast_fp8", "checkpoint_activations"): "the blocks are already wrapped for "
        "recomputation; convert first so the recompute runs the float8 layers.",
        ("autocast_fp8", "compile"): "the blocks are already compiled with their plain Linear "
        "layers; convert first so the compiled code runs the float8 ones.",
        ("autocast_fp8", "deepspeed"): "DeepSpeed owns this model's parameters and precision.",
        ("msamp", "msamp"): "msamp_initialize was already applied; MS-AMP supports one call per "
        "model.",
        ("msamp", "autocast_fp8"): "autocast_fp8 already made its Linear layers float8 (torchao); "
        "use one fp8 system: autocast_fp8 + low_bit_adamw, or msamp_initialize.",
        ("msamp", "shard"): "the model is sharded (FSDP2), and MS-AMP must replace the plain "
        "nn.Linear layers; MS-AMP has no FSDP2 support, so for shard use autocast_fp8 + "
        "low_bit_adamw instead.",
        ("msamp", "replicate"): "the model is already replicated (DDP); call msamp_initialize "
        "first and replicate after.",
        ("msamp", "parallelize"): "tensor parallelism already split its Linear weights into "
        "DTensors; MS-AMP must see the plain nn.Linear layers.",
        ("msamp", "checkpoint_activations"): "activation checkpointing already wrapped its "
        "blocks; call msamp_initialize first.",
        ("msamp", "compile"): "the blocks are already compiled; call msamp_initialize first.",
        ("msamp", "deepspeed"): "DeepSpeed already owns this model; enable MS-AMP in the "
        'DeepSpeed config ("msamp": {"enabled": true, "opt_level": ...}) instead.',
        # -- pipeline: splits the plain model; every later transform acts on this rank's stage
        ("pipeline", "pipeline"): "the model is already split into pipeline stages; give one "
        "pipeline() call all the stages.",
        ("pipeline", "deepspeed"): "a DeepSpeed engine owns this model's forward and backward; "
        "torchdist's pipeline runs torch.distributed.pipelining schedules instead.",
        ("deepspeed", "pipeline"): "a DeepSpeed engine owns forward and backward, but a "
        "pipelined model is run by a torch.distributed.pipelining schedule; use shard.",
        ("replicate", "pipeline"): "a pipeline schedule runs several micro-batches' forwards "
        "before their backwards, which DDP's reducer cannot follow; average the stages' "
        "gradients with sync_grads(topo), or shard them with shard(model, topo).",
        # -- tensor parallel
        ("parallelize", "parallelize"): "the model is already tensor-parallel; put every "
        "pattern in one plan.",
        ("parallelize", "checkpoint_activations"): "the blocks are already wrapped for "
        "recomputation; split the weights first so the recompute runs the parallel layers.",
        ("parallelize", "compile"): "the blocks were compiled with plain tensors; apply tensor "
        "parallelism first so the compiled code sees the DTensors.",
        ("parallelize", "shard"): "tensor parallelism must be applied before FSDP (tp inside, "
        "dp_shard outside).",
        ("parallelize", "replicate"): "tensor parallelism must be applied before replicate.",
        ("parallelize", "deepspeed"): "DeepSpeed does not compose with DTensor tensor parallelism.",
        # -- activations, compile
        ("checkpoint_activations", "checkpoint_activations"): "activations of this model are "
        "already checkpointed.",
        ("checkpoint_activations", "compile"): "the blocks are already compiled; checkpoint "
        "first so the compiled code holds the recomputation (torchtitan: AC, then compile).",
        ("compile", "compile"): "the model is already compiled; compile it once.",
        ("compile", "shard"): "FSDP2 already wraps the blocks with its all-gather hooks; compile "
        "each block before shard, as torchtitan does, so the hooks stay outside the graphs.",
        ("compile", "replicate"): "DDP already wraps the model; compile before replicate.",
        ("compile", "deepspeed"): "the model is a DeepSpeed engine's module; compile before "
        "deepspeed, or use DeepSpeed's own compile.",
        # -- data parallel: last, and one of them
        ("shard", "shard"): "the model is already sharded; apply shard once, to the whole model.",
        ("shard", "replicate"): "a replicated (DDP) model cannot also be sharded; choose one of "
        "them.",
        ("shard", "deepspeed"): "DeepSpeed already partitions this model; use its ZeRO stage "
        "instead.",
        ("shard", "msamp"): "MS-AMP replaced the Linear layers with its own fp8 ones and has no "
        "FSDP2 support; for shard use autocast_fp8 + low_bit_adamw.",
        ("replicate", "shard"): "a sharded model already syncs its gradients; apply shard or "
        "replicate, not both.",
        ("replicate", "replicate"): "the model is already replicated.",
        ("replicate", "deepspeed"): "DeepSpeed already syncs this model's gradients.",
        ("deepspeed", "shard"): "the model is already sharded with FSDP2; use DeepSpeed's ZeRO "
        "stage or shard, not both.",
        ("deepspeed", "replicate"): "the model is already replicated (DDP); DeepSpeed syncs "
        "gradients itself.",
        ("deepspeed", "parallelize"): "DeepSpeed does not compose with DTensor tensor parallelism.",
        ("deepspeed", "deepspeed"): "the model is already a DeepSpeed engine's module.",
        ("deepspeed", "msamp"): "MS-AMP's fp8 layers are not supported under this DeepSpeed "
        "transform.",
    }
)

# msamp_initialize is the public name of the transform recorded as "msamp".
_PUBLIC = {"msamp": "msamp_initialize"}


@dataclass(frozen=True)
class AppliedTransform:
    """One model transform as applied: its name, phase, options and the mesh it ran over."""

    name: str
    phase: ModelPhase
    options: Mapping[str, Any] = field(default_factory=dict)
    mesh: Any = None  # a DeviceMesh, or None for a transform that communicates nothing

    def __deepcopy__(self, memo: dict) -> AppliedTransform:
        # The mesh (process groups) is shared with the copy; the options are copied.
        return AppliedTransform(self.name, self.phase, copy.deepcopy(dict(self.options), memo),
                                self.mesh)  # fmt: skip


@dataclass(frozen=True)
class ModelRecord:
    """What torchdist's model transforms did to one model, oldest first, the hooks
    ``optimize`` runs after every applied optimizer step (e.g. fp8 scale precompute), and, for a
    model ``torchdist.inference.load_and_dispatch`` placed, its ``Dispatched`` record."""

    transforms: tuple[AppliedTransform, ...] = ()
    after_optimizer_step: tuple[Callable[[], Any], ...] = ()
    dispatch: Any = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.transforms)

    def find(self, name: str) -> AppliedTransform | None:
        """The last application of transform ``name``, or None."""
        return next((t for t in reversed(self.transforms) if t.name == name), None)


# The one attribute a model carries; set with object.__setattr__ so nn.Module does not see it.
_ATTR = "_torchdist_record"
_EMPTY = ModelRecord()


def record_of(model: Any) -> ModelRecord:
    """The record of ``model`` (an empty one for a model no torchdist transform touched)."""
    found = getattr(model, _ATTR, None)
    return found if isinstance(found, ModelRecord) else _EMPTY


def record(
    model: Any,
    name: str,
    *,
    options: Mapping[str, Any] | None = None,
    mesh: Any = None,
    after_optimizer_step: Callable[[], Any] | None = None,
) -> Any:
    """Append transform ``name`` to ``model``'s record (a new frozen value); return ``model``."""
    if name not in PHASES:
        raise CompositionError(
            f"unknown model transform {name!r}; the model transforms are {sorted(PHASES)}."
        )
    old = record_of(model)
    applied = AppliedTransform(name, PHASES[name], dict(options or {}), mesh)
    hooks = old.after_optimizer_step + ((after_optimizer_step,) if after_optimizer_step else ())
    object.__setattr__(model, _ATTR, dataclasses.replace(
        old, transforms=old.transforms + (applied,), after_optimizer_step=hooks))  # fmt: skip
    return model


def record_dispatch(model: Any, dispatched: Any) -> Any:
    """Keep ``load_and_dispatch``'s ``Dispatched`` record in ``model``'s one record."""
    object.__setattr__(model, _ATTR, dataclasses.replace(record_of(model), dispatch=dispatched))
    return model


def _phase_reason(later: str, earlier: str) -> str:
    return (
        f"{_PUBLIC.get(later, later)} belongs to phase {PHASES[later].name}, which comes before "
        f"{earlier}'s phase {PHASES[earlier].name}."
    )


def reason(later: str, earlier: str) -> str | None:
    """Why ``later`` cannot come after ``earlier``, or None when that order works."""
    if (later, earlier) in REASONS:
        return REASONS[later, earlier]
    if PHASES[earlier] > PHASES[later]:
        return _phase_reason(later, earlier)
    return None


def check_order(model: Any, name: str, *, extra: tuple[str, ...] = ()) -> None:
    """Raise ``CompositionError`` if ``name`` cannot be applied after what ``model`` records.

    ``extra``: transforms known to be applied by other means (e.g. ``("shard",)`` for a model
    ``fully_shard``-ed by hand), checked the same way.
    """
    for earlier in record_of(model).names + extra:
        why = reason(name, earlier)
        if why is not None:
            raise CompositionError(
                f"{_PUBLIC.get(name, name)} after {earlier}: {why} The order that works, first "
                f"to last: {MODEL_ORDER}."
            )
