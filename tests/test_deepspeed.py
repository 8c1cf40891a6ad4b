"""torchdist.sharding.deepspeed: ZeRO-1/2/3 parity, composition with the step transforms,
checkpoints, and every configuration and composition error.

The multi-rank tests run two real CPU processes (``td.spawn``: DeepSpeed keeps process-global
state, so threads will not do) and pack many checks into each world, since each costs seconds.
Parity oracle: plain single-process torch on the same global batch (loss averaged over it),
with SGD. Tolerance: ``atol=rtol=1e-6`` after three steps (measured: at most 3e-8 for
ZeRO-1/2/3 and 1.5e-8 with accumulation and clipping; DeepSpeed's flat-buffer reduction order).
Save/load/resume is compared exactly (``atol=0``).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import torchdist as td
from torchdist.errors import CheckpointError, CompositionError, TopologyError
from torchdist.marks import mark
from torchdist.sharding import replicate, shard
from torchdist.sharding._deepspeed import deepspeed, deepspeed_config
from torchdist.transforms import (
    accumulate,
    autocast,
    clip_grads,
    compose,
    optimize,
    sync_grads,
    value_and_grad,
)

pytest.importorskip("deepspeed")
from deepspeed import ops as deepspeed_ops  # noqa: E402  (the name deepspeed is torchdist's)

# DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce op when an engine starts
# (two C++ files against torch's headers: ~80 s of g++ CPU time, and CI always starts from a fresh
# clone, so no cache survives). Only its AutoTP/inference all-reduce (``inference_all_reduce``)
# uses that op; ZeRO, which is all torchdist drives, never does. So the tests mark it not
# compatible -- DeepSpeed keeps these flags in one module dict and says edits to it persist --
# and ``build_shm_op`` returns None; the forked ranks inherit the flag. The engines trained and
# checked here train exactly as users' do.
deepspeed_ops.__compatible_ops__["deepspeed_shm_comm"] = False

WORLD, MICRO, STEPS = 2, 4, 3
ATOL = RTOL = 1e-6


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def global_batches(acc: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One global batch per step: WORLD ranks x acc micro-batches x MICRO samples."""
    g = torch.Generator().manual_seed(1)
    n = WORLD * acc * MICRO
    return [(torch.randn(n, 8, generator=g), 3 * torch.randn(n, 4, generator=g))
            for _ in range(STEPS)]  # fmt: skip


def local(batch, rank: int, acc: int):
    """Rank ``rank``'s contiguous slice; accumulate splits it into ``acc`` micro-batches."""
    size = acc * MICRO
    return tuple(t[rank * size : (rank + 1) * size] for t in batch)


def reference(acc: int, clip: float | None) -> list[torch.Tensor]:
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in global_batches(acc):
        loss_fn(model, batch).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def full_params(state) -> list[torch.Tensor]:
    with td.sharding.consolidated(state.model) as module:
        return [p.detach().clone() for p in module.parameters()]


# --------------------------------------------------------------------------- multi-rank
def _parity_world(topo):
    out: dict = {}
    for stage in (1, 2, 3):
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        state = deepspeed(model, opt, topo, zero_stage=stage, micro_batch_size=MICRO)
        assert td.marks.applied(state.model)[-1] == "deepspeed"
        step = compose(optimize(), sync_grads(topo))(value_and_grad(loss_fn))
        for batch in global_batches(1):
            state, metrics = step(state, local(batch, topo.rank, 1))
        out[f"zero{stage}"] = full_params(state)
        out[f"zero{stage}_step"] = state.step
        out[f"zero{stage}_skipped"] = bool(metrics["skipped"])

    # accumulate(2) + clip_grads(1.0), ZeRO-2; the step transforms delegate to the engine.
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = deepspeed(model, opt, topo, zero_stage=2, micro_batch_size=MICRO, accumulation=2,
                      clip=1.0)  # fmt: skip
    step = compose(optimize(), clip_grads(1.0), accumulate(2))(value_and_grad(loss_fn))
    norms = []
    for batch in global_batches(2):  # accumulate(2) is across calls: one micro-batch per call
        mine = local(batch, topo.rank, 2)
        for i in range(2):
            state, metrics = step(state, tuple(t[i * MICRO : (i + 1) * MICRO] for t in mine))
            if "grad_norm" in metrics:  # reported on the call that steps the optimizer
                norms.append(float(metrics["grad_norm"]))
    out["accum_clip"] = full_params(state)
    out["accum_clip_norms"] = norms

    # Step transforms composed against an engine built otherwise: errors naming the argument.
    # A state without transform state, as a new step function binds it (the engine is checked
    # when a step binds a state).
    state = dataclasses.replace(state, transforms={})
    errors = {}
    # Each step agrees with the engine (accumulation=2, clip=1.0) but for the one field tested.
    for name, transforms in (("accumulate", (accumulate(3),)),
                             ("clip", (clip_grads(0.5), accumulate(2))),
                             ("autocast", (clip_grads(1.0), accumulate(2),
                                           autocast(torch.bfloat16)))):  # fmt: skip
        bad = compose(optimize(), *transforms)(value_and_grad(loss_fn))
        try:
            bad(state, local(global_batches(2)[0], topo.rank, 2))
        except CompositionError as exc:
            errors[name] = str(exc)
    out["errors"] = errors

    # shard/replicate after deepspeed, and deepspeed twice.
    refused = []
    for fn in (lambda: shard(state.model, topo), lambda: replicate(state.model, topo),
               lambda: deepspeed(state.model, opt, topo, zero_stage=1, micro_batch_size=MICRO),
               lambda: deepspeed(state.model.module, opt, topo, zero_stage=1,
                                 micro_batch_size=MICRO)):  # fmt: skip
        try:
            fn()
        except CompositionError as exc:
            refused.append(str(exc))
    out["refused"] = refused
    return out


@pytest.mark.multiprocess
def test_zero_stages_and_composed_steps_match_single_process():
    results = td.spawn(_parity_world, WORLD, timeout=240)
    plain = reference(1, None)
    clipped = reference(2, 1.0)
    for out in results:
        for stage in (1, 2, 3):
            assert out[f"zero{stage}_step"] == STEPS
            assert out[f"zero{stage}_skipped"] is False
            for got, want in zip(out[f"zero{stage}"], plain):
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        for got, want in zip(out["accum_clip"], clipped):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        assert max(out["accum_clip_norms"]) > 1.0, "clipping must be active for the check to bite"
        assert "deepspeed(..., accumulation=3)" in out["errors"]["accumulate"]
        assert "deepspeed(..., clip=0.5)" in out["errors"]["clip"]
        assert "dtype=torch.bfloat16" in out["errors"]["autocast"]
        assert len(out["refused"]) == 4, out["refused"]
        assert "DeepSpeed" in out["refused"][0] and "DeepSpeed" in out["refused"][1]


def _checkpoint_world(topo, root):
    from safetensors.torch import load_file

    from torchdist import checkpoint

    def make(stage, seed=0):
        model = build(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return deepspeed(model, opt, topo, zero_stage=stage, micro_batch_size=MICRO,
                         scheduler=sched)  # fmt: skip

    step = compose(optimize())(value_and_grad(loss_fn))
    batches = [local(b, topo.rank, 1) for b in global_batches(1)]
    out: dict = {}
    for stage in (2, 3):
        state = make(stage)
        for batch in batches:
            state, _ = step(state, batch)
        uninterrupted = full_params(state)

        state = make(stage)
        for batch in batches[:2]:
            state, _ = step(state, batch)
        path = checkpoint.save(os.path.join(root, f"zero{stage}"), state, topo)
        resumed = checkpoint.load(os.path.join(root, f"zero{stage}"), make(stage, seed=5), topo)
        out[f"zero{stage}_loaded_step"] = resumed.step
        out[f"zero{stage}_lr"] = resumed.scheduler.get_last_lr()
        resumed, _ = step(resumed, batches[2])
        out[f"zero{stage}"] = (uninterrupted, full_params(resumed))
        out[f"zero{stage}_dir"] = sorted(os.listdir(path))

        export = os.path.join(root, f"hf{stage}")
        with td.sharding.consolidated(resumed.model) as module:
            td.checkpoint.export_safetensors(module, export, topo)
        torch.distributed.barrier()  # rank 0 wrote the file; every rank reads it
        exported = load_file(os.path.join(export, "model.safetensors"))
        out[f"zero{stage}_export"] = (exported, dict(zip(
            [n for n, _ in build().named_parameters()], full_params(resumed))))  # fmt: skip

    # An engine checkpoint does not load at another ZeRO stage, nor into a plain model.
    errors = []
    for target in (lambda: make(3), lambda: td.TrainState(model=build(),
                                                          optimizer=None)):  # fmt: skip
        try:
            checkpoint.load(os.path.join(root, "zero2"), target(), topo)
        except CheckpointError as exc:
            errors.append(str(exc))
    out["errors"] = errors
    return out


@pytest.mark.multiprocess
def test_checkpoint_resume_equals_uninterrupted_and_exports_safetensors(tmp_path):
    results = td.spawn(_checkpoint_world, WORLD, str(tmp_path), timeout=240)
    for out in results:
        for stage in (2, 3):
            assert out[f"zero{stage}_loaded_step"] == 2
            assert out[f"zero{stage}_lr"] == pytest.approx([0.05 * 0.25])
            assert "engine" in out[f"zero{stage}_dir"] and "extras" in out[f"zero{stage}_dir"]
            uninterrupted, resumed = out[f"zero{stage}"]
            for a, b in zip(uninterrupted, resumed):
                torch.testing.assert_close(b, a, atol=0, rtol=0)
            exported, params = out[f"zero{stage}_export"]
            assert sorted(exported) == sorted(params)
            for name, value in params.items():
                torch.testing.assert_close(exported[name], value, atol=0, rtol=0)
        assert len(out["errors"]) == 2, out["errors"]
        assert "ZeRO-2" in out["errors"][0] and "ZeRO-3" in out["errors"][0]
        assert "not an engine" in out["errors"][1]


# --------------------------------------------------------------------------- pure
def test_config_fills_batch_sizes_clip_stage_and_dtype():
    cfg = deepspeed_config(dp=4, zero_stage=2, micro_batch_size=3, accumulation=2)
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.0  # DeepSpeed's own default (1.0) would clip silently
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert cfg["zero_allow_untested_optimizer"] is True
    cfg = deepspeed_config(dp=2, zero_stage=3, micro_batch_size=1, clip=0.5,
                           dtype=torch.bfloat16, offload_optimizer=True, offload_params=True,
                           config={"steps_per_print": 7, "train_batch_size": 2})  # fmt: skip
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["steps_per_print"] == 7


@pytest.mark.parametrize(
    "kwargs, config, names",
    [
        ({}, {"train_batch_size": 10}, ["train_batch_size=10", "expected 16"]),
        ({}, {"train_micro_batch_size_per_gpu": 2}, ["train_micro_batch_size_per_gpu=2"]),
        ({}, {"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps=4"]),
        ({"zero_stage": 4}, None, ["zero_stage=4", "out of range"]),
        ({"zero_stage": -1}, None, ["zero_stage=-1"]),
        ({}, {"zero_optimization": {"stage": 3}}, ["zero_optimization.stage=3"]),
        ({"zero_stage": 0, "offload_optimizer": True}, None, ["offload_optimizer", "stage >= 1"]),
        ({"zero_stage": 2, "offload_params": True}, None, ["offload_param", "stage 3"]),
        (
            {"zero_stage": 0},
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            ["offload_optimizer"],
        ),
        ({}, {"zero_optimization": {"offload_param": {"device": "nvme"}}}, ["offload_param"]),
        ({}, {"fp16": {"enabled": True}, "bf16": {"enabled": True}}, ["fp16", "bf16"]),
        ({}, {"bf16": {"enabled": True}}, ["dtype=torch.bfloat16"]),
        ({}, {"gradient_clipping": 1.0}, ["gradient_clipping=1.0", "clip="]),
        ({"micro_batch_size": 0}, None, ["micro_batch_size"]),
        ({"dtype": torch.float64}, None, ["torch.float64"]),
    ],
)
def test_inconsistent_config_raises_naming_the_fields(kwargs, config, names):
    args = {"dp": 2, "zero_stage": 1, "micro_batch_size": 4, "accumulation": 2, **kwargs}
    with pytest.raises(CompositionError) as info:
        deepspeed_config(**args, config=config)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize("applied", ["shard", "replicate", "parallelize", "deepspeed"])
def test_deepspeed_refuses_a_model_already_distributed(applied):
    model = mark(build(), applied)
    with pytest.raises(CompositionError, match=f"deepspeed after {applied}"):
        deepspeed(model, None, td.Topology.single(), zero_stage=1, micro_batch_size=1)


@pytest.mark.parametrize("transform", [shard, replicate])
def test_shard_and_replicate_refuse_a_deepspeed_model(transform):
    with pytest.raises(CompositionError, match="DeepSpeed"):
        transform(mark(build(), "deepspeed"), td.Topology.single())


def test_topology_must_be_data_parallel_and_live():
    with pytest.raises(TopologyError, match="purely data-parallel"):
        deepspeed(build(), None, td.Topology(world_size=2, rank=0, tp=2), zero_stage=1,
                  micro_batch_size=1)  # fmt: skip
    with pytest.raises(TopologyError, match="live topology"):
        deepspeed(build(), None, td.Topology.single(), zero_stage=1, micro_batch_size=1)


def test_missing_deepspeed_names_the_extra(monkeypatch):
    import importlib
    import sys

    ds_module = importlib.import_module("torchdist.sharding._deepspeed")  # the module, not the fn
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ImportError, match=r"pip install 'torchdist\[deepspeed\]'"):
        ds_module._import_deepspeed(td.Topology.single())


# That importing torchdist loads no DeepSpeed is checked in test_import_light.py.
