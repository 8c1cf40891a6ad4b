"""`export_safetensors` / `load_safetensors`: consolidated weights out of and into sharded models.

Sharded worlds are in-process (threads with real gloo groups); models are built outside the rank
functions. The files are checked with the ``safetensors`` library itself, so the layout is the
one other tools read.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import torchdist as td
from torchdist import CheckpointError
from torchdist.checkpoint import export_safetensors, load_safetensors
from torchdist.sharding import parallelize, shard


class Net(nn.Module):
    def __init__(self, hidden: int = 9) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.inp = nn.Linear(6, hidden)  # 9 rows: uneven shards on 2 ranks (5 + 4)
        self.out = nn.Linear(hidden, 11, bias=False)
        self.out.weight = nn.Parameter(torch.randn(11, hidden).to(torch.bfloat16))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.out(self.inp(self.emb(x)).to(torch.bfloat16))


def reference_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _export_sharded(topo, path, init, max_bytes):
    model = shard(copy.deepcopy(init), topo)
    return export_safetensors(model, path, topo, max_shard_bytes=max_bytes)


def _load_sharded(topo, path, init):
    model = shard(copy.deepcopy(init), topo)
    report = load_safetensors(model, path, topo)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    local += sum(b.numel() * b.element_size() for b in model.buffers())
    full = {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v.detach()
        for k, v in model.state_dict().items()
    }
    return report, local, full


@pytest.mark.parametrize("max_bytes", [10**9, 200])
def test_export_from_two_sharded_ranks_and_load_anywhere(tmp_path, max_bytes):
    init = Net()
    expected = reference_tensors(init)
    files = td.in_process(_export_sharded, 2, str(tmp_path), init, max_bytes, timeout=60)[0]
    if max_bytes == 10**9:
        assert [os.path.basename(f) for f in files] == ["model.safetensors"]
    else:  # one tensor alone exceeds 200 bytes: several files and an index
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert (
            len(files) > 2
            and os.path.basename(files[0]) == f"model-00001-of-{len(files) - 1:05d}.safetensors"
        )
        assert set(index["weight_map"]) == set(expected)
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in expected.values()
        )
    written = {}
    for f in files:
        if f.endswith(".safetensors"):
            written.update(load_file(f))  # the reference reader accepts our files
    assert written.keys() == expected.keys()
    assert all(
        torch.equal(written[k], expected[k]) and written[k].dtype == expected[k].dtype
        for k in expected
    )

    plain = Net()  # other random weights, one plain process
    report = load_safetensors(plain, tmp_path, td.Topology.single())
    assert all(torch.equal(v, expected[k]) for k, v in plain.state_dict().items())
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in expected.values())

    total = report.bytes_read
    for report, local, full in td.in_process(_load_sharded, 2, str(tmp_path), Net(), timeout=60):
        assert report.bytes_read == local < total  # only this rank's slices were read
        assert all(torch.equal(full[k], expected[k]) for k in expected)


def test_tied_weights_are_written_once_and_fill_both_names(tmp_path):
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    export_safetensors(model, tmp_path, td.Topology.single())
    assert list(load_file(tmp_path / "model.safetensors")) == ["0.weight"]
    other = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    other[1].weight = other[0].weight
    load_safetensors(other, tmp_path, td.Topology.single())
    assert torch.equal(other[1].weight, model[0].weight)


def test_tensor_parallel_model_reads_column_and_row_slices(tmp_path):
    init = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
    export_safetensors(init, tmp_path, td.Topology.single())

    def fn(topo, path, init):
        model = parallelize(copy.deepcopy(init), topo, {"0": "colwise", "2": "rowwise"})
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        report = load_safetensors(model, path, topo)
        local = sum(p.to_local().numel() * 4 for p in model.parameters())
        return report.bytes_read, local, [p.full_tensor() for p in model.parameters()]

    full_bytes = sum(p.numel() * 4 for p in init.parameters())
    for read, local, params in td.in_process(fn, 2, str(tmp_path), init, timeout=60, tp=2):
        assert all(map(torch.equal, params, init.parameters()))
        assert read == local < full_bytes  # Shard(0), Shard(1) slices; the replicated bias whole


def test_mismatches_and_a_directory_that_is_no_export(tmp_path):
    export_safetensors(Net(), tmp_path, td.Topology.single())
    bigger = Net(hidden=10)
    before = [p.clone() for p in bigger.parameters()]
    with pytest.raises(
        CheckpointError, match=r"shape mismatch \(3\): inp\.weight: file \(9, 6\), model \(10, 6\)"
    ):
        load_safetensors(bigger, tmp_path, td.Topology.single())
    assert all(map(torch.equal, before, bigger.parameters()))  # nothing was copied

    class Other(Net):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 2)
            del self.emb

    with pytest.raises(
        CheckpointError,
        match=r"missing from the files \(2\): head\.bias, head\.weight; "
        r"unexpected in the files \(1\): emb\.weight",
    ):
        load_safetensors(Other(), tmp_path, td.Topology.single())
    with pytest.raises(CheckpointError, match="is not a safetensors export"):
        load_safetensors(Net(), tmp_path / "nothing", td.Topology.single())
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(40)
    with pytest.raises(CheckpointError, match="missing, truncated or corrupted"):
        load_safetensors(Net(), tmp_path, td.Topology.single())
