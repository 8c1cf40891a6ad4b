"""The step-transform protocol (issue 11): transform state is data in ``TrainState``.

What a user ported from Accelerate relies on: ``accumulate(k)`` steps the optimizer and the
scheduler once per ``k`` calls and says which call did; a checkpoint saved in the middle of an
accumulation window resumes bit-exact (single process, 2 ranks with ``sync_grads``, FSDP2 with
``sync_each_batch``; FSDP2 without it refuses, naming the fix); what each transform decided is
known before the first call and is the same for every step built from one transform; the
per-call context never lands in the state; a non-finite loss or gradient norm never reaches the
weights; an optimizer that misses trainable parameters is refused when the step is bound.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdist as td
from torchdist import checkpoint
from torchdist.errors import CheckpointError, CompositionError, StepError
from torchdist.transforms import (
    accumulate,
    autocast,
    clip_grads,
    compose,
    optimize,
    sync_grads,
    value_and_grad,
)

LR = 0.1


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


torch.manual_seed(0)
_INIT = _mlp().state_dict()  # built once: in-process ranks are threads sharing torch's RNG


def make_mlp() -> nn.Module:
    model = _mlp()
    model.load_state_dict(_INIT)
    return model


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def batches(n: int, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 8, generator=gen), torch.randn(size, 1, generator=gen))
            for _ in range(n)]  # fmt: skip


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max():.3e}"


def sgd_with_schedule(model: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


# --------------------------------------------------------------------------- accumulate(k)
def test_accumulate_steps_optimizer_and_scheduler_once_per_k_calls():
    model, reference = make_mlp(), make_mlp()
    opt, sched = sgd_with_schedule(model)
    step = compose(optimize(opt), clip_grads(1e3), accumulate(3))(value_and_grad(loss_fn))
    state = step.init(td.TrainState(model, opt, scheduler=sched))
    assert state.transforms["accumulate"].count == 0
    ref_opt, ref_sched = sgd_with_schedule(reference)
    data = batches(6)
    updates, before = [], params_of(model)
    for i, batch in enumerate(data):
        state, metrics = step(state, batch)
        updates.append(bool(metrics["update"]))
        assert ("grad_norm" in metrics) == updates[-1]  # clip_grads reports on updates only
        if i % 3 < 2:  # mid-window: nothing moved, the partial sum is in .grad
            assert_equal(params_of(model), before)
            assert all(p.grad is not None for p in model.parameters())
        else:  # the oracle: one plain step on the window's three batches concatenated
            window = data[i - 2 : i + 1]
            x, y = (torch.cat(t) for t in zip(*window, strict=True))
            loss_fn(reference, (x, y)).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            ref_sched.step()
            got, want = params_of(model), params_of(reference)
            for key in want:
                torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
            before = got
    assert updates == [False, False, True, False, False, True]
    assert sched.last_epoch == 2 and state.step == 6
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.25)


def _run_and_resume(make_step, tmp_path, *, calls: int, split: int, world_topo=None):
    """Train ``calls`` calls straight; and ``split`` calls, save, load into a fresh model, the
    rest. Returns both final parameter sets and the loaded state's accumulate count."""
    topo = world_topo or td.Topology.single()
    data = batches(calls, seed=3 + topo.rank)

    def fresh():
        model = make_mlp()
        opt, sched = sgd_with_schedule(model)
        step = make_step(topo, opt)
        return step, step.init(td.TrainState(model, opt, scheduler=sched))

    step, state = fresh()
    for batch in data:
        state, _ = step(state, batch)
    straight = params_of(state.model)

    step, state = fresh()
    for batch in data[:split]:
        state, _ = step(state, batch)
    checkpoint.save(tmp_path, state, topo)
    step, state = fresh()
    with torch.no_grad():  # a different starting point, so the load must overwrite it
        for p in state.model.parameters():
            p.add_(1.0)
    state = checkpoint.load(tmp_path, state, topo)
    count = state.transforms["accumulate"].count
    for batch in data[split:]:
        state, _ = step(state, batch)
    return straight, params_of(state.model), count, state.step


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_mid_window_checkpoint_resumes_bit_exact(tmp_path, precision):
    def make_step(topo, opt):
        inner = [clip_grads(1.0), accumulate(4)]
        if precision == "fp16":  # the loss scale is transform state too
            inner.append(autocast(torch.float16, init_scale=2.0**8))
        return compose(optimize(opt), *inner)(value_and_grad(loss_fn))

    straight, resumed, count, steps = _run_and_resume(make_step, tmp_path, calls=10, split=6)
    assert count == 2 and steps == 10  # saved 2 micro-batches into a window
    assert_equal(resumed, straight)


def test_resuming_mid_window_with_another_k_is_refused(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = compose(optimize(opt), accumulate(4))(value_and_grad(loss_fn))
    state = step.init(td.TrainState(model, opt))
    state, _ = step(state, batches(1)[0])
    checkpoint.save(tmp_path, state, td.Topology.single())
    other = compose(optimize(opt), accumulate(2))(value_and_grad(loss_fn))
    loaded = checkpoint.load(tmp_path, td.TrainState(model, opt), td.Topology.single())
    with pytest.raises(CompositionError, match=r"1 micro-batch\(es\) into an accumulate\(4\)"):
        other.init(loaded)


def _sync_grads_resume(topo, tmp_path):
    def make_step(topo, opt):
        return compose(optimize(opt), clip_grads(1.0), sync_grads(topo), accumulate(3))(
            value_and_grad(loss_fn)
        )

    return _run_and_resume(make_step, tmp_path, calls=7, split=4, world_topo=topo)


def test_mid_window_resume_with_sync_grads_on_two_ranks(tmp_path):
    results = td.in_process(_sync_grads_resume, 2, tmp_path, timeout=120)
    for straight, resumed, count, _ in results:
        assert count == 1
        assert_equal(resumed, straight)
    assert_equal(results[0][0], results[1][0])  # the ranks agree (each saved its partial sum)


def _sharded_accumulate(topo, tmp_path, sync_each_batch: bool):
    from torchdist.sharding import shard

    model0, data = make_mlp(), batches(4, seed=11)
    model = shard(copy.deepcopy(model0), topo)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = compose(optimize(opt), accumulate(2, sync_each_batch=sync_each_batch))(
        value_and_grad(loss_fn)
    )
    state = step.init(td.TrainState(model, opt))
    for x, y in data[:3]:
        state, _ = step(state, (td.split_between_ranks(x, topo), td.split_between_ranks(y, topo)))
    try:
        checkpoint.save(tmp_path, state, topo)  # one micro-batch into the second window
    except CheckpointError as exc:
        return str(exc)
    x, y = data[3]
    state, _ = step(state, (td.split_between_ranks(x, topo), td.split_between_ranks(y, topo)))
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for window in (data[:2], data[2:]):
        for batch in window:
            (loss_fn(ref, batch) / 2).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    return max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items())


def test_fsdp_mid_window_checkpoint_needs_sync_each_batch(tmp_path):
    refused = td.in_process(_sharded_accumulate, 2, tmp_path / "a", False, timeout=120)
    for message in refused:
        assert isinstance(message, str) and "sync_each_batch=True" in message
    assert not list((tmp_path / "a").glob("step_*"))  # nothing half-written
    diffs = td.in_process(_sharded_accumulate, 2, tmp_path / "b", True, timeout=120)
    assert all(isinstance(d, float) and d <= 1e-6 for d in diffs), diffs  # parity, and it saved
    assert list((tmp_path / "b").glob("step_*"))


# --------------------------------------------------------------------------- decided at init
def _two_steps_one_transform(topo):
    from torchdist.sharding import replicate

    transform = sync_grads(topo)
    plain = make_mlp()
    replicated = replicate(make_mlp(), topo)
    reports = []
    for model in (plain, replicated):
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        first = compose(optimize(opt), transform)(value_and_grad(loss_fn))
        second = transform(value_and_grad(loss_fn))
        state_a = first.init(td.TrainState(model, opt))
        state_b = second.init(td.TrainState(model))
        reports.append((first.report(state_a)["sync_grads"], second.report(state_b)["sync_grads"]))
    return reports


def test_what_a_transform_decided_is_known_at_init_and_the_same_for_every_step():
    for (plain_a, plain_b), (rep_a, rep_b) in td.in_process(_two_steps_one_transform, 2,
                                                            debug="INFO"):  # fmt: skip
        assert plain_a == plain_b and plain_a["buckets"] >= 1 and "steps_aside" not in plain_a
        assert rep_a == rep_b and "which syncs its gradients" in rep_a["steps_aside"]


def test_the_context_is_an_argument_never_state():
    assert {f.name for f in dataclasses.fields(td.TrainState)} == {
        "model", "optimizer", "step", "scheduler", "extra", "transforms"}  # fmt: skip
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = compose(optimize(opt), clip_grads(1.0), accumulate(2))(value_and_grad(loss_fn))
    state, _ = step(td.TrainState(model, opt), batches(1)[0])  # binds on the first call
    assert set(state.transforms) == {"optimize", "clip_grads", "accumulate"}
    assert [name for name, _ in step.chain] == ["value_and_grad", "accumulate", "clip_grads",
                                                "optimize"]  # fmt: skip
    assert step.info["accumulate"] == {"k": 2, "sync_each_batch": False}


def test_a_swapped_model_is_refused_instead_of_silently_unsynced():
    def rank(topo):
        model = make_mlp()
        step = sync_grads(topo)(value_and_grad(loss_fn))
        state = step.init(td.TrainState(model))
        with pytest.raises(CompositionError, match=r"step.init\(state.replace\(transforms=\{\}\)"):
            step(state.replace(model=make_mlp()), batches(1)[0])
        state, _ = step(step.init(state.replace(model=make_mlp(), transforms={})), batches(1)[0])
        return state.transforms["sync_grads"].buckets

    assert td.in_process(rank, 2) == [1, 1]


def test_no_public_module_name_is_shadowed_by_the_function_it_exports():
    import torchdist.transforms._sync_grads as module

    assert isinstance(module, types.ModuleType) and callable(module.sync_grads)
    for name in ("transforms", "sharding", "precision", "checkpoint", "runtime", "inference"):
        package = importlib.import_module(f"torchdist.{name}")
        for info in pkgutil.iter_modules(package.__path__):
            exported = getattr(package, info.name, None)
            if exported is not None:
                assert isinstance(exported, types.ModuleType), (
                    f"torchdist.{name}.{info.name} names both a module and {exported!r}"
                )


# --------------------------------------------------------------------------- loud, not silent
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_nonfinite_step_never_reaches_the_weights(where):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    bad_x, y = batches(1)[0]
    bad_x = bad_x.clone()
    bad_x[0, 0] = float("nan") if where == "loss" else float("inf")
    step = compose(optimize(opt), clip_grads(1.0))(value_and_grad(loss_fn))
    state = step.init(td.TrainState(model, opt))
    before = params_of(model)
    with pytest.raises(StepError, match=r"step 0: .*(loss|grad_norm)=(nan|inf).*nonfinite='skip'"):
        step(state, (bad_x, y))
    assert_equal(params_of(model), before)
    assert all(p.grad is None for p in model.parameters())  # the next call starts clean
    state, metrics = step(state, batches(1)[0])  # and trains on
    assert "skipped" not in metrics and not torch.equal(params_of(model)["0.weight"],
                                                        before["0.weight"])  # fmt: skip

    skipping = compose(optimize(opt, nonfinite="skip"), clip_grads(1.0))(value_and_grad(loss_fn))
    state = skipping.init(td.TrainState(model, opt))
    before = params_of(model)
    state, metrics = skipping(state, (bad_x, y))
    assert bool(metrics["skipped"]) and state.step == 1
    assert_equal(params_of(model), before)
    state, metrics = skipping(state, batches(1)[0])
    assert not bool(metrics["skipped"])


def test_an_optimizer_missing_trainable_parameters_is_refused_at_init():
    model = make_mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=LR)
    step = compose(optimize(opt), clip_grads(1.0))(value_and_grad(loss_fn))
    with pytest.raises(CompositionError, match=r"2 trainable parameter\(s\) are not in the "
                                               r"optimizer: 2.weight, 2.bias"):  # fmt: skip
        step.init(td.TrainState(model, opt))
    model[2].requires_grad_(False)  # frozen on purpose: accepted
    step.init(td.TrainState(model, opt))
    stale = torch.optim.SGD(make_mlp().parameters(), lr=LR)
    with pytest.raises(CompositionError, match=r"holds 4 tensor\(s\) that are not parameters"):
        optimize(stale)(value_and_grad(loss_fn)).init(td.TrainState(make_mlp(), stale))


def test_the_protocol_example_of_the_docs_runs_as_written():
    """docs/step_transforms.md's ten-line transform: state as data, the outcome flows up."""
    import pathlib
    import re

    from torchdist.transforms import Phase, StepTransform

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "step_transforms.md").read_text()
    source = re.search(r"```python\n(def every_other.*?)```", doc, re.S).group(1)
    scope = {"StepTransform": StepTransform, "Phase": Phase}
    exec(source, scope)  # noqa: S102 - the documented example, verbatim
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = compose(optimize(opt), scope["every_other"]())(value_and_grad(loss_fn))
    state = step.init(td.TrainState(model, opt))
    moved = []
    for batch in batches(4):
        before = params_of(model)["0.weight"]
        state, _ = step(state, batch)
        moved.append(not torch.equal(before, params_of(model)["0.weight"]))
    assert moved == [False, True, False, True] and state.transforms["every_other"] == {"calls": 4}
