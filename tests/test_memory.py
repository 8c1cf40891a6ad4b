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


def test_fp32_has_no_master_copy_and_sgd_no_moments():
    p = 1e9
    fp32 = estimate(p, Topology(), dtype="fp32")["replicate"]
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * p, 4 * p, 8 * p)
    assert estimate(p, Topology(), optimizer="sgd")["replicate"].optimizer == 4 * p  # master only
    assert estimate(p, Topology(), optimizer="sgd", dtype="fp32")["replicate"].optimizer == 0
    with pytest.raises(TopologyError, match="unknown dtype"):
        estimate(p, Topology(), dtype="fp64")


LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000}  # fmt: skip


def test_activations_with_and_without_checkpointing():
    from torchdist.memory import activation_bytes

    gpt2 = {"n_embd": 768, "n_layer": 12, "vocab_size": 50257}
    s, b, h = 1024, 4, 768
    full = activation_bytes(gpt2, seq=s, batch=b)
    logits = 6 * s * b * 50257  # bf16 head output + its fp32 copy for the loss
    assert full == pytest.approx(12 * 34 * s * b * h + logits)  # Korthikanti's 34sbh per layer
    ckpt = activation_bytes(gpt2, seq=s, batch=b, checkpointing=True)
    assert ckpt == pytest.approx(12 * 2 * s * b * h + 34 * s * b * h + logits)
    tp = activation_bytes(LLAMA_7B, seq=s, batch=b, topo=Topology(world_size=2, tp=2))
    assert tp < activation_bytes(LLAMA_7B, seq=s, batch=b)
    fp32 = activation_bytes(gpt2, seq=s, batch=b, dtype="fp32")
    assert fp32 == pytest.approx(2 * (full - logits) + 4 * s * b * 50257)  # fp32 logits only
    with pytest.raises(TopologyError, match="hidden size"):
        activation_bytes({"vocab_size": 3}, seq=s, batch=b)


def test_multimodal_and_moe_configs():
    from torchdist.memory import params_from_config

    assert params_from_config({"text_config": LLAMA_7B}) == 6_738_415_616
    moe = params_from_config({**LLAMA_7B, "num_local_experts": 8})
    assert moe - 6_738_415_616 == 32 * (7 * 3 * 4096 * 11008 + 8 * 4096)
