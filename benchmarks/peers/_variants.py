"""One builder per (library, mode): each returns a ``Runner`` whose ``step(batch)`` trains one step
and returns the local loss (detached), or raises ``Unavailable`` saying why the mode cannot run.

Every builder starts from ``build(w)`` (same weights), uses AdamW with the same settings, and does
the same work per step: forward, backward, optimizer step, zero the gradients. Peers are imported
inside their builders, so a missing one is reported, not fatal.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from _workload import Workload, build, loss_fn

import torchdist as td


class Unavailable(Exception):
    """The peer cannot run this mode here; the message says why."""


@dataclass
class Runner:
    name: str
    step: Callable[[Any], torch.Tensor]
    baseline: str | None  # the BUILDERS key of the raw-torch variant it is compared with
    mode: str  # what actually ran, detected after setup (e.g. "DDP" for a plugin that fell back)


def _adamw(params: Any, w: Workload) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=w.lr, weight_decay=0.0)


def _hand_loop(model: Any, opt: Any, backward: Callable[[torch.Tensor], None] | None = None):
    def step(batch: Any) -> torch.Tensor:
        loss = loss_fn(model, batch)
        (backward or torch.Tensor.backward)(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _detected(model: nn.Module) -> str:
    from torch.nn.parallel import DistributedDataParallel

    if _is_fsdp2(model):
        return "FSDP2"
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        return "FSDP1"
    if any(isinstance(m, DistributedDataParallel) for m in model.modules()):
        return "DDP"
    if "replicate" in td.marks.applied(model):
        return "DDP (composable replicate)"
    return "unwrapped"


# --------------------------------------------------------------------------- raw torch
def torch_ddp(topo: td.Topology, w: Workload) -> Runner:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(build(w), process_group=topo.submesh("dp").get_group())
    return Runner("torch DDP", _hand_loop(model, _adamw(model.parameters(), w)), None, "DDP")


def torch_ddp_again(topo: td.Topology, w: Workload) -> Runner:
    """A second, identical raw DDP: its ratio to ``torch DDP`` is the noise floor (an A/A test)."""
    runner = torch_ddp(topo, w)
    return Runner("torch DDP again (A/A noise)", runner.step, "torch-ddp", "DDP")


def torch_fsdp2(topo: td.Topology, w: Workload) -> Runner:
    from torch.distributed.fsdp import fully_shard

    model = build(w)
    for block in model.blocks:
        fully_shard(block, mesh=topo.mesh["dp_shard"])
    fully_shard(model, mesh=topo.mesh["dp_shard"])
    return Runner("torch fully_shard", _hand_loop(model, _adamw(model.parameters(), w)), None,
                  "FSDP2")  # fmt: skip


def deepspeed_hand(stage: int) -> Callable[[td.Topology, Workload], Runner]:
    def make(topo: td.Topology, w: Workload) -> Runner:
        import deepspeed

        model = build(w)
        cfg = {
            "train_batch_size": w.batch * topo.world_size,
            "train_micro_batch_size_per_gpu": w.batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=_adamw(model.parameters(), w),
                                          config=cfg, dist_init_required=False)  # fmt: skip

        def step(batch: Any) -> torch.Tensor:
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()
            return loss.detach()

        return Runner(f"DeepSpeed ZeRO-{stage}", step, None, f"ZeRO-{stage}")

    return make


# --------------------------------------------------------------------------- torchdist
def _composed(state: td.TrainState, transforms: tuple) -> Callable[[Any], torch.Tensor]:
    from torchdist.transforms import compose, value_and_grad

    step = compose(*transforms)(value_and_grad(loss_fn))
    box = [state]

    def one(batch: Any) -> torch.Tensor:
        box[0], metrics = step(box[0], batch)
        return metrics["loss"]

    return one


def td_sync_grads(topo: td.Topology, w: Workload) -> Runner:
    from torchdist.transforms import optimize, sync_grads

    model = build(w)
    opt = _adamw(model.parameters(), w)
    step = _composed(td.TrainState(model=model, optimizer=opt), (optimize(opt), sync_grads(topo)))
    return Runner("torchdist sync_grads", step, "torch-ddp", "all-reduce hooks")


def td_replicate(topo: td.Topology, w: Workload) -> Runner:
    from torchdist.sharding import replicate
    from torchdist.transforms import optimize

    model = replicate(build(w), topo)
    opt = _adamw(model.parameters(), w)
    step = _composed(td.TrainState(model=model, optimizer=opt), (optimize(opt),))
    return Runner("torchdist replicate", step, "torch-ddp", _detected(model))


def td_shard(topo: td.Topology, w: Workload) -> Runner:
    from torchdist.sharding import shard
    from torchdist.transforms import optimize

    model = shard(build(w), topo)
    opt = _adamw(model.parameters(), w)
    step = _composed(td.TrainState(model=model, optimizer=opt), (optimize(opt),))
    return Runner("torchdist shard", step, "torch-fsdp2", _detected(model))


def td_deepspeed(stage: int) -> Callable[[td.Topology, Workload], Runner]:
    def make(topo: td.Topology, w: Workload) -> Runner:
        from torchdist.sharding import deepspeed
        from torchdist.transforms import optimize

        model = build(w)
        state = deepspeed(model, _adamw(model.parameters(), w), topo, zero_stage=stage,
                          micro_batch_size=w.batch, config={"steps_per_print": 10**9})  # fmt: skip
        return Runner(f"torchdist deepspeed ZeRO-{stage}", _composed(state, (optimize(),)),
                      f"deepspeed-zero{stage}", f"ZeRO-{stage}")  # fmt: skip

    return make


# --------------------------------------------------------------------------- Accelerate
def _accelerator(**kwargs: Any) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps one shared state per process; a second Accelerator with another plugin
    # would silently inherit the first one's, so each benchmark variant starts from a clean one.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=True, **kwargs)


def accelerate_ddp(topo: td.Topology, w: Workload) -> Runner:
    acc = _accelerator()
    base = build(w)
    model, opt = acc.prepare(base, _adamw(base.parameters(), w))
    return Runner("Accelerate (cpu=True)", _hand_loop(model, opt, acc.backward), "torch-ddp",
                  _detected(model))  # fmt: skip


def accelerate_fsdp2(topo: td.Topology, w: Workload) -> Runner:
    from accelerate.utils import FullyShardedDataParallelPlugin

    acc = _accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    base = build(w)
    model = acc.prepare(base)
    opt = acc.prepare(_adamw(model.parameters(), w))
    mode = _detected(model)
    if mode != "FSDP2":
        mode = f"{mode} (FSDP2 plugin fell back: distributed_type={acc.distributed_type.value})"
    return Runner("Accelerate FSDP2 plugin", _hand_loop(model, opt, acc.backward),
                  "torch-fsdp2" if _is_fsdp2(model) else "torch-ddp", mode)  # fmt: skip


# --------------------------------------------------------------------------- Lightning Fabric
def _fabric(topo: td.Topology, strategy: Any) -> Any:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                    strategy=strategy, precision="32-true")  # fmt: skip
    fabric.launch()  # under torchrun: joins the existing process group, starts nothing
    return fabric


def fabric_ddp(topo: td.Topology, w: Workload) -> Runner:
    fabric = _fabric(topo, "ddp")
    base = build(w)
    model, opt = fabric.setup(base, _adamw(base.parameters(), w))
    return Runner("Fabric ddp", _hand_loop(model, opt, fabric.backward), "torch-ddp",
                  _detected(model))  # fmt: skip


def fabric_fsdp2(topo: td.Topology, w: Workload) -> Runner:
    from lightning.fabric.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    def parallelize(model: nn.Module, mesh: Any) -> nn.Module:
        dp = mesh["data_parallel"]
        for block in model.blocks:
            fully_shard(block, mesh=dp)
        return fully_shard(model, mesh=dp)

    try:
        strategy = ModelParallelStrategy(parallelize, data_parallel_size=topo.world_size,
                                         tensor_parallel_size=1)  # fmt: skip
        fabric = _fabric(topo, strategy)
        model = fabric.setup_module(build(w))
    except Exception as exc:  # the strategy's own checks: report, do not substitute
        raise Unavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc
    opt = fabric.setup_optimizers(_adamw(model.parameters(), w))
    return Runner("Fabric ModelParallel (FSDP2)", _hand_loop(model, opt, fabric.backward),
                  "torch-fsdp2", _detected(model))  # fmt: skip


BUILDERS: dict[str, Callable[[td.Topology, Workload], Runner]] = {
    "torch-ddp": torch_ddp,
    "torch-ddp-again": torch_ddp_again,
    "torch-fsdp2": torch_fsdp2,
    "td-sync-grads": td_sync_grads,
    "td-replicate": td_replicate,
    "td-shard": td_shard,
    "accelerate-ddp": accelerate_ddp,
    "accelerate-fsdp2": accelerate_fsdp2,
    "fabric-ddp": fabric_ddp,
    "fabric-fsdp2": fabric_fsdp2,
    "deepspeed-zero2": deepspeed_hand(2),
    "deepspeed-zero3": deepspeed_hand(3),
    "td-deepspeed-zero2": td_deepspeed(2),
    "td-deepspeed-zero3": td_deepspeed(3),
}
