"""Numerics of the sharding transforms in in-process worlds (ranks are threads with real gloo).

The oracle is parity (DESIGN.md): N-rank training of a ``shard``-ed / ``replicate``-d /
``parallelize``-d model, each rank on its share of the global batch, must end where a hand-written
single-process torch loop on the whole global batch ends (fp32, SGD, 3 steps, atol 1e-6), and the
``grad_norm`` that ``clip_grads`` reports must be torch's ``clip_grad_norm_`` on one process.

Collectives are counted with wrappers around the ``torch.distributed`` functions FSDP2 calls in
torch 2.13 (``_fsdp_collectives.py``: ``dist.reduce_scatter_single`` for gradients,
``dist.all_gather_single`` for parameters, ``dist.all_reduce`` across ``dp_replicate`` for HSDP);
each wrapper calls the real collective. DDP's reducer issues its all-reduces from C++, so for
``replicate`` we count with the c10d sequence number of the data-parallel group.

Ranks share the global RNG, so the model and data are built once, from fixed seeds, outside the
rank functions, and every rank deep-copies them.
"""

from __future__ import annotations

import collections
import copy
import functools
import threading
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from _seeded import seeded
from _sharding_models import PLAN, Model

import torchdist as td
from torchdist.sharding import MixedPrecision, materialize, parallelize, replicate, shard
from torchdist.transforms import (
    accumulate,
    checkpoint_activations,
    clip_grads,
    compose,
    optimize,
    sync_grads,
    value_and_grad,
)
from torchdist.transforms._accumulate import split_batch

STEPS, GLOBAL_BATCH, LR, MAX_NORM, ATOL = 3, 16, 0.1, 0.5, 1e-6
UNITS = 3  # FSDP units of Model under shard(): its two repeated blocks and the root
# Under DETAIL, replicate gives DDP a group of its own (torch 2.13's DDP crashes on a DETAIL-
# wrapped group); at INFO it uses the topology's "dp" group, whose collectives we count.
DDP_DEBUG = "INFO"


# --------------------------------------------------------------------------- model and data



MODEL0 = seeded(0, Model)
_GEN = torch.Generator().manual_seed(1)
BATCHES = [
    (torch.randn(GLOBAL_BATCH, 8, generator=_GEN), torch.randn(GLOBAL_BATCH, 5, generator=_GEN))
    for _ in range(STEPS)
]


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x).float(), y)


def pattern(name: str, shape) -> torch.Tensor:
    """Deterministic, position-dependent values for parameter ``name`` (no RNG involved)."""
    n, scale = torch.Size(shape).numel(), 0.5 / shape[-1] ** 0.5 if len(shape) > 1 else 0.1
    phase = zlib.crc32(name.encode()) % 1000
    return scale * torch.sin(torch.arange(n, dtype=torch.float32) * 0.37 + phase).reshape(shape)


@torch.no_grad()
def pattern_init(model: nn.Module) -> None:
    """An ``init=`` for ``materialize``: the same values on a sharded or a plain model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in model.named_parameters():
        full = pattern(name, param.shape)
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements)
        param.copy_(full)


MODEL_PATTERN = copy.deepcopy(MODEL0)
pattern_init(MODEL_PATTERN)


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter gathered to its full value (a collective for DTensors: all ranks call it)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --------------------------------------------------------------------------- single-process oracle
@functools.cache
def reference(config: str, start: str = "model0", repeat: int = 1):
    """Hand-written torch on the whole global batch: (final params, clip_grad_norm_ values)."""
    model = copy.deepcopy(MODEL0 if start == "model0" else MODEL_PATTERN)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    norms = []
    for x, y in BATCHES * repeat:
        if config == "plain":
            loss_fn(model, (x, y)).backward()
        else:
            for mx, my in zip(x.chunk(2), y.chunk(2), strict=True):
                (loss_fn(model, (mx, my)) / 2).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        opt.step()
        opt.zero_grad()
    return full_params(model), norms


def build(topo, how: str, model0: nn.Module = MODEL0) -> nn.Module:
    """Apply the model transforms named in ``how`` ("tp+shard"), first to last."""
    model = copy.deepcopy(model0)
    for part in how.split("+"):
        if part == "shard":
            shard(model, topo)
        elif part == "shard_mesh":  # a DeviceMesh instead of the topology: 1-D, or 2-D for HSDP
            used = tuple(a for a in ("dp_replicate", "dp_shard") if topo.size(a) > 1)
            shard(model, topo.mesh[used] if len(used) > 1 else topo.mesh[used[0]])
        elif part == "replicate":
            replicate(model, topo)
        elif part == "tp":
            parallelize(model, topo, PLAN)
        elif part.startswith("ca_"):
            checkpoint_activations(model, policy=part[3:])
        else:
            raise AssertionError(part)
    return model


def train(model, topo, config: str, batches=BATCHES):
    """Train in place with the composed step; return (full params, grad norms, losses, info)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    inner = [sync_grads(topo)]
    if config == "accumulate_clip":
        inner = [clip_grads(MAX_NORM), sync_grads(topo), accumulate(2)]
    step = compose(optimize(opt), *inner)(value_and_grad(loss_fn))
    state = step.init(td.TrainState(model=model, optimizer=opt))
    k = 2 if config == "accumulate_clip" else 1  # accumulate(2): each batch as two calls
    norms, losses = [], []
    for x, y in batches:
        local = td.split_between_ranks({"x": x, "y": y}, topo, axis="dp")
        micro_losses = []
        for micro in split_batch((local["x"], local["y"]), k):
            state, metrics = step(state, micro)
            micro_losses.append(metrics["loss"])
        losses.append(torch.stack(micro_losses).mean().item())
        if "grad_norm" in metrics:
            norms.append(metrics["grad_norm"].detach().clone())
    assert state.step == len(batches) * k
    return full_params(model), norms, losses, step.report(state)["sync_grads"]


# --------------------------------------------------------------------------- parity
CASES = {  # name: (world size, mesh axes, model transforms first to last, what sync_grads says)
    "shard-2": (2, {}, "shard", "torchdist.shard"),
    "shard-2-mesh": (2, {}, "shard_mesh", "torchdist.shard"),
    "shard-4": (4, {}, "shard", "torchdist.shard"),
    "hsdp-2x2": (4, dict(dp_replicate=2, dp_shard=2), "shard", "torchdist.shard"),
    "hsdp-2x2-mesh": (4, dict(dp_replicate=2, dp_shard=2), "shard_mesh", "torchdist.shard"),
    "tp-2": (2, dict(tp=2), "tp", "one rank"),
    "tp+shard-2x2": (4, dict(dp_shard=2, tp=2), "tp+shard", "torchdist.shard"),
    "replicate-2": (2, dict(dp_replicate=2), "replicate", "DistributedDataParallel"),
    "ca_full+shard-2": (2, {}, "ca_full+shard", "torchdist.shard"),
    "ca_selective+shard-2": (2, {}, "ca_selective+shard", "torchdist.shard"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_matches_single_process(case):
    world, axes, how, reason = CASES[case]

    def rank(topo):
        return {
            config: train(build(topo, how), topo, config) for config in ("plain", "accumulate_clip")
        }

    results = td.in_process(rank, world, **axes)  # DETAIL: replicate copes with it
    for config in ("plain", "accumulate_clip"):
        ref_params, ref_norms = reference(config)
        for r, out in enumerate(results):
            params, norms, _, info = out[config]
            diff = max_diff(params, ref_params)
            assert diff <= ATOL, f"{case} {config}: rank {r} is {diff:.2e} from one process"
            # sync_grads saw who syncs and did not average a second time (parity shows the rest).
            assert reason in info.get("steps_aside", ""), info
            assert "buckets" not in info
            if config == "accumulate_clip":
                torch.testing.assert_close(
                    torch.stack(norms), torch.stack(ref_norms), rtol=1e-5, atol=ATOL
                )
    assert max(n.item() for n in reference("accumulate_clip")[1]) > MAX_NORM  # clipping acted
    assert max_diff(reference("plain")[0], full_params(MODEL0)) > 1e-3  # and it trained


# --------------------------------------------------------------------------- collectives
@pytest.fixture
def comm_log(monkeypatch):
    """Per rank thread, ``(function, dtype)`` of each collective FSDP2 issues; the real one runs."""
    log: dict[str, list] = collections.defaultdict(list)

    def counting(name, real, tensor_index):
        def wrapper(*args, **kwargs):
            tensor = (list(args) + list(kwargs.values()))[tensor_index]
            log[threading.current_thread().name].append((name, tensor.dtype))
            return real(*args, **kwargs)

        return wrapper

    # all_reduce's tensor is its first argument; the *_single ones' input is their second.
    for name, index in (("reduce_scatter_single", 1), ("all_gather_single", 1), ("all_reduce", 0)):
        monkeypatch.setattr(dist, name, counting(name, getattr(dist, name), index))
    return log


def _count(entries, name: str) -> int:
    return sum(1 for n, _ in entries if n == name)


@pytest.mark.parametrize("case", ["shard-2", "hsdp-2x2"])
def test_accumulate_turns_off_fsdp_gradient_communication(case, comm_log):
    world, axes, _, _ = CASES[case]
    hsdp = bool(axes)

    def rank(topo):
        me = threading.current_thread().name
        out = {}
        for n in (1, 4):
            model = shard(copy.deepcopy(MODEL0), topo)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            step = compose(optimize(opt), sync_grads(topo), accumulate(n))(
                value_and_grad(loss_fn)
            )
            state, per_step, per_micro = step.init(td.TrainState(model, opt)), [], []
            for x, y in BATCHES:
                before = len(comm_log[me])
                local = td.split_between_ranks({"x": x, "y": y}, topo, axis="dp")
                for micro in split_batch((local["x"], local["y"]), n):  # one call per micro
                    call_before = len(comm_log[me])
                    state, _ = step(state, micro)
                    per_micro.append(comm_log[me][call_before:])
                per_step.append(comm_log[me][before:])
            out[n] = per_step, per_micro, full_params(model), step.report(state)["sync_grads"]
        return out

    results = td.in_process(rank, world, **axes)
    assert set(comm_log) == {f"torchdist-rank{r}" for r in range(world)}  # only rank threads
    for out in results:
        for n in (1, 4):
            per_step, per_micro, _, info = out[n]
            assert "torchdist.shard" in info["steps_aside"]
            assert len(per_micro) == n * STEPS
            # One reduce-scatter per FSDP unit per optimizer step (HSDP: and one all-reduce
            # across dp_replicate), whether or not the step accumulates ...
            for entries in per_step:
                assert _count(entries, "reduce_scatter_single") == UNITS
                assert _count(entries, "all_reduce") == (UNITS if hsdp else 0)
            # ... all of it in the last micro-step's backward, none on micro-steps 0..n-2.
            rs = [_count(e, "reduce_scatter_single") for e in per_micro]
            ar = [_count(e, "all_reduce") for e in per_micro]
            assert rs == ([0] * (n - 1) + [UNITS]) * STEPS
            assert ar == ([0] * (n - 1) + [UNITS if hsdp else 0]) * STEPS
            # Parameters are still gathered for every micro-batch's forward.
            assert all(_count(e, "all_gather_single") >= UNITS for e in per_micro)
            assert {dtype for e in per_step for _, dtype in e} == {torch.float32}
        assert max_diff(out[1][2], out[4][2]) <= ATOL  # same training, fewer messages
        assert max_diff(out[4][2], reference("plain")[0]) <= ATOL


def _seq(group) -> int:
    return group._get_sequence_number_for_group()


def test_accumulate_turns_off_ddp_sync_on_replicate():
    def rank(topo):
        group = topo.submesh("dp").get_group()
        out = {}
        for n in (1, 4):
            model = replicate(copy.deepcopy(MODEL0), topo)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            step = compose(optimize(opt), sync_grads(topo), accumulate(n))(
                value_and_grad(loss_fn)
            )
            state, per_step, per_micro = td.TrainState(model=model, optimizer=opt), [], []
            for x, y in BATCHES * 2:
                before = _seq(group)
                local = td.split_between_ranks({"x": x, "y": y}, topo, axis="dp")
                for micro in split_batch((local["x"], local["y"]), n):  # one call per micro
                    call_before = _seq(group)
                    state, _ = step(state, micro)
                    per_micro.append(_seq(group) - call_before)
                per_step.append(_seq(group) - before)
            out[n] = per_step, per_micro, full_params(model)
        return out

    for out in td.in_process(rank, 2, debug=DDP_DEBUG, dp_replicate=2):
        (steps1, _, params1), (steps4, micro4, params4) = out[1], out[4]
        # DDP's first forward broadcasts rank 0's parameters, and the forward after its first
        # synced backward rebuilds its buckets (also collectives). From the third step on, an
        # accumulated step communicates exactly what an unaccumulated one does: one all-reduce
        # per bucket (one bucket here) ...
        assert steps1[2:] == steps4[2:] == [1] * (2 * STEPS - 2)
        # ... on the last micro-batch.
        assert micro4[8:] == [0, 0, 0, 1] * (2 * STEPS - 2)
        assert max_diff(params1, params4) <= ATOL
        assert max_diff(params4, reference("plain", repeat=2)[0]) <= ATOL


# --------------------------------------------------------------------------- meta device
def test_shard_on_meta_device_then_materialize_trains_like_the_eager_model():
    def rank(topo):
        out = {}
        for how in ("full_state_dict", "init"):
            with torch.device("meta"):
                model = Model()
            shard(model, topo)
            assert all(p.device.type == "meta" for p in model.parameters())
            if how == "full_state_dict":  # needed on rank 0 only
                materialize(
                    model, "cpu", full_state_dict=MODEL0.state_dict() if topo.rank == 0 else {}
                )
            else:
                materialize(model, "cpu", init=pattern_init)
            assert all(p.to_local().device.type == "cpu" for p in model.parameters())
            initial = full_params(model)
            out[how] = initial, train(model, topo, "plain")[0]
        return out

    for out in td.in_process(rank, 2):
        for how, start in (("full_state_dict", "model0"), ("init", "pattern")):
            initial, trained = out[how]
            assert (
                max_diff(initial, full_params(MODEL0 if start == "model0" else MODEL_PATTERN)) == 0
            )
            assert max_diff(trained, reference("plain", start)[0]) <= ATOL


# --------------------------------------------------------------------------- mixed precision
def test_mixed_precision_bf16_tracks_fp32(comm_log):
    longer = BATCHES * 2

    def rank(topo):
        me = threading.current_thread().name
        fp32 = train(shard(copy.deepcopy(MODEL0), topo), topo, "plain", longer)
        model = shard(
            copy.deepcopy(MODEL0), topo, mixed_precision=MixedPrecision(param_dtype=torch.bfloat16)
        )
        before = len(comm_log[me])
        bf16 = train(model, topo, "plain", longer)
        master = {p.to_local().dtype for p in model.parameters()}
        # A forward outside training, last: it leaves the root's parameters unsharded, and an
        # optimizer built after it would hold those instead of the shards (an FSDP2 property).
        with torch.no_grad():
            out_dtype = model(BATCHES[0][0][:2]).dtype
        return fp32, bf16, out_dtype, master, comm_log[me][before:]

    for fp32, bf16, out_dtype, master, comms in td.in_process(rank, 2):
        assert out_dtype == torch.bfloat16  # computed in bf16 ...
        assert master == {torch.float32}  # ... from fp32 master shards the optimizer updates
        assert {d for n, d in comms if n == "all_gather_single"} == {torch.bfloat16}
        assert {d for n, d in comms if n == "reduce_scatter_single"} == {torch.float32}
        losses32, losses16 = torch.tensor(fp32[2]), torch.tensor(bf16[2])
        assert not torch.equal(losses32, losses16)  # bf16 did change the numbers ...
        torch.testing.assert_close(losses16, losses32, rtol=2e-2, atol=1e-3)  # ... within bf16
        assert losses16[STEPS:].sum() < losses16[:STEPS].sum()  # and it trains (same batches)
        assert max_diff(bf16[0], fp32[0]) < 2e-2
