"""HF models need no extra user code: the layers every block-wise transform finds by default,
the tensor-parallel plan ``parallelize`` takes from the model, and the clear errors when neither
can be found (issue 12, item 2 and its bad inputs). One process, no ranks (a 1-rank world where
a transform needs a live topology); the multi-rank numerics are in ``test_hf_parity.py``.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
from _hf_models import BUILDERS, LAYERS, llama_config, model0, seeded, transformers

import torchdist as td
from torchdist.blocks import default_blocks, repeated_blocks
from torchdist.errors import ShardingError
from torchdist.precision import Float8Recipe, autocast_fp8, converted_layers
from torchdist.sharding import parallelize, shard
from torchdist.sharding._hf_plan import hf_tp_plan
from torchdist.transforms import checkpoint_activations, compile, compiled_regions


def one_layer_llama():
    return seeded(0, lambda: transformers.LlamaForCausalLM(llama_config(num_hidden_layers=1)))


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_the_default_blocks_are_the_decoder_layers(kind):
    assert tuple(n for n, _ in default_blocks(model0(kind))) == LAYERS[kind]


def test_a_one_layer_model_still_has_its_layer():
    model = one_layer_llama()
    assert repeated_blocks(model) == []  # the ModuleList rule alone finds nothing ...
    assert [n for n, _ in default_blocks(model)] == ["model.layers.0"]  # ... HF's names do
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    eager = model(ids).logits.sum()
    checkpoint_activations(model)
    torch.testing.assert_close(model(ids).logits.sum(), eager)
    # autocast_fp8's "skip the first and last layer" means the model's own edges (lm_head),
    # never one projection of a layer
    fp8 = autocast_fp8(one_layer_llama(), Float8Recipe.tensorwise())
    converted = converted_layers(fp8)
    assert "lm_head" not in converted
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"} <= set(converted)


def test_compile_compiles_each_layer_and_the_rest():
    model = copy.deepcopy(model0("llama")).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = model(ids).logits
    compile(model, backend="eager")  # the regions are the point here, not inductor's code
    regions = compiled_regions(model)
    assert regions[:2] == LAYERS["llama"]
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= set(regions[2:])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, eager, rtol=0, atol=1e-6)


class _TinyConfig(transformers.PretrainedConfig):
    model_type = "torchdist-tiny"


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.proj(x)


class _NoListModel(transformers.PreTrainedModel):
    """A transformers model whose layers sit in an nn.Sequential, not an nn.ModuleList."""

    config_class = _TinyConfig
    _no_split_modules = ["_Layer"]

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.Sequential(_Layer(), _Layer())

    def forward(self, x):
        return self.layers(x)


def test_an_hf_model_with_no_layers_found_needs_blocks():
    model = _NoListModel(_TinyConfig())
    with td.distributed(td.Topology.single()) as topo:
        with pytest.raises(
            ShardingError, match=r"shard: found no .*_no_split_modules \(\['_Layer'\]\).*blocks="
        ):
            shard(model, topo)
        for transform in (checkpoint_activations, compile):
            with pytest.raises(ShardingError, match="_no_split_modules.*blocks="):
                transform(copy.deepcopy(model))
        shard(model, topo, blocks=[_Layer])  # the way out works
    # a plain torch model without repeated blocks: checkpoint_activations has nothing to act on
    with pytest.raises(ShardingError, match="found no repeated blocks.*blocks="):
        checkpoint_activations(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)))


def test_parallelize_without_a_plan_uses_and_names_the_models_own(caplog):
    model = copy.deepcopy(model0("llama"))
    plan, source = hf_tp_plan(model)
    assert source == "LlamaForCausalLM.tp_plan" and plan == model.tp_plan
    # transformers 4.x instances may carry only config.base_model_tp_plan + the class's head plan
    older = copy.deepcopy(model0("llama"))
    older.tp_plan = None
    plan4, source4 = hf_tp_plan(older)
    assert source4 == "LlamaForCausalLM.config.base_model_tp_plan"
    assert plan4 == {k: v for k, v in plan.items() if k != "model.embed_tokens"}
    with td.distributed(td.Topology.single()) as topo:
        with caplog.at_level(logging.INFO, logger="torchdist.sharding"):
            parallelize(model, topo)
        assert "using LlamaForCausalLM.tp_plan (9 entries) over tp=1" in caplog.text
        assert td.marks.applied(model) == ("parallelize",)
        for kind in ("gpt2", "bert"):  # their configs carry no plan
            with pytest.raises(
                ShardingError,
                match=rf"{type(model0(kind)).__name__} has none of its own.*Pass a plan",
            ):
                parallelize(copy.deepcopy(model0(kind)), topo)
        with pytest.raises(ShardingError, match="Sequential has none of its own: looked for"):
            parallelize(nn.Sequential(nn.Linear(4, 4)), topo)


# That importing torchdist (these same modules) loads no transformers is checked in
# test_import_light.py, in the one fresh interpreter it shares with the other such checks.
