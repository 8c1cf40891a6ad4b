"""examples/finetune_hf.py on 2 real ranks: train, checkpoint, resume exactly, export, reload in HF.

One ``td.spawn`` covers it all: a first run of 4 steps (checkpoints at 2 and 4), then, in the
same ranks, a second run from a copy of the step-2 checkpoint to step 4, which must reproduce
the first run's losses (resume repeats and skips no sample), then a third from the export as
``--model`` (a local checkpoint directory). The export is also loaded by
``AutoModelForCausalLM.from_pretrained`` in this process, with logits equal to the sharded
model's. ``export_safetensors(config=...)`` is checked on its own, without ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

import torchdist as td

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example():
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import finetune_hf

    return finetune_hf


def _train_twice(topo, root):
    ex = _example()
    small = "--steps 4 --save-every 2 --batch-size 2 --dim 32 --vocab 300 --seq-len 32".split()
    args = ex.parse(["--out", os.path.join(root, "a"), *small])
    first = ex.run(topo, args)
    if topo.rank == 0:  # the second run starts from the step-2 checkpoint only
        b = os.path.join(root, "b")
        os.makedirs(os.path.join(b, "ckpt"))
        shutil.copytree(os.path.join(args.out, "tokenizer"), os.path.join(b, "tokenizer"))
        step2 = "step_00000002"
        shutil.copytree(os.path.join(args.out, "ckpt", step2), os.path.join(b, "ckpt", step2))
    td.barrier(topo)
    args.out = os.path.join(root, "b")
    second = ex.run(topo, args)
    # Fine-tune further from the export (a local from_pretrained directory), one step.
    if topo.rank == 0:
        shutil.copytree(os.path.join(root, "a", "tokenizer"), os.path.join(root, "c", "tokenizer"))
    td.barrier(topo)
    args.out, args.model, args.steps = os.path.join(root, "c"), first["hf_dir"], 1
    third = ex.run(topo, args)
    return first, second, third


def test_finetune_example_trains_resumes_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    results = td.spawn(_train_twice, 2, str(tmp_path), timeout=240)
    (first, second, third), (first1, _, _) = results
    assert first["resumed_from"] is None and second["resumed_from"] == 2
    assert sorted(first["losses"]) == [1, 2, 3, 4] and sorted(second["losses"]) == [3, 4]
    for k in (3, 4):  # resumed mid-stream: same samples, same losses
        assert second["losses"][k] == pytest.approx(first["losses"][k], abs=1e-5)
    assert first["losses"] == first1["losses"]  # the logged loss is the all-reduced one
    assert third["losses"][1] < first["losses"][1]  # started from the trained weights
    assert os.path.exists(os.path.join(first["hf_dir"], "config.json"))
    model = AutoModelForCausalLM.from_pretrained(first["hf_dir"])
    probe = torch.arange(1, 9).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    torch.testing.assert_close(logits, first["logits"], atol=1e-5, rtol=1e-5)


def test_export_writes_hf_config(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from torchdist.checkpoint import export_safetensors

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(config)
    topo = td.Topology.single()
    files = export_safetensors(model, tmp_path / "auto", topo)
    assert os.path.basename(files[-1]) == "config.json"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "auto")
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    export_safetensors(model, tmp_path / "none", topo, config=None)
    assert not os.path.exists(tmp_path / "none" / "config.json")
    export_safetensors(torch.nn.Linear(2, 2), tmp_path / "dict", topo, config={"a": 1})
    assert json.loads((tmp_path / "dict" / "config.json").read_text()) == {"a": 1}
    with pytest.raises(td.CheckpointError, match="PretrainedConfig"):
        export_safetensors(model, tmp_path / "bad", topo, config=3)
