"""torchdist.precision on one process: fp8 conversion, recipes, convergence, errors.

Conversion is checked against the filter's own choice on a small GPT-style model
(``_precision_models.GPT``). Convergence: 50 steps of each fp8 recipe must end within 5% of the
same run in bf16 (``autocast(torch.bfloat16)``), from the same initialisation and batches. Every
error the precision transforms raise has a test; a missing torchao is simulated by hiding it in
``sys.modules`` (``None`` there makes ``import`` fail), restored afterwards. Low-bit optimizers
and MS-AMP are in ``test_precision_optim.py``, multi-rank checks in ``test_precision_dist.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys

import pytest
import torch
import torch.nn as nn
from _precision_models import DEFAULT_FP8_LAYERS, build_gpt, loss_fn, markov_batches

import torchdist as td
from torchdist.marks import after_optimizer_step_hooks, applied
from torchdist.precision import Float8Recipe, autocast_fp8, converted_layers, fp8_compatible
from torchdist.transforms import autocast, checkpoint_activations, compose, optimize, value_and_grad

torchao = pytest.importorskip("torchao")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
STEPS, BATCH, SEQ, LR = 50, 8, 16, 3e-3

# fp8 matmuls off oneDNN's reference kernel (conftest.py): the same results, 180x faster.
pytestmark = pytest.mark.usefixtures("emulated_fp8_matmuls")


def fp8_modules(model: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, m in model.named_modules() if isinstance(m, Float8Linear))


def hide_torchao(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchao", None)


# --------------------------------------------------------------------------- recipes
# That importing torchdist.precision (and building a recipe) loads no torchao, msamp or
# transformer_engine is checked in test_import_light.py, in the one interpreter it shares.


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_map_onto_torchao_configs(name):
    from torchao.float8 import Float8LinearConfig

    recipe = getattr(Float8Recipe, name)()
    expected = Float8LinearConfig.from_recipe_name(name)
    if name == "tensorwise":  # the one recipe with an fp8 all-gather, on by default
        assert recipe.fsdp_float8_all_gather
        expected = Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    assert recipe.to_torchao() == expected
    again = getattr(Float8Recipe, name)()
    assert recipe == again and hash(recipe) == hash(again)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.min_features = 3


def test_recipe_validation_names_the_fix():
    with pytest.raises(td.CompositionError, match="only the tensorwise recipe"):
        Float8Recipe("rowwise", fsdp_float8_all_gather=True)
    with pytest.raises(td.CompositionError, match=r"unknown recipe 'blockwise'.*tensorwise\(\)"):
        Float8Recipe("blockwise")
    with pytest.raises(td.CompositionError, match="predicate over"):
        Float8Recipe.rowwise(filter="blocks")
    with pytest.raises(td.CompositionError, match="min_features"):
        Float8Recipe.rowwise(min_features=-1)
    with pytest.raises(td.CompositionError, match="takes a Float8Recipe"):
        autocast_fp8(build_gpt(), "tensorwise")


# --------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("name", RECIPES)
def test_default_filter_converts_exactly_its_choice(name):
    model = build_gpt()
    recipe = getattr(Float8Recipe, name)()
    assert recipe.select(model) == DEFAULT_FP8_LAYERS  # pure: nothing converted yet
    assert fp8_modules(model) == ()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = autocast_fp8(model, recipe)
    assert out is model and applied(model) == ("autocast_fp8",)
    assert converted_layers(model) == fp8_modules(model) == DEFAULT_FP8_LAYERS
    skipped = {"adapter_down", "adapter_up", "head"}  # first outside the blocks, 24-wide, last
    assert {n for n, m in model.named_modules() if type(m) is nn.Linear} == skipped
    after = dict(model.named_parameters())  # names and values unchanged
    assert after.keys() == before.keys()
    for n, p in after.items():
        local = p._tensor if hasattr(p, "_tensor") else p
        assert torch.equal(local.detach(), before[n]), n
    assert "blocks.1.up" in str(converted_layers(model))  # printable as is


def test_custom_predicate_and_min_features_are_respected():
    by_name = Float8Recipe.rowwise(
        filter=lambda name, m: name.endswith(".up") or name == "adapter_down"
    )
    model = autocast_fp8(build_gpt(), by_name)
    # The predicate alone decides: the 24-wide adapter too (torch._scaled_mm on CPU accepts it).
    assert (
        converted_layers(model)
        == fp8_modules(model)
        == ("blocks.0.up", "blocks.1.up", "adapter_down")
    )
    model(markov_batches(1, 2, SEQ)[0][0]).sum().backward()
    # min_features: both in and out features must reach it (every Linear here has a 64 side).
    assert Float8Recipe.tensorwise(min_features=65).select(build_gpt()) == ()
    assert Float8Recipe.tensorwise(min_features=64).select(build_gpt()) == DEFAULT_FP8_LAYERS
    keep_edges = Float8Recipe.tensorwise(skip_first_last=False).select(build_gpt())
    assert keep_edges == DEFAULT_FP8_LAYERS + ("head",)  # 64 -> 64: divisible
    assert fp8_compatible(nn.Linear(32, 48)) and not fp8_compatible(nn.Linear(24, 48))
    assert not fp8_compatible(nn.Linear(32, 48), min_features=64) and not fp8_compatible(nn.ReLU())


def test_a_recipe_that_selects_nothing_is_an_error():
    with pytest.raises(td.CompositionError, match="the filter selected none"):
        autocast_fp8(build_gpt(), Float8Recipe.tensorwise(filter=lambda n, m: "nope" in n))
    small = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with pytest.raises(td.CompositionError, match="skips the first and last Linear"):
        autocast_fp8(small)
    assert applied(small) == () and not fp8_modules(small)


def test_the_order_that_works_composes_exactly():
    """autocast_fp8 -> checkpoint_activations: the recompute reruns the fp8 layers, same grads."""
    batch = markov_batches(1, 4, SEQ, seed=3)[0]
    plain = autocast_fp8(build_gpt(), Float8Recipe.rowwise())
    checkpointed = checkpoint_activations(autocast_fp8(build_gpt(), Float8Recipe.rowwise()))
    assert applied(checkpointed) == ("autocast_fp8", "checkpoint_activations")
    loss_fn(plain, batch).backward()
    loss_fn(checkpointed, batch).backward()
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_state_dict_round_trips_through_a_weights_only_load(tmp_path):
    model = autocast_fp8(build_gpt(seed=0), Float8Recipe.tensorwise())
    torch.save(model.state_dict(), tmp_path / "fp8.pt")
    fresh = autocast_fp8(build_gpt(seed=1), Float8Recipe.tensorwise())
    fresh.load_state_dict(torch.load(tmp_path / "fp8.pt", weights_only=True))
    x = markov_batches(1, 2, SEQ, seed=3)[0][0]
    assert torch.equal(fresh(x), model(x))


# --------------------------------------------------------------------------- order errors
def test_twice_raises_naming_the_order():
    model = autocast_fp8(build_gpt())
    with pytest.raises(
        td.CompositionError,
        match=r"after autocast_fp8.*apply autocast_fp8 once.*"
        r"autocast_fp8 -> pipeline -> parallelize",
    ):
        autocast_fp8(model, Float8Recipe.rowwise())
    assert converted_layers(model) == DEFAULT_FP8_LAYERS  # unchanged


def test_after_checkpoint_activations_raises():
    model = checkpoint_activations(build_gpt())
    with pytest.raises(
        td.CompositionError, match="after checkpoint_activations.*first to last: autocast_fp8"
    ):
        autocast_fp8(model)


@pytest.mark.parametrize("before", ["replicate", "parallelize", "deepspeed", "msamp"])
def test_after_any_later_transform_raises(before):
    from torchdist.marks import mark

    model = mark(build_gpt(), before)  # what those transforms leave on a model
    with pytest.raises(td.CompositionError, match=f"autocast_fp8 after {before}.*first to last"):
        autocast_fp8(model)


def test_torchao_float8_done_by_hand_is_refused():
    from torchao.float8 import convert_to_float8_training

    model = convert_to_float8_training(
        build_gpt(), module_filter_fn=lambda m, fqn: fqn == "blocks.1.up"
    )
    with pytest.raises(td.CompositionError, match="already torchao Float8Linear"):
        autocast_fp8(model)


def test_after_shard_raises_naming_the_order():
    def rank(topo):
        model = td.sharding.shard(build_gpt(), topo)
        with pytest.raises(
            td.CompositionError,
            match=r"after shard.*autocast_fp8 -> pipeline -> parallelize -> "
            r"checkpoint_activations -> compile -> shard",
        ):
            autocast_fp8(model)
        from torch.distributed.fsdp import fully_shard

        by_hand = fully_shard(build_gpt(), mesh=topo.submesh("dp_shard"))
        with pytest.raises(td.CompositionError, match="after fully_shard"):
            autocast_fp8(by_hand)
        return True

    assert td.in_process(rank, 1) == [True]


def test_missing_torchao_raises_an_import_error_naming_the_extra(monkeypatch):
    model = build_gpt()
    hide_torchao(monkeypatch)
    with pytest.raises(ImportError, match=r"pip install 'torchdist\[fp8\]'"):
        autocast_fp8(model, Float8Recipe.rowwise())
    assert applied(model) == () and converted_layers(model) == ()  # nothing half-done
    with pytest.raises(ImportError, match=r"low_bit_adamw.*torchdist\[fp8\]"):
        td.precision.low_bit_adamw(model.parameters())


def test_transformer_engine_missing_raises_with_install_line():
    try:  # TE is CUDA-only and not installed in CI
        import transformer_engine  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("transformer_engine is installed here")
    recipe = Float8Recipe.transformer_engine(amax_history_len=8)
    assert dict(recipe.options)["amax_history_len"] == 8
    model = build_gpt()
    with pytest.raises(
        ImportError, match=r"transformer_engine\[pytorch\].*Float8Recipe.tensorwise"
    ):
        autocast_fp8(model, recipe)
    assert applied(model) == ()


# --------------------------------------------------------------------------- hooks
def test_tensorwise_registers_the_scale_precompute_and_copies_rebind_it():
    model = autocast_fp8(build_gpt(), Float8Recipe.tensorwise())
    (hook,) = after_optimizer_step_hooks(model)
    assert hook.model is model and "precompute" in repr(hook)
    hook()  # a no-op until the model is sharded
    clone = copy.deepcopy(model)
    (clone_hook,) = after_optimizer_step_hooks(clone)
    assert clone_hook.model is clone and converted_layers(clone) == DEFAULT_FP8_LAYERS
    for name in ("rowwise", "rowwise_with_gw_hp"):  # no fp8 all-gather, no scales to precompute
        assert (
            after_optimizer_step_hooks(autocast_fp8(build_gpt(), getattr(Float8Recipe, name)()))
            == ()
        )
    no_gather = autocast_fp8(build_gpt(), Float8Recipe.tensorwise(fsdp_float8_all_gather=False))
    assert after_optimizer_step_hooks(no_gather) == ()


# --------------------------------------------------------------------------- convergence
# One block and 8 x 16 tokens a step: fp8 on CPU is bound by per-op overhead (casts, amaxes,
# tensor-subclass dispatch), not FLOPs, so fewer layers is what keeps 4 x 50 steps cheap.
MODEL0 = build_gpt(seed=0, layers=1, seq=SEQ)
BATCHES = markov_batches(STEPS, BATCH, SEQ, seed=1)


@functools.cache
def train(kind: str) -> tuple[float, ...]:
    """Losses of 50 AdamW steps from MODEL0 on BATCHES: "bf16" (autocast) or an fp8 recipe."""
    model, forward = copy.deepcopy(MODEL0), []
    if kind == "bf16":
        forward = [autocast(torch.bfloat16)]
    else:
        model = autocast_fp8(model, getattr(Float8Recipe, kind)())
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    step = compose(optimize(opt), *forward)(value_and_grad(loss_fn))
    state, losses = td.TrainState(model=model, optimizer=opt), []
    for batch in BATCHES:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"].item())
    return tuple(losses)


@pytest.mark.parametrize("name", RECIPES)
def test_fp8_converges_within_5_percent_of_bf16(name):
    fp8, bf16 = train(name), train("bf16")
    assert bf16[-1] < 0.6 * bf16[0]  # the reference itself learned (4.3 -> ~2.2 nats)
    assert abs(fp8[-1] - bf16[-1]) <= 0.05 * bf16[-1], (fp8[-1], bf16[-1])
