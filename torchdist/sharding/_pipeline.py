"""`pipeline(model, topo)`: split a model into pipeline stages by its blocks; keep this rank's.

The model's repeated blocks (``torchdist.blocks``: the entries of a ``ModuleList`` of same-class
layers, or the ones ``blocks=`` names) are cut into ``pp x stages_per_rank`` contiguous stages,
evenly or where ``split_points`` says. This rank keeps the blocks of its stages, in a
``PipelineBlocks`` that holds them under their original indices, so every parameter keeps its
name and a pipelined model's checkpoint is the whole model's (``checkpoint.save``/``load``
move between pipelined and plain models). The modules before the blocks (embeddings: ``first``)
stay only on the rank of stage 0, those after them (final norm, head: ``last``) only on the rank
of the last stage; elsewhere they are set to ``None``, torchtitan's convention. So the model's
``forward`` must skip a module that is ``None`` and iterate over the blocks it holds::

    def forward(self, x):
        if self.tok is not None:
            x = self.tok(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x) if self.head is not None else x

Stages go to ranks as the schedule needs: round robin (``stage % pp``) for the looped ones
(GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble), a "V" (rank ``r`` holds ``r``
and ``2 pp - 1 - r``) for ZBVZeroBubble and DualPipeV. The schedule itself runs in the step
(``torchdist.transforms.pipeline_value_and_grad``), after the later model transforms
(``parallelize``, ``checkpoint_activations``, ``compile``, ``shard``), which then act on this
rank's stage only: ``pipeline`` comes right after fp8 in the model order (torchtitan's).

Known limits: ``shard`` (FSDP2) with the zero-bubble schedules (InterleavedZeroBubble,
ZBVZeroBubble, DualPipeV) is refused when the step binds: their split backward cannot find
FSDP2's unsharded weights in torch 2.13. The other schedules compose with it; a rank holding
several stages runs each through a view of the sharded model whose root hooks it shares.
``replicate`` (DDP) after ``pipeline`` is refused (a schedule runs several forwards before
their backwards); use ``sync_grads(topo)``.

Communicates nothing (the pp mesh is recorded for the step's point-to-point sends).

Example::

    model = pipeline(GPT(), topo, schedule="1F1B")      # topo.pp == 2: half the blocks each
    model = shard(model, topo)                          # FSDP2 of this stage over dp_shard
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from torchdist._model_record import check_order
from torchdist.blocks import BlockSpec, PipelineBlocks, find_blocks
from torchdist.errors import ConfigError, ShardingError, TopologyError
from torchdist.marks import mark
from torchdist.topology import Topology

__all__ = ["pipeline", "PipelinePlan", "SCHEDULES", "schedule_class", "plan_of"]

#: schedules of torch.distributed.pipelining, by the name torch's get_schedule_class knows:
#: (one stage per rank?, stage placement)
SCHEDULES: dict[str, tuple[bool, str]] = {
    "GPipe": (True, "loop"),
    "1F1B": (True, "loop"),
    "Interleaved1F1B": (False, "loop"),
    "LoopedBFS": (False, "loop"),
    "InterleavedZeroBubble": (False, "loop"),
    "ZBVZeroBubble": (False, "v"),
    "DualPipeV": (False, "v"),
}


def schedule_class(name: str) -> tuple[str, type]:
    """The canonical name and torch class of schedule ``name`` (case-insensitive), or a
    ``ConfigError`` listing the ones torch knows. Imports torch's pipelining (lazily)."""
    canonical = {k.lower(): k for k in SCHEDULES}.get(str(name).lower())
    if canonical is None:
        raise ConfigError(
            f"pipeline: unknown schedule {name!r}; torch.distributed.pipelining knows "
            f"{list(SCHEDULES)} (case-insensitive)."
        )
    from torch.distributed.pipelining.schedules import get_schedule_class

    return canonical, get_schedule_class(canonical)


@dataclass(frozen=True)
class PipelinePlan:
    """How one model was split: the schedule, every stage's blocks, this rank's stages, and the
    modules that only the first or the last stage keeps. Stored in the model's record."""

    schedule: str
    pp: int
    pp_rank: int
    stage_blocks: tuple[tuple[str, ...], ...]  # per stage, the block names (full paths)
    local_stages: tuple[int, ...]  # this rank's stages, in order
    container: str  # path of the blocks' ModuleList ("blocks", "transformer.h")
    first: tuple[str, ...]
    last: tuple[str, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stage_blocks)

    @property
    def holds_first(self) -> bool:
        return 0 in self.local_stages

    @property
    def holds_last(self) -> bool:
        return self.num_stages - 1 in self.local_stages


def plan_of(model: Any) -> PipelinePlan | None:
    """The ``PipelinePlan`` of a model ``pipeline`` split, or None."""
    from torchdist._model_record import record_of

    found = record_of(model).find("pipeline")
    return None if found is None else found.options["plan"]


def pipeline(
    model: nn.Module,
    topo: Topology,
    *,
    schedule: str = "1F1B",
    stages_per_rank: int | None = None,
    split_points: Sequence[str] | None = None,
    blocks: BlockSpec = None,
    first: Sequence[str] | None = None,
    last: Sequence[str] | None = None,
) -> nn.Module:
    """Keep only this rank's pipeline stage(s) of ``model`` (in place); return it.

    ``schedule``: a torch schedule name (``SCHEDULES``); it decides how many stages a rank
    holds (``stages_per_rank``: 1 for GPipe/1F1B, default 2 for the others) and where they
    go. ``split_points``: names of the blocks that begin a stage (all but stage 0's), e.g.
    ``["blocks.3"]``; default: as even as possible. ``first``/``last``: names of the modules
    only the first/last stage runs; default: the siblings of the block list (and of its
    parents) registered before / after it. Errors: an unknown schedule (``ConfigError``),
    fewer blocks than stages or a bad split point (``ShardingError``), a topology that is not
    live (``TopologyError``).

    Communicates nothing; the step's schedule sends activations and gradients point to point
    over ``topo.mesh["pp"]``.

    Example::

        model = pipeline(model, topo, schedule="Interleaved1F1B")   # 2 stages per rank
        step = compose(optimize(opt), clip_grads(1.0))(
            pipeline_value_and_grad(lambda out, y: F.cross_entropy(out.flatten(0, 1),
                                                                    y.flatten()),
                                    microbatches=4))
    """
    canonical, _ = schedule_class(schedule)
    single, style = SCHEDULES[canonical]
    if stages_per_rank is None:
        stages_per_rank = 1 if single else 2
    if not isinstance(stages_per_rank, int) or stages_per_rank < 1:
        raise ConfigError(
            f"pipeline: stages_per_rank must be an int >= 1, got {stages_per_rank!r}."
        )
    if single and stages_per_rank != 1:
        raise ConfigError(
            f"pipeline: schedule {canonical!r} runs one stage per rank, got stages_per_rank="
            f"{stages_per_rank}; use Interleaved1F1B (or another multi-stage schedule)."
        )
    if style == "v" and stages_per_rank != 2:
        raise ConfigError(
            f"pipeline: schedule {canonical!r} places exactly 2 stages on each rank (a V), got "
            f"stages_per_rank={stages_per_rank}."
        )
    check_order(model, "pipeline")
    found = find_blocks(model, blocks, transform="pipeline", required=True)
    names = [n for n, _ in found]
    container = _container_of(model, names)
    pp, pp_rank = topo.pp, topo.index("pp")
    num_stages = pp * stages_per_rank
    if len(names) < num_stages:
        raise ShardingError(
            f"pipeline: {type(model).__name__} has {len(names)} block(s) ({', '.join(names)}) "
            f"but the pipeline needs at least one per stage: {num_stages} stages (pp={pp} x "
            f"{stages_per_rank} per rank). Use a model with more blocks, a smaller pp, or a "
            "one-stage-per-rank schedule (GPipe, 1F1B)."
        )
    stage_blocks = _split(names, num_stages, split_points)
    local = _local_stages(pp, pp_rank, stages_per_rank, style)
    first_names, last_names = _ends(model, container, first, last)
    if not topo.is_live:
        raise TopologyError(
            "pipeline needs the live topology (`with td.distributed(topo) as topo:`): its "
            "schedule sends activations over the pp mesh."
        )
    plan = PipelinePlan(canonical, pp, pp_rank, stage_blocks, local, container,
                        first_names, last_names)  # fmt: skip
    _prune(model, plan)
    options = {"plan": plan, "schedule": canonical, "stages": local, "num_stages": num_stages}
    return mark(model, "pipeline", options=options, mesh=topo.mesh["pp"])


# --------------------------------------------------------------------------- planning
def _container_of(model: nn.Module, names: list[str]) -> str:
    parents = {n.rpartition(".")[0] for n in names}
    path = parents.pop() if len(parents) == 1 else None
    if path is None or not isinstance(model.get_submodule(path), nn.ModuleList):
        raise ShardingError(
            f"pipeline: the blocks must be the entries of one ModuleList, in forward order; "
            f"got {names} (parents {sorted(parents | ({path} if path else set()))}). Pass "
            "blocks= the layers of that list."
        )
    listed = list(model.get_submodule(path)._modules)
    if [n.rpartition(".")[2] for n in names] != listed:
        raise ShardingError(
            f"pipeline: blocks= selected {names}, but the stages need every entry of "
            f"{path!r} ({listed}); select them all."
        )
    return path


def _split(names: list[str], n: int, points: Sequence[str] | None) -> tuple[tuple[str, ...], ...]:
    if points is None:
        size, extra = divmod(len(names), n)
        starts = [i * size + min(i, extra) for i in range(n)]
    else:
        points = list(points)
        unknown = [p for p in points if p not in names]
        if unknown or len(points) != n - 1:
            raise ShardingError(
                f"pipeline: split_points must name the {n - 1} block(s) that begin stages 1.."
                f"{n - 1}, from {names}; got {points}"
                + (f" ({unknown} are not blocks)." if unknown else ".")
            )
        starts = [0] + [names.index(p) for p in points]
        if starts != sorted(set(starts)) or starts[1] == 0:
            raise ShardingError(
                f"pipeline: split_points {points} are not in forward order or leave a stage "
                "empty; list distinct blocks, first to last, none of them the first block."
            )
    ends = starts[1:] + [len(names)]
    return tuple(tuple(names[a:b]) for a, b in zip(starts, ends, strict=True))


def _local_stages(pp: int, rank: int, per_rank: int, style: str) -> tuple[int, ...]:
    if style == "v":
        return (rank, 2 * pp - 1 - rank)
    return tuple(rank + pp * i for i in range(per_rank))


def _ends(model, container: str, first, last) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Default: at each level from the root to the block list, the siblings before / after."""
    parts = container.split(".")
    auto_first: list[str] = []
    auto_last: list[str] = []
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        parent = model.get_submodule(prefix)
        if any(True for _ in parent.named_parameters(recurse=False)):
            raise ShardingError(
                f"pipeline: {prefix or type(model).__name__} holds parameters of its own "
                f"({[n for n, _ in parent.named_parameters(recurse=False)]}), which no stage "
                "owns; put them in a submodule (a first or last module)."
            )
        children = [n for n, m in parent.named_children() if m is not None]
        position = children.index(part)
        full = [f"{prefix}.{c}" if prefix else c for c in children]
        auto_first += full[:position]
        auto_last = full[position + 1 :] + auto_last
    chosen = []
    for given, auto, what in ((first, auto_first, "first"), (last, auto_last, "last")):
        names = tuple(auto if given is None else given)
        allowed = set(auto_first) | set(auto_last)
        bad = [n for n in names if n not in allowed]
        if bad:
            raise ShardingError(
                f"pipeline: {what}={list(names)} names {bad}, which are not siblings of the "
                f"block list {container!r} or of its parents; choose from {sorted(allowed)}."
            )
        chosen.append(names)
    return chosen[0], chosen[1]


# --------------------------------------------------------------------------- pruning
def _prune(model: nn.Module, plan: PipelinePlan) -> None:
    keep = {name for s in plan.local_stages for name in plan.stage_blocks[s]}
    _set_blocks(model, plan.container, keep)
    dropped = (() if plan.holds_first else plan.first) + (() if plan.holds_last else plan.last)
    for name in dropped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, None)


def _set_blocks(root: nn.Module, container: str, keep: set[str]) -> None:
    parent_path, _, attr = container.rpartition(".")
    parent = root.get_submodule(parent_path)
    old = parent._modules[attr]
    prefix = f"{container}."
    kept = {k: m for k, m in old._modules.items() if f"{prefix}{k}" in keep}
    setattr(parent, attr, PipelineBlocks(kept))


def stage_module(model: nn.Module, plan: PipelinePlan, stage: int) -> nn.Module:
    """The module that runs ``stage`` of a rank holding several: a shallow copy of the model
    (and of the modules down to the block list) that shares every submodule and parameter,
    with only that stage's blocks and ends. Built when the step binds, after the later model
    transforms, so it sees their blocks. A rank holding one stage runs ``model`` itself."""
    if len(plan.local_stages) == 1:
        return model
    view = _shallow(model)
    parts = plan.container.split(".")
    node = view
    for part in parts[:-1]:
        child = _shallow(node._modules[part])
        node._modules[part] = child
        node = child
    keep = set(plan.stage_blocks[stage])
    _set_blocks(view, plan.container, keep)
    last = stage == plan.num_stages - 1
    dropped = (() if stage == 0 else plan.first) + (() if last else plan.last)
    for name in dropped:
        parent, _, child = name.rpartition(".")
        view.get_submodule(parent)._modules[child] = None
    return view


def _shallow(module: nn.Module) -> nn.Module:
    cls = module.__class__
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        # shard()'s root: the view shares its hooks (they unshard the root's parameters), but
        # is not itself an FSDP module, whose state torch keys by the module object.
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    copy = cls.__new__(cls)
    copy.__dict__ = dict(module.__dict__)
    copy.__dict__["_modules"] = dict(module._modules)
    return copy
