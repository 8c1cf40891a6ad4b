"""`deepspeed(model, optimizer, topo, ...)`: a DeepSpeed ZeRO engine as a model transform.

Returns a ``TrainState`` whose model, optimizer and scheduler are the engine's; the step
transforms delegate to the engine (backward, accumulation boundary, clipping, mixed precision,
``engine.step()``), and ``sync_grads`` steps aside. The config is built by ``deepspeed_config``
(pure) and checked against the arguments; the topology must be purely data-parallel. The
design, the environment it writes and its checkpoints: ``docs/deepspeed.md``.

Example::

    with td.distributed(td.Topology.from_env()) as topo:
        model = build_model()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        state = deepspeed(model, opt, topo, zero_stage=2, micro_batch_size=8, accumulation=4,
                          clip=1.0)
        step = compose(optimize(), clip_grads(1.0), accumulate(4))(value_and_grad(loss_fn))
        state, metrics = step(state, batch)       # batch: 4 micro-batches of 8 on each rank
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from torchdist.errors import CompositionError, TopologyError
from torchdist.marks import applied, data_parallel_owner, deepspeed_engine, mark
from torchdist.sharding._common import check_has_parameters, check_order
from torchdist.state import TrainState
from torchdist.topology import Topology

__all__ = ["deepspeed", "deepspeed_config", "consolidated"]

_INSTALL = "pip install 'torchdist[deepspeed]'"

_DTYPES = {torch.float32: None, torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------- config (pure)
def deepspeed_config(
    *,
    dp: int,
    zero_stage: int,
    micro_batch_size: int,
    accumulation: int = 1,
    clip: float | None = None,
    dtype: torch.dtype = torch.float32,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    client_optimizer: bool = True,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``dp`` data-parallel ranks; raises ``CompositionError`` on
    a field of ``config`` that contradicts the arguments or DeepSpeed's own rules. Pure."""
    for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("accumulation",
                              accumulation, 1), ("dp", dp, 1)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise CompositionError(f"deepspeed: {name} must be an int >= {low}, got {value!r}.")
    if not isinstance(zero_stage, int) or isinstance(zero_stage, bool) or not 0 <= zero_stage <= 3:
        raise CompositionError(
            f"deepspeed: zero_stage={zero_stage!r} is out of range; ZeRO stages are 0 (plain "
            "data parallel), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters)."
        )
    if clip is not None and not clip > 0:
        raise CompositionError(f"deepspeed: clip must be None or > 0, got {clip!r}.")
    if dtype not in _DTYPES:
        raise CompositionError(
            f"deepspeed: dtype {dtype} is not one DeepSpeed trains in; use torch.float32, "
            "torch.bfloat16 or torch.float16."
        )
    cfg: dict[str, Any] = copy.deepcopy(dict(config or {}))
    zero = dict(cfg.get("zero_optimization") or {})
    _check_user_config(cfg, zero, dp, micro_batch_size, accumulation, zero_stage, clip, dtype)

    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["train_batch_size"] = micro_batch_size * accumulation * dp
    cfg["gradient_clipping"] = float(clip) if clip is not None else 0.0
    zero["stage"] = zero_stage
    if offload_optimizer:
        zero["offload_optimizer"] = {**(zero.get("offload_optimizer") or {}), "device": "cpu"}
    if offload_params:
        zero["offload_param"] = {**(zero.get("offload_param") or {}), "device": "cpu"}
    _check_offload(zero)
    cfg["zero_optimization"] = zero
    section = _DTYPES[dtype]
    for name in ("bf16", "fp16"):
        cfg[name] = {**(cfg.get(name) or {}), "enabled": name == section}
    if client_optimizer:
        cfg.setdefault("zero_allow_untested_optimizer", True)
        if _offloaded(zero, "offload_optimizer"):
            cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    return cfg


def _check_user_config(cfg, zero, dp, micro, acc, stage, clip, dtype) -> None:
    wrong = []
    expected = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": acc,
        "train_batch_size": micro * acc * dp,
    }
    for key, want in expected.items():
        if key in cfg and cfg[key] != want:
            wrong.append(f"{key}={cfg[key]!r} (expected {want})")
    if wrong:
        raise CompositionError(
            "deepspeed: the config's batch sizes do not fit: " + ", ".join(wrong) + f"; with "
            f"micro_batch_size={micro}, accumulation={acc} and {dp} data-parallel ranks, "
            "train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
            f"dp = {micro * acc * dp}. Drop these fields from the config (torchdist fills them) "
            "or pass matching micro_batch_size/accumulation."
        )
    if "stage" in zero and zero["stage"] != stage:
        raise CompositionError(
            f"deepspeed: config zero_optimization.stage={zero['stage']!r} contradicts "
            f"zero_stage={stage}; drop it from the config or pass zero_stage={zero['stage']!r}."
        )
    if "gradient_clipping" in cfg and float(cfg["gradient_clipping"] or 0.0) != float(clip or 0.0):
        raise CompositionError(
            f"deepspeed: config gradient_clipping={cfg['gradient_clipping']!r} contradicts "
            f"clip={clip!r}; pass clip= (it maps to gradient_clipping) and drop the field."
        )
    on = [n for n in ("fp16", "bf16") if (cfg.get(n) or {}).get("enabled", False)]
    if len(on) == 2:
        raise CompositionError(
            "deepspeed: config enables both fp16.enabled and bf16.enabled; choose one, with "
            "dtype=torch.float16 or dtype=torch.bfloat16."
        )
    if on and on[0] != _DTYPES[dtype]:
        raise CompositionError(
            f"deepspeed: config enables {on[0]}.enabled but dtype={dtype}; pass "
            f"dtype={'torch.bfloat16' if on[0] == 'bf16' else 'torch.float16'} instead."
        )
    _check_offload({**zero, "stage": stage})


def _offloaded(zero: Mapping[str, Any], key: str) -> bool:
    section = zero.get(key) or {}
    return str(section.get("device", "none")).lower() not in ("none", "")


def _check_offload(zero: Mapping[str, Any]) -> None:
    stage = zero.get("stage", 0)
    if _offloaded(zero, "offload_optimizer") and stage < 1:
        raise CompositionError(
            f"deepspeed: zero_optimization.offload_optimizer needs ZeRO stage >= 1, got stage "
            f"{stage}; pass zero_stage=1 (or higher) with offload_optimizer=True."
        )
    if _offloaded(zero, "offload_param") and stage < 3:
        raise CompositionError(
            f"deepspeed: zero_optimization.offload_param needs ZeRO stage 3, got stage {stage}; "
            "pass zero_stage=3 with offload_params=True."
        )


# --------------------------------------------------------------------------- the transform
def deepspeed(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    topo: Topology,
    *,
    zero_stage: int,
    micro_batch_size: int,
    accumulation: int = 1,
    clip: float | None = None,
    dtype: torch.dtype = torch.float32,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    scheduler: Any = None,
    config: Mapping[str, Any] | None = None,
) -> TrainState:
    """Wrap ``model`` and ``optimizer`` in a DeepSpeed ZeRO engine over ``topo``'s ranks.

    ``optimizer``: a torch optimizer over ``model.parameters()`` (SGD, AdamW: no JIT-built
    ops), or None when ``config`` has an ``optimizer`` section. ``scheduler``: a torch
    scheduler over that optimizer (or a callable ``optimizer -> scheduler``); the engine steps
    it after each applied step. Returns ``TrainState(model=engine, optimizer=engine.optimizer,
    scheduler=engine.lr_scheduler)``.

    Communicates: a broadcast of rank 0's parameters when built, then per step (ZeRO-1/2)
    a reduce-scatter or all-reduce of gradients at the accumulation boundary and an
    all-gather of updated parameters; ZeRO-3 also all-gathers each module's parameters in the
    forward and backward. All over the default (world) process group, gloo or NCCL.
    """
    check_has_parameters(model, "deepspeed")
    check_order(model, "deepspeed")
    if deepspeed_engine(model) is not None:
        raise CompositionError("deepspeed: the model is already a DeepSpeed engine.")
    owner = data_parallel_owner(model)
    if owner is not None and not applied(model):
        raise CompositionError(
            f"deepspeed: {owner}; DeepSpeed needs the plain module. Pass the model before DDP "
            "or FSDP wraps it."
        )
    _check_topology(topo)
    cfg = deepspeed_config(
        dp=topo.size("dp"),
        zero_stage=zero_stage,
        micro_batch_size=micro_batch_size,
        accumulation=accumulation,
        clip=clip,
        dtype=dtype,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        client_optimizer=optimizer is not None,
        config=config,
    )
    if optimizer is None and "optimizer" not in cfg:
        raise CompositionError(
            "deepspeed: no optimizer; pass a torch optimizer (torch.optim.AdamW(model."
            "parameters())) or put an 'optimizer' section in config."
        )
    ds = _import_deepspeed(topo)
    engine, _, _, lr_scheduler = ds.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=cfg,
        dist_init_required=False,
    )
    options = {"zero_stage": zero_stage, "micro_batch_size": micro_batch_size,
               "accumulation": accumulation, "clip": clip, "dtype": dtype}  # fmt: skip
    mark(engine, "deepspeed", options=options)
    mark(engine.module, "deepspeed", options=options)  # the module refuses shard etc. too
    return TrainState(model=engine, optimizer=engine.optimizer, scheduler=lr_scheduler)


def _check_topology(topo: Topology) -> None:
    if not isinstance(topo, Topology):
        raise TopologyError(f"deepspeed runs over a live Topology, got {type(topo).__name__}.")
    if topo.size("dp") != topo.world_size:
        raise TopologyError(
            f"deepspeed partitions over every rank, but the topology's data-parallel axis has "
            f"{topo.size('dp')} of {topo.world_size} ranks ({topo.axes}). Use a purely "
            "data-parallel topology (tp=cp=pp=1), e.g. Topology.from_env(dp_shard=-1)."
        )
    if not topo.is_live:
        raise TopologyError(
            "deepspeed needs a live topology (its process group is reused by DeepSpeed): use the "
            "topology that `with td.distributed(topo) as topo:` yields."
        )


def _import_deepspeed(topo: Topology) -> Any:
    """DeepSpeed, imported with the accelerator and ``LOCAL_RANK`` the topology implies."""
    import sys

    # DeepSpeed reads these two; the topology is the truth, so they are written, never read.
    if topo.device.type == "cpu" and "deepspeed" not in sys.modules:
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["LOCAL_RANK"] = str(topo.local_rank)
    try:
        import deepspeed as ds
    except ImportError as exc:
        raise ImportError(
            f"torchdist.sharding.deepspeed needs DeepSpeed, which is not installed ({exc}). "
            f"Install it with: {_INSTALL}"
        ) from exc
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator().device_name()
    if accel != topo.device.type:
        raise TopologyError(
            f"DeepSpeed's accelerator is {accel!r} but the topology's device is "
            f"{topo.device.type!r}; set DS_ACCELERATOR={topo.device.type} before DeepSpeed is "
            "first imported."
        )
    return ds


# --------------------------------------------------------------------------- weights, checkpoints
def _engine(model: Any) -> Any:
    engine = deepspeed_engine(model)
    if engine is None:
        raise CompositionError(
            f"expected a DeepSpeed engine (TrainState.model after torchdist.sharding.deepspeed), "
            f"got {type(model).__name__}."
        )
    return engine


@contextlib.contextmanager
def consolidated(engine: Any) -> Iterator[nn.Module]:
    """The engine's plain module with full parameters, for ``export_safetensors``.

    Communicates (ZeRO-3 only): an all-gather of every parameter on entry (each rank then holds
    the whole model until exit: peak memory is the full model). Every rank must enter. Weights
    are in the engine's compute dtype (fp32 when ``dtype=torch.float32``).

    Example::

        with consolidated(state.model) as model:
            export_safetensors(model, "out/hf", topo)
    """
    engine = _engine(engine)
    if engine.zero_optimization_stage() < 3:
        yield engine.module
        return
    import deepspeed as ds  # ``deepspeed.zero`` is an attribute of the package, not a module

    with ds.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        yield engine.module
