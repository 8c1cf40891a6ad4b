"""The Hugging Face checkpoint layout both ways (issue 12, item 5), on a tiny random-weight Llama.

* Out: a Llama trained under tp + shard on 4 ranks is exported with ``export_safetensors``
  (several files + index + ``config.json``); ``AutoModelForCausalLM.from_pretrained(dir)`` loads
  it in this process with the trained weights and the sharded model's logits.
* In: a directory written by transformers' own ``save_pretrained`` (several files + index) is
  read by ``load_safetensors`` into a plain model, a model built on the meta device and sharded
  on 2 ranks, and a meta model under tp + shard on 4 ranks: logits equal the saved model's.

Slice reading is checked independently of ``load_safetensors``' own count: a recording wrapper
around ``safetensors.safe_open`` (the real reader runs underneath) notes, per rank thread, every
``get_tensor`` and every indexed ``get_slice`` and the bytes each returned. Sharded ranks must
read only slices, and each rank's bytes must be exactly those of its local shards, and under FSDP
alone the ranks' bytes add up to the checkpoint (every parameter is split, nothing read twice).
"""

from __future__ import annotations

import collections
import copy
import json
import os
import threading

import pytest
import safetensors
import torch
from _hf_models import LR, batches, full_params, loss_fn, max_diff, model0, transformers

import torchdist as td
from torchdist.checkpoint import export_safetensors, load_safetensors
from torchdist.sharding import parallelize, shard
from torchdist.transforms import compose, optimize, value_and_grad

PROBE = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(7))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(PROBE).logits.detach().clone()


def _train_tp_shard_export(topo, root: str):
    model = shard(parallelize(copy.deepcopy(model0("llama")), topo), topo)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = compose(optimize(opt))(value_and_grad(loss_fn))
    state = td.TrainState(model=model, optimizer=opt)
    for ids, labels in batches("llama"):
        local = td.split_between_ranks({"ids": ids, "labels": labels}, topo, axis="dp")
        state, _ = step(state, (local["ids"], local["labels"]))
    files = export_safetensors(model, root, topo, max_shard_bytes=30_000)
    return files, full_params(model), _logits(model)


def test_a_tp_sharded_trained_llama_exports_what_from_pretrained_loads(tmp_path):
    model0("llama"), batches("llama")
    out = td.in_process(_train_tp_shard_export, 4, str(tmp_path), timeout=240, dp_shard=2, tp=2)
    files, trained, logits = out[0]
    names = sorted(os.path.basename(f) for f in files)
    assert "config.json" in names and "model.safetensors.index.json" in names
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) >= 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(trained)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert max_diff(full_params(loaded), trained) == 0
    for rank_logits in (o[2] for o in out):
        torch.testing.assert_close(_logits(loaded), rank_logits, rtol=0, atol=1e-5)
    assert max_diff(trained, full_params(model0("llama"))) > 1e-3  # it trained


@pytest.fixture
def reads(monkeypatch):
    """Per rank thread: ``(kind, name, bytes)`` of each tensor read through ``safe_open``."""
    log: dict[str, list] = collections.defaultdict(list)
    real = safetensors.safe_open

    class Slice:
        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, index):
            data = self.inner[index]
            log[threading.current_thread().name].append(("slice", self.name, data.nbytes))
            return data

    class Handle:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_slice(self, name):
            return Slice(self.file.get_slice(name), name)

        def get_tensor(self, name):
            data = self.file.get_tensor(name)
            log[threading.current_thread().name].append(("tensor", name, data.nbytes))
            return data

    monkeypatch.setattr(safetensors, "safe_open", Handle)
    return log


def _load_meta(topo, root: str, how: str):
    config = transformers.AutoConfig.from_pretrained(root)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    if "tp" in how:
        parallelize(model, topo)
    shard(model, topo)
    report = load_safetensors(model, root, topo)  # meta: materialised on topo.device first
    local = sum(p.to_local().nbytes for p in model.parameters())  # this rank's shards
    return report, local, full_params(model), _logits(model), threading.current_thread().name


def test_load_safetensors_reads_an_hf_checkpoint_slice_by_slice(tmp_path, reads):
    reference = copy.deepcopy(model0("llama"))
    reference.save_pretrained(tmp_path, max_shard_size="40KB")  # transformers' own writer
    assert (tmp_path / "model.safetensors.index.json").exists()
    expected, logits = full_params(reference), _logits(reference)
    total = sum(t.nbytes for t in expected.values())

    plain = copy.deepcopy(model0("llama"))
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()
    with td.distributed(td.Topology.single()) as one:
        report = load_safetensors(plain, tmp_path, one)
    assert report.bytes_read == total and report.tensors == len(expected)
    assert max_diff(full_params(plain), expected) == 0
    torch.testing.assert_close(_logits(plain), logits, rtol=0, atol=0)
    reads.clear()

    for world, axes, how in ((2, {}, "shard"), (4, dict(dp_shard=2, tp=2), "tp+shard")):
        out = td.in_process(_load_meta, world, str(tmp_path), how, timeout=240, **axes)
        for report, local, params, rank_logits, thread in out:
            assert max_diff(params, expected) == 0, how
            torch.testing.assert_close(rank_logits, logits, rtol=0, atol=1e-5)
            entries = reads[thread]
            assert {kind for kind, _, _ in entries} == {"slice"}, how  # never a whole tensor
            assert sum(n for _, _, n in entries) == report.bytes_read
            assert report.tensors == len(expected)
            assert report.bytes_read == local <= total / 2, how  # its own shards, nothing more
        if how == "shard":  # FSDP splits every tensor over the two ranks: nothing read twice
            assert sum(report.bytes_read for report, *_ in out) == total
        reads.clear()
