"""The inference footprint `torchdist estimate-memory` prints: weights per dtype, largest layer."""

from __future__ import annotations

import json

import pytest

from torchdist.cli import main
from torchdist.memory import inference_table, largest_layer

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000}  # fmt: skip


def test_largest_layer_of_llama_7b_is_a_decoder_layer():
    name, count = largest_layer(LLAMA_7B)
    assert name == "decoder layer" and count == 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    tiny_layers = {**LLAMA_7B, "intermediate_size": 16, "vocab_size": 256000}
    assert largest_layer(tiny_layers) == ("embedding", 256000 * 4096)


def test_inference_table_per_dtype():
    table = inference_table(7e9, config=LLAMA_7B)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    assert float(rows["fp32"][0]) == pytest.approx(28e9 / 2**30, abs=0.01)
    assert float(rows["int4"][0]) == pytest.approx(3.5e9 / 2**30, abs=0.01)
    assert float(rows["bf16/fp16"][1]) == pytest.approx(2 * largest_layer(LLAMA_7B)[1] / 2**30,
                                                        abs=1e-3)  # fmt: skip
    assert "needs --model" in inference_table(7e9)


def test_estimate_memory_prints_the_inference_footprint(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    assert main(["estimate-memory", "--model", str(tmp_path / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "inference (weights only" in out and "largest layer: decoder layer, 202.4M" in out
