"""Single-process checks of the step transforms: composition rules, bad inputs, precision,
clipping, accumulation, compile and TrainState. No process group; milliseconds each, except the
one compile test.

Every reference is plain torch on a deep copy of the same model and batch.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import optree
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdist as td
from torchdist.errors import CompositionError, ConfigError, StepError
from torchdist.transforms import (
    accumulate,
    autocast,
    clip_grads,
    compile,
    compiled_regions,
    compose,
    microbatches,
    optimize,
    sync_grads,
    value_and_grad,
)
from torchdist.transforms._composition import CANONICAL_ORDER

LR = 0.1


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch[0], batch[1]
    return F.mse_loss(model(x), y)


def make_batch(size: int = 32):
    return torch.randn(size, 8), torch.randn(size, 1)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def assert_all_close(a, b, **kw):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, **kw)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR)


# --------------------------------------------------------------------------- composition
def test_clipping_inside_sync_grads_is_rejected_naming_the_order():
    with pytest.raises(CompositionError) as err:
        compose(sync_grads(td.Topology.single()), clip_grads(1.0))
    msg = str(err.value)
    assert "clip_grads must be outside sync_grads" in msg
    assert CANONICAL_ORDER in msg


def test_clipping_inside_sync_grads_error_says_why():
    # composition.py's _why has the reason for this case under the key
    # ("clip_grads", "sync_grads"), which is the order that works and never raises; the
    # wrong order raises with outer="sync_grads", inner="clip_grads" and gets no reason.
    with pytest.raises(CompositionError, match="synced across ranks before they are clipped"):
        compose(sync_grads(td.Topology.single()), clip_grads(1.0))


def test_sync_grads_twice_is_rejected():
    topo = td.Topology.single()
    with pytest.raises(CompositionError, match="sync_grads is applied twice") as err:
        compose(optimize(), sync_grads(topo), sync_grads(topo))
    assert CANONICAL_ORDER in str(err.value)
    once = sync_grads(topo)(value_and_grad(loss_fn))
    with pytest.raises(CompositionError, match="applied twice"):  # and by hand
        sync_grads(topo)(once)


def test_accumulate_outside_optimize_is_rejected():
    model = make_mlp()
    with pytest.raises(CompositionError) as err:
        compose(accumulate(2), optimize(sgd(model)))
    msg = str(err.value)
    assert "optimize must be outside accumulate" in msg
    assert "optimizer would step on every micro-batch" in msg
    assert CANONICAL_ORDER in msg


def test_transform_applied_by_hand_in_the_wrong_order_is_rejected():
    model = make_mlp()
    stepped = optimize(sgd(model))(value_and_grad(loss_fn))
    with pytest.raises(CompositionError) as err:
        clip_grads(1.0)(stepped)
    msg = str(err.value)
    assert "optimize must be outside clip_grads" in msg and CANONICAL_ORDER in msg
    with pytest.raises(CompositionError, match="sync_grads must be outside accumulate"):
        accumulate(2)(sync_grads(td.Topology.single())(value_and_grad(loss_fn)))


def test_compose_of_a_non_transform_is_rejected():
    with pytest.raises(CompositionError, match=r"compose\(\) takes step transforms"):
        compose(optimize(), lambda step: step)
    base = value_and_grad(loss_fn)
    with pytest.raises(CompositionError, match="looks like a step function"):
        compose(optimize(), base)
    with pytest.raises(CompositionError, match="Start from value_and_grad"):
        optimize()(42)


def test_nested_compose_equals_flat_compose():
    batches = [make_batch() for _ in range(3)]
    model0 = make_mlp()
    models = [copy.deepcopy(model0) for _ in range(3)]
    opts = [sgd(m) for m in models]
    flat = compose(optimize(opts[0]), clip_grads(0.5), accumulate(2))
    left = compose(compose(optimize(opts[1]), clip_grads(0.5)), accumulate(2))
    right = compose(optimize(opts[2]), compose(clip_grads(0.5), accumulate(2)))
    assert flat.name == left.name == right.name == "compose(optimize, clip_grads, accumulate)"
    steps = [c(value_and_grad(loss_fn)) for c in (flat, left, right)]
    assert steps[0].chain == steps[1].chain == steps[2].chain
    assert [name for name, _ in steps[0].chain] == [
        "value_and_grad",
        "accumulate",
        "clip_grads",
        "optimize",
    ]
    for step, model, opt in zip(steps, models, opts, strict=True):
        state = td.TrainState(model=model, optimizer=opt)
        for batch in batches:
            state, _ = step(state, batch)
    for model in models[1:]:
        for p, q in zip(models[0].parameters(), model.parameters(), strict=True):
            assert torch.equal(p, q)
    assert not torch.equal(models[0][0].weight, model0[0].weight)


def test_composed_equals_applied_by_hand():
    batches = [make_batch() for _ in range(3)]
    model0 = make_mlp()
    a, b = copy.deepcopy(model0), copy.deepcopy(model0)
    opt_a, opt_b = sgd(a), sgd(b)
    composed = compose(optimize(opt_a), clip_grads(0.5), accumulate(4))(value_and_grad(loss_fn))
    by_hand = optimize(opt_b)(clip_grads(0.5)(accumulate(4)(value_and_grad(loss_fn))))
    assert composed.chain == by_hand.chain
    assert composed.info.keys() == by_hand.info.keys()
    sa, sb = td.TrainState(model=a, optimizer=opt_a), td.TrainState(model=b, optimizer=opt_b)
    for batch in batches:
        for mx, my in zip(batch[0].chunk(4), batch[1].chunk(4), strict=True):
            sa, ma = composed(sa, (mx, my))
            sb, mb = by_hand(sb, (mx, my))
            assert torch.equal(ma["loss"], mb["loss"]) and torch.equal(ma["update"], mb["update"])
        assert torch.equal(ma["grad_norm"], mb["grad_norm"])  # the window's last call reports it
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- bad inputs
def test_step_error_is_exported_at_the_top_level():
    # torchdist/__init__.py imports every error type but StepError (not in the import nor
    # __all__), so `torchdist.StepError` raises AttributeError.
    assert getattr(td, "StepError", None) is StepError
    assert "StepError" in td.__all__


@pytest.mark.parametrize(
    "bad_loss, has_aux, fix",
    [
        (lambda m, b: (m(b[0]) - b[1]) ** 2, False, "Reduce it"),
        (lambda m, b: (loss_fn(m, b), loss_fn(m, b)), False, "has_aux=True"),
        (lambda m, b: loss_fn(m, b).item(), False, r"not loss\.item\(\)"),
        (lambda m, b: loss_fn(m, b), True, "return \\(loss, aux\\) or drop has_aux"),
        (lambda m, b: loss_fn(m, b).detach(), False, "does not require grad"),
    ],
    ids=["non-scalar", "tuple-without-has_aux", "python-float", "has_aux-not-tuple", "no-grad"],
)
def test_bad_loss_fn_raises_step_error_naming_the_fix(bad_loss, has_aux, fix):
    model = make_mlp()
    step = value_and_grad(bad_loss, has_aux=has_aux)
    with pytest.raises(StepError, match=fix):
        step(td.TrainState(model=model), make_batch())
    assert all(p.grad is None for p in model.parameters())  # nothing was backpropagated


def test_microbatches_of_an_indivisible_batch_raises():
    step = microbatches(3)(value_and_grad(loss_fn))
    with pytest.raises(StepError, match="divisible by 3"):
        step(td.TrainState(model=make_mlp()), make_batch(32))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="positive int"):
            accumulate(bad)
        with pytest.raises(ConfigError, match="positive int"):
            microbatches(bad)


def test_optimize_without_an_optimizer_raises():
    model = make_mlp()
    step = optimize()(value_and_grad(loss_fn))
    with pytest.raises(CompositionError, match=r"optimize\(opt\)|optimizer=opt"):
        step(td.TrainState(model=model), make_batch())
    other = compose(optimize(sgd(model)))(value_and_grad(loss_fn))
    with pytest.raises(CompositionError, match="different optimizer"):
        other(td.TrainState(model=model, optimizer=sgd(model)), make_batch())
    with pytest.raises(StepError, match="finite number > 0"):
        clip_grads(0.0)


# --------------------------------------------------------------------------- metrics
def test_has_aux_merges_into_metrics_and_metrics_are_tensors():
    model = make_mlp()

    def with_aux(model, batch):
        out = model(batch[0])
        loss = F.mse_loss(out, batch[1])
        return loss, {"mae": (out - batch[1]).abs().mean(), "out_max": out.max()}

    opt = sgd(model)
    step = compose(optimize(opt), clip_grads(1.0), microbatches(2))(
        value_and_grad(with_aux, has_aux=True)
    )
    batch = make_batch()
    reference = copy.deepcopy(model)
    state, metrics = step(td.TrainState(model=model, optimizer=opt), batch)
    assert set(metrics) == {"loss", "mae", "out_max", "grad_norm"}
    leaves = optree.tree_leaves(metrics)
    assert all(isinstance(leaf, torch.Tensor) and not leaf.requires_grad for leaf in leaves)
    with torch.no_grad():
        out = reference(batch[0])
        halves = [
            (o - y).abs().mean() for o, y in zip(out.chunk(2), batch[1].chunk(2), strict=True)
        ]
    torch.testing.assert_close(metrics["loss"], F.mse_loss(out, batch[1]))
    torch.testing.assert_close(metrics["mae"], torch.stack(halves).mean())  # mean of micro-batches

    plain = value_and_grad(lambda m, b: (loss_fn(m, b), torch.tensor(3.0)), has_aux=True)
    _, metrics = plain(td.TrainState(model=make_mlp()), batch)
    assert torch.equal(metrics["aux"], torch.tensor(3.0))


# --------------------------------------------------------------------------- accumulate
def test_microbatches_4_equals_one_step_on_the_whole_batch():
    model0, batch = make_mlp(), make_batch(32)
    whole, micro = copy.deepcopy(model0), copy.deepcopy(model0)
    _, m_whole = value_and_grad(loss_fn)(td.TrainState(model=whole), batch)
    step = microbatches(4)(value_and_grad(loss_fn))
    _, m_micro = step(td.TrainState(model=micro), batch)
    assert step.info["microbatches"]["micro_batches"] == 4
    assert_all_close(grads_of(micro), grads_of(whole), rtol=0, atol=1e-6)
    torch.testing.assert_close(m_micro["loss"], m_whole["loss"], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- clip_grads
@pytest.mark.parametrize("max_norm, norm_type", [(0.1, 2.0), (1e3, 2.0), (0.05, math.inf)])
def test_clip_grads_matches_torch_clip_grad_norm(max_norm, norm_type):
    model0, batch = make_mlp(), make_batch()
    ours, ref = copy.deepcopy(model0), copy.deepcopy(model0)
    _, metrics = clip_grads(max_norm, norm_type)(value_and_grad(loss_fn))(
        td.TrainState(model=ours), batch
    )
    loss_fn(ref, batch).backward()
    unclipped = grads_of(ref)
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
    torch.testing.assert_close(metrics["grad_norm"], expected, rtol=1e-6, atol=0)
    assert_all_close(grads_of(ours), grads_of(ref), rtol=1e-6, atol=1e-8)
    clipped = expected.item() > max_norm
    assert clipped == (max_norm < 1.0)  # the parametrization covers both cases
    changed = any(not torch.equal(g, u) for g, u in zip(grads_of(ours), unclipped, strict=True))
    assert changed == clipped


# --------------------------------------------------------------------------- precision
def _fp16_setup(init_scale=2.0**16, growth_interval=2000):
    model = make_mlp()
    opt = sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def scaled_loss(model, batch):  # batch[2] multiplies the loss: inf injects an overflow
        return loss_fn(model, batch) * batch[2]

    step = compose(
        optimize(opt, scheduler),
        clip_grads(10.0),
        autocast(torch.float16, init_scale=init_scale, growth_interval=growth_interval),
    )(value_and_grad(scaled_loss))
    return model, opt, scheduler, step


def test_fp16_overflow_skips_the_step_halves_the_scale_and_holds_the_scheduler():
    model, opt, scheduler, step = _fp16_setup()
    x, y = make_batch(16)
    fp32 = copy.deepcopy(model)
    state = td.TrainState(model=model, optimizer=opt)

    before = params_of(model)
    state, metrics = step(state, (x, y, torch.tensor(1.0)))  # a clean step applies
    assert metrics["skipped"].item() is False
    assert state.scaler.scale.item() == 2.0**16 and scheduler.last_epoch == 1
    # The applied update is fp32 SGD's up to fp16 forward error: the grads were unscaled.
    loss_fn(fp32, (x, y)).backward()
    expected_delta = [-LR * g for g in grads_of(fp32)]
    delta = [a - b for a, b in zip(params_of(model), before, strict=True)]
    assert_all_close(delta, expected_delta, rtol=5e-2, atol=2e-4)

    weights, scale, lr = params_of(model), state.scaler.scale.clone(), opt.param_groups[0]["lr"]
    state, metrics = step(state, (x, y, torch.tensor(float("inf"))))  # overflow
    assert isinstance(metrics["skipped"], torch.Tensor) and metrics["skipped"].item() is True
    assert state.scaler.scale.item() == scale.item() / 2
    assert all(torch.equal(p, w) for p, w in zip(params_of(model), weights, strict=True))
    assert scheduler.last_epoch == 1 and opt.param_groups[0]["lr"] == lr
    assert state.step == 2  # a skipped step still counts as a step
    assert all(p.grad is None for p in model.parameters())  # the bad grads were dropped

    state, metrics = step(state, (x, y, torch.tensor(1.0)))  # and training resumes
    assert metrics["skipped"].item() is False
    assert state.scaler.scale.item() == scale.item() / 2
    assert scheduler.last_epoch == 2 and opt.param_groups[0]["lr"] == lr / 2
    assert any(not torch.equal(p, w) for p, w in zip(params_of(model), weights, strict=True))
    assert torch.isfinite(metrics["grad_norm"])


def test_fp16_scale_grows_after_growth_interval_clean_steps():
    model, opt, _, step = _fp16_setup(init_scale=8.0, growth_interval=2)
    state = td.TrainState(model=model, optimizer=opt)
    x, y = make_batch(16)
    scales = []
    for _ in range(4):
        state, _ = step(state, (x, y, torch.tensor(1.0)))
        scales.append(state.scaler.scale.item())
    assert scales == [8.0, 16.0, 16.0, 32.0]


def test_fp16_grads_are_unscaled_on_every_step_without_optimize():
    # clip_grads leaves `found_inf` in the returned state's context when no optimize follows;
    # the next call's unscale_grads then believes it already ran and leaves the grads scaled
    # by the loss scale (grad_norm 65536x too large).
    model = make_mlp()
    step = compose(clip_grads(1e9), autocast(torch.float16))(value_and_grad(loss_fn))
    state, batch = td.TrainState(model=model), make_batch(16)
    norms = []
    for _ in range(2):
        state, metrics = step(state, batch)
        norms.append(metrics["grad_norm"])
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(norms[1], norms[0])


def test_bf16_autocast_runs_the_forward_in_bf16_and_matches_fp32():
    model0, batch = make_mlp(), make_batch()
    bf16, fp32 = copy.deepcopy(model0), copy.deepcopy(model0)
    dtypes = []
    bf16[0].register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    opt = sgd(bf16)
    step = compose(optimize(opt), clip_grads(1.0), autocast(torch.bfloat16))(
        value_and_grad(loss_fn)
    )
    state, metrics = step(td.TrainState(model=bf16, optimizer=opt), batch)
    _, ref = value_and_grad(loss_fn)(td.TrainState(model=fp32), batch)
    assert dtypes == [torch.bfloat16]
    assert state.scaler is None and "skipped" not in metrics
    torch.testing.assert_close(metrics["loss"].float(), ref["loss"], rtol=2e-2, atol=1e-3)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # master weights stay fp32
    assert any(
        not torch.equal(p, q) for p, q in zip(bf16.parameters(), model0.parameters(), strict=True)
    )
    with pytest.raises(CompositionError, match="autocast_fp8"):
        autocast(torch.float32)


# --------------------------------------------------------------------------- TrainState
def test_train_state_is_frozen_counts_steps_and_replaces():
    model = make_mlp()
    opt = sgd(model)
    state = td.TrainState(model=model, optimizer=opt)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.step = 5
    step = optimize()(value_and_grad(loss_fn))
    batch = make_batch()
    for expected in (1, 2, 3):
        new, _ = step(state, batch)
        assert new.step == expected and state.step == expected - 1
        assert new.model is model and new.optimizer is opt  # updated in place, same objects
        state = new
    other = state.replace(step=10, extra={"epoch": 1})
    assert other.step == 10 and other.extra == {"epoch": 1} and other.model is model
    assert state.step == 3 and state.extra == {}
    assert td.TrainState(model=model).extra is not td.TrainState(model=model).extra


# --------------------------------------------------------------------------- compile
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class TwoBlocks(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_compile_is_regional_and_matches_eager():
    torch._dynamo.reset()
    try:
        model0 = TwoBlocks()
        batches = [make_batch(16) for _ in range(3)]
        losses = {}
        steps = {}
        for mode in ("eager", "compiled"):
            model = copy.deepcopy(model0)
            if mode == "compiled":  # a model transform: blocks, then the head
                model = compile(model)
            opt = sgd(model)
            steps[mode] = compose(optimize(opt))(value_and_grad(loss_fn))
            state = td.TrainState(model=model, optimizer=opt)
            losses[mode] = []
            for batch in batches:
                state, metrics = steps[mode](state, batch)
                losses[mode].append(metrics["loss"])
        assert compiled_regions(model) == ("blocks.0", "blocks.1", "head")
        torch.testing.assert_close(
            torch.stack(losses["compiled"]), torch.stack(losses["eager"]), rtol=0, atol=1e-5
        )
    finally:
        torch._dynamo.reset()
