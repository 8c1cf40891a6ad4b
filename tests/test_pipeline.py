"""Pipeline parallelism (``pipeline`` + ``pipeline_value_and_grad``) against one process.

The oracle is parity (DESIGN.md): a model split over ``pp`` ranks (each holding its stage(s)),
trained with a torch.distributed.pipelining schedule over micro-batches, must end where a
hand-written single-process loop on the whole global batch ends (fp32, SGD, 3 steps, clipping
that acts, atol 1e-6), and report the whole batch's loss and gradient norm on every rank.

Ranks are threads of one process with real gloo groups (``td.in_process``): the schedules'
point-to-point sends are real. We count them with wrappers around ``torch.distributed.isend`` /
``irecv`` (which torch 2.13's stages call, alone or through ``batch_isend_irecv``); each wrapper
calls the real one.
"""

from __future__ import annotations

import collections
import copy
import threading

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn.functional as F
from _pipeline_models import PLAN, Model
from _seeded import seeded

import torchdist as td
from torchdist.errors import CompositionError, ConfigError, ShardingError, StepError
from torchdist.sharding import parallelize, pipeline, shard
from torchdist.sharding._pipeline import SCHEDULES
from torchdist.transforms import (
    accumulate,
    autocast,
    checkpoint_activations,
    clip_grads,
    compose,
    optimize,
    pipeline_value_and_grad,
    sync_grads,
    value_and_grad,
)

STEPS, GLOBAL_BATCH, LR, MAX_NORM, ATOL, MICRO = 3, 8, 0.1, 0.5, 1e-6, 4



MODEL0 = seeded(0, Model)
_GEN = torch.Generator().manual_seed(1)
BATCHES = [
    (torch.randn(GLOBAL_BATCH, 6, generator=_GEN), torch.randn(GLOBAL_BATCH, 3, generator=_GEN))
    for _ in range(STEPS)
]


def full_params(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def reference():
    """Hand-written torch on the whole batch: (final params, losses, clip_grad_norm_ values)."""
    model = copy.deepcopy(MODEL0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, norms = [], []
    for x, y in BATCHES:
        loss = F.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        opt.step()
        opt.zero_grad()
    return full_params(model), torch.stack(losses), torch.stack(norms)


REF_PARAMS, REF_LOSSES, REF_NORMS = reference()


def check_matches(params, losses, norms, *, what, loss_atol=ATOL):
    """This rank's stage parameters, the reported losses and norms are the reference's."""
    assert params, what
    for name, value in params.items():
        diff = (value - REF_PARAMS[name]).abs().max().item()
        assert diff <= ATOL, f"{what}: {name} is {diff:.2e} from one process"
    torch.testing.assert_close(torch.stack(norms), REF_NORMS, rtol=1e-5, atol=ATOL)
    torch.testing.assert_close(torch.stack(losses), REF_LOSSES, rtol=1e-5, atol=loss_atol)


def train(model, topo, *, micro=MICRO, sync=False, accum=1):
    """3 steps of the composed pipeline step; (params, losses, norms, step report)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    inner = [sync_grads(topo)] if sync else []
    if accum > 1:
        inner.append(accumulate(accum))
    step = compose(optimize(opt), clip_grads(MAX_NORM), *inner)(
        pipeline_value_and_grad(F.mse_loss, microbatches=micro)
    )
    state = step.init(td.TrainState(model, opt))
    losses, norms = [], []
    for x, y in BATCHES:
        share = td.split_between_ranks({"x": x, "y": y}, topo, axis="dp")
        calls = zip(share["x"].chunk(accum), share["y"].chunk(accum), strict=True)
        window = []
        for part in calls:
            state, metrics = step(state, part)
            window.append(metrics["loss"])
        # Each dp rank reports its share's loss: their mean is the whole batch's.
        losses.append(td.all_reduce(torch.stack(window).mean(), topo, op="mean", axis="dp"))
        norms.append(metrics["grad_norm"].detach().clone())
    return full_params(model), losses, norms, step.report(state)


# --------------------------------------------------------------------------- p2p counting
@pytest.fixture
def p2p_log(monkeypatch):
    """Per rank thread, ``(op, dtype)`` of every point-to-point op; the real one runs."""
    log: dict[str, list] = collections.defaultdict(list)

    def counting(name, real):
        def wrapper(tensor, *args, **kwargs):
            log[threading.current_thread().name].append((name, tensor.dtype))
            return real(tensor, *args, **kwargs)

        wrapper.__name__ = real.__name__
        return wrapper

    for name in ("isend", "irecv"):
        wrapped = counting(name, getattr(c10d, name))
        monkeypatch.setattr(c10d, name, wrapped)  # P2POp checks its op against these
        monkeypatch.setattr(dist, name, wrapped)
    return log


# --------------------------------------------------------------------------- schedules
def test_every_schedule_matches_single_process(p2p_log):
    """pp=2: GPipe, 1F1B (1 stage a rank), Interleaved1F1B, LoopedBFS, InterleavedZeroBubble,
    ZBVZeroBubble, DualPipeV (2 stages a rank: 4 stages of one block each)."""

    def rank(topo):
        me, out = threading.current_thread().name, {}
        for schedule in SCHEDULES:
            model = pipeline(copy.deepcopy(MODEL0), topo, schedule=schedule)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            step = compose(optimize(opt), clip_grads(MAX_NORM))(
                pipeline_value_and_grad(F.mse_loss, microbatches=MICRO)
            )
            state, losses, norms, per_step = td.TrainState(model, opt), [], [], []
            for batch in BATCHES:
                before = len(p2p_log[me])
                state, metrics = step(state, batch)
                per_step.append(p2p_log[me][before:])
                losses.append(metrics["loss"])
                norms.append(metrics["grad_norm"])
            out[schedule] = full_params(model), losses, norms, per_step, step.report(state)
        return out

    results = td.in_process(rank, 2, pp=2)
    for schedule, (single, placement) in SCHEDULES.items():
        stages = 2 if single else 4
        owner = [s % 2 if placement == "loop" else min(s, 3 - s) for s in range(stages)]
        crossing = sum(owner[s] != owner[s + 1] for s in range(stages - 1))
        held = [set(out[schedule][0]) for out in results]
        assert not held[0] & held[1] and held[0] | held[1] == set(REF_PARAMS), schedule
        for r, out in enumerate(results):
            params, losses, norms, per_step, report = out[schedule]
            check_matches(params, losses, norms, what=f"{schedule} rank {r}")
            assert report["value_and_grad"] == {} and "clip_grads" in report
        # Each step after the first (which also exchanges shapes) sends every micro-batch's
        # activation forward and its gradient back across each stage boundary between two ranks
        # (all 3 when looped, 2 in a V: its turn stays on rank 1), one isend at one end and one
        # irecv at the other, all fp32.
        for step_index in (1, 2):
            ops = [e for out in results for e in out[schedule][3][step_index]]
            count = collections.Counter(n for n, _ in ops)
            expected = 2 * crossing * MICRO
            assert count == {"isend": expected, "irecv": expected}, (schedule, count)
            assert {d for _, d in ops} == {torch.float32}
    # Rank 0 of the V schedules holds the first and the last stage.
    zbv = results[0]["ZBVZeroBubble"][0]
    assert {"inp.weight", "out.weight", "blocks.0.up.weight", "blocks.3.up.weight"} <= set(zbv)


# --------------------------------------------------------------------------- composition
LAYOUTS = {  # name: (mesh axes, [(schedule, model transforms, sync_grads, accumulate, micro)])
    "pp2xdp2": (
        dict(pp=2, dp_shard=2),
        [("1F1B", "shard", False, 1, 2), ("GPipe", "ac+shard", False, 1, 4),
         ("Interleaved1F1B", "", True, 2, 2), ("1F1B", "shard", False, 2, 2),
         ("Interleaved1F1B", "shard", False, 1, 2), ("LoopedBFS", "ac+shard", False, 1, 2)],
    ),
    "pp2xtp2": (
        dict(pp=2, dp_shard=1, tp=2),
        [("1F1B", "tp", False, 1, 4), ("Interleaved1F1B", "tp+ac", False, 1, 2),
         ("ZBVZeroBubble", "tp", False, 1, 4)],
    ),
    "pp2xdp2xtp2": (
        dict(pp=2, dp_shard=2, tp=2),
        [("1F1B", "tp+ac+shard", False, 1, 2), ("Interleaved1F1B", "tp+shard", False, 1, 2)],
    ),
}  # fmt: skip


def build(topo, schedule, how):
    model = pipeline(copy.deepcopy(MODEL0), topo, schedule=schedule)
    parts = how.split("+") if how else []
    if "tp" in parts:
        parallelize(model, topo, PLAN)
    if "ac" in parts:
        checkpoint_activations(model)
    if "shard" in parts:
        shard(model, topo)
    return model


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_composes_with_shard_tp_checkpointing_and_accumulate(layout):
    axes, cases = LAYOUTS[layout]
    world = 1
    for size in axes.values():
        world *= size

    def rank(topo):
        return [
            train(build(topo, schedule, how), topo, micro=micro, sync=sync, accum=accum)
            for schedule, how, sync, accum, micro in cases
        ]

    results = td.in_process(rank, world, timeout=120, **axes)
    for r, out in enumerate(results):
        for (schedule, how, sync, accum, _), (params, losses, norms, report) in zip(
            cases, out, strict=True
        ):
            what = f"{layout} {schedule} {how or 'plain'} sync={sync} accumulate={accum} rank {r}"
            check_matches(params, losses, norms, what=what)
            if sync:  # sync_grads averaged over dp (each pp rank's own dp group)
                assert not report["sync_grads"].get("steps_aside"), report


# --------------------------------------------------------------------------- errors
def test_bad_input_gets_a_clear_error():
    topo = td.Topology(world_size=4, rank=0, pp=4, dp_shard=1)  # not live: planning only
    with pytest.raises(ConfigError, match=r"unknown schedule 'Zigzag'.*GPipe"):
        pipeline(copy.deepcopy(MODEL0), topo, schedule="Zigzag")
    with pytest.raises(ShardingError, match=r"has 4 block\(s\).*8 stages \(pp=4 x 2 per rank\)"):
        pipeline(copy.deepcopy(MODEL0), topo, schedule="Interleaved1F1B")
    with pytest.raises(ConfigError, match="one stage per rank"):
        pipeline(copy.deepcopy(MODEL0), topo, schedule="GPipe", stages_per_rank=2)
    with pytest.raises(ShardingError, match="split_points must name the 3"):
        pipeline(copy.deepcopy(MODEL0), topo, split_points=["blocks.1"])
    with pytest.raises(ShardingError, match="not blocks"):
        pipeline(copy.deepcopy(MODEL0), topo, split_points=["blocks.1", "blocks.2", "nope"])
    with pytest.raises(ShardingError, match="not siblings"):
        pipeline(copy.deepcopy(MODEL0), topo, first=["blocks"])
    with pytest.raises(td.errors.TopologyError, match="live topology"):
        pipeline(copy.deepcopy(MODEL0), topo)
    with pytest.raises(CompositionError, match="pipeline after checkpoint_activations"):
        pipeline(checkpoint_activations(copy.deepcopy(MODEL0)), topo)
    with pytest.raises(ConfigError, match="microbatches"):
        pipeline_value_and_grad(F.mse_loss, microbatches=0)

    def rank(topo):
        plain = copy.deepcopy(MODEL0)
        step = pipeline_value_and_grad(F.mse_loss, microbatches=2)
        with pytest.raises(CompositionError, match="was not"):
            step(td.TrainState(plain), BATCHES[0])
        model = pipeline(copy.deepcopy(MODEL0), topo, split_points=["blocks.3"])
        assert sorted({n.split(".")[1] for n in full_params(model) if n.startswith("blocks")}) == (
            ["0", "1", "2"] if topo.rank == 0 else ["3"]
        )
        with pytest.raises(StepError, match="3 micro-batches do not divide the batch of 8"):
            pipeline_value_and_grad(F.mse_loss, microbatches=3)(td.TrainState(model), BATCHES[0])
        with pytest.raises(StepError, match=r"batches of \(inputs, target\)"):
            step(td.TrainState(model), BATCHES[0][0])
        # autocast: the whole schedule runs under it; bf16 moves the loss a little, not far.
        bf16 = compose(autocast(torch.bfloat16))(
            pipeline_value_and_grad(F.mse_loss, microbatches=2)
        )
        loss16 = bf16(td.TrainState(model), BATCHES[0])[1]["loss"]
        loss32 = step(td.TrainState(model), BATCHES[0])[1]["loss"]
        assert loss16.dtype == torch.float32 and loss16 != loss32
        torch.testing.assert_close(loss16, REF_LOSSES[0], rtol=2e-2, atol=0)
        with pytest.raises(CompositionError, match="replicate after pipeline.*sync_grads"):
            from torchdist.sharding import replicate

            replicate(pipeline(copy.deepcopy(MODEL0), topo), topo)
        zbv = shard(pipeline(copy.deepcopy(MODEL0), topo, schedule="ZBVZeroBubble"), topo)
        with pytest.raises(CompositionError, match="ZBVZeroBubble.*With shard use GPipe, 1F1B"):
            step(td.TrainState(zbv), BATCHES[0])
        return True

    assert td.in_process(rank, 2, pp=2, dp_shard=1) == [True, True]


def test_axes_need_their_transform():
    from torchdist._axes import check_axes_used, unused_axes

    topo = td.Topology(world_size=4, rank=0, pp=2, cp=2, dp_shard=1)
    with pytest.raises(td.errors.TopologyError, match=r"pp=2, cp=2.*pipeline\(model.*context_para"):
        check_axes_used(topo, MODEL0)
    assert unused_axes(topo, MODEL0, uses=("context_parallel",)) == ("pp",)
    from torchdist.marks import mark

    marked = mark(copy.deepcopy(MODEL0), "pipeline")
    assert unused_axes(topo, marked, uses=("context_parallel",)) == ()


def test_a_plain_value_and_grad_step_is_unchanged_by_pipeline_hooks():
    """clip_grads' pp all-reduce only acts on pipelined models (no world needed here)."""
    model = copy.deepcopy(MODEL0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = compose(optimize(opt), clip_grads(MAX_NORM))(
        value_and_grad(lambda m, b: F.mse_loss(m(b[0]), b[1]))
    )
    state, losses, norms = td.TrainState(model, opt), [], []
    for batch in BATCHES:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    check_matches(full_params(model), losses, norms, what="value_and_grad")


def test_memory_estimates_account_for_pp_and_cp():
    from torchdist.memory import activation_bytes, estimate

    config = {"hidden_size": 512, "num_hidden_layers": 8, "vocab_size": 1000,
              "intermediate_size": 2048, "num_attention_heads": 8}  # fmt: skip
    one = td.Topology(world_size=1)
    pp2 = td.Topology(world_size=2, pp=2, dp_shard=1)
    cp2 = td.Topology(world_size=2, cp=2, dp_shard=1)
    assert estimate(1e9, pp2)["replicate"].total == estimate(1e9, one)["replicate"].total / 2
    assert estimate(1e9, cp2)["replicate"].total == estimate(1e9, one)["replicate"].total
    base = activation_bytes(config, seq=256, batch=2, topo=one)
    # cp halves the tokens a rank holds: every term halves.
    assert activation_bytes(config, seq=256, batch=2, topo=cp2) == pytest.approx(base / 2)
    # 1F1B: the first stage keeps pp micro-batches of its layers alive (all 8 layers' worth,
    # no logits); GPipe with 4 micro-batches keeps 4.
    half = activation_bytes({**config, "num_hidden_layers": 4}, seq=256, batch=2, topo=one)
    logits = base - 2 * (base - half)  # base = 8 layers + logits, half = 4 layers + logits
    assert activation_bytes(config, seq=256, batch=2, topo=pp2) == pytest.approx(base - logits)
    gpipe = activation_bytes(config, seq=256, batch=2, topo=pp2, in_flight=4)
    assert gpipe == pytest.approx(2 * (base - logits))
    ckpt = activation_bytes(config, seq=256, batch=2, topo=pp2, checkpointing=True)
    assert ckpt < activation_bytes(config, seq=256, batch=2, topo=one, checkpointing=True)
