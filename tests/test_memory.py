"""Memory-estimate formulas (pure arithmetic)."""

from __future__ import annotations

import json

import pytest

from torchdist import Topology, TopologyError
from torchdist.memory import estimate, params_from_config


def test_mixed_precision_adam_formulas():
    p, n = 7e9, 8
    rows = estimate(p, Topology(world_size=n))
    assert rows["replicate"].total == 16 * p
    assert rows["zero1"].total == pytest.approx((4 + 12 / n) * p)
    assert rows["zero2"].total == pytest.approx((2 + 14 / n) * p)
    assert rows["shard"].total == pytest.approx(16 * p / n)


def test_hsdp_shards_over_dp_shard_only_and_tp_divides_everything():
    p = 1e9
    hsdp = estimate(p, Topology(world_size=8, dp_replicate=2, dp_shard=4))
    assert hsdp["shard"].total == pytest.approx(16 * p / 4)
    tp = estimate(p, Topology(world_size=8, tp=2))
    assert tp["replicate"].total == pytest.approx(16 * p / 2)
    assert tp["shard"].total == pytest.approx(16 * p / 8)


def test_low_bit_optimizers_shrink_only_the_optimizer_state():
    p = 1e9
    adam = estimate(p, Topology(world_size=1))["replicate"]
    eight = estimate(p, Topology(world_size=1), optimizer="adamw8bit")["replicate"]
    four = estimate(p, Topology(world_size=1), optimizer="adamw4bit")["replicate"]
    assert (adam.optimizer, eight.optimizer, four.optimizer) == (12 * p, 6 * p, 5 * p)
    assert adam.params == eight.params == four.params


def test_llama2_7b_config_counts_its_parameters(tmp_path):
    config = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "vocab_size": 32000}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert params_from_config(str(path)) == 6_738_415_616  # Llama-2-7B's published count


def test_gpt2_config_counts_its_parameters():
    config = {"n_embd": 768, "n_layer": 12, "vocab_size": 50257, "n_positions": 1024}
    assert params_from_config(config) == 124_439_808  # GPT-2 small, tied head


def test_bad_inputs_raise():
    with pytest.raises(TopologyError, match="no 'hidden_size' key"):
        params_from_config({"num_hidden_layers": 2})
    with pytest.raises(TopologyError, match="unknown optimizer"):
        estimate(1e9, Topology(), optimizer="lion")
    with pytest.raises(TopologyError, match="positive"):
        estimate(0, Topology())
