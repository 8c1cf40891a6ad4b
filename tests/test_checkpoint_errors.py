"""`checkpoint.load`'s errors: each one raised with what was found, what was expected, the fix.

Also that a failed load changes nothing, and that a crafted metadata pickle runs no code. One
plain process (``Topology.single()``) each; the models and helpers are ``test_checkpoint``'s.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.nn as nn
from test_checkpoint import Net, _save_plain, dataset, fresh, loss_fn

import torchdist as td
from torchdist import CheckpointError, checkpoint
from torchdist.data import shard_loader


@pytest.fixture
def saved(tmp_path):
    model = Net()
    path = _save_plain(tmp_path, 5, model=model)
    return tmp_path, path, model


def _load(path, model=None, **state):
    model = model or Net()
    return checkpoint.load(path, td.TrainState(model=model, **state), td.Topology.single())


def test_missing_unexpected_and_shape_mismatch_are_named(saved):
    root, _, original = saved
    with pytest.raises(
        CheckpointError,
        match=r"missing from the checkpoint \(2\): model\.more\.weight, model\.more\.bias",
    ):
        _load(root, Net(extra_layer=True))

    class Smaller(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)

    with pytest.raises(
        CheckpointError,
        match=r"unexpected in the checkpoint \(2\): model\.out\.weight, model\.out\.bias",
    ):
        _load(root, Smaller())
    model = Net(hidden=12)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(
        CheckpointError, match=r"model\.inp\.weight: checkpoint \(16, 8\), expected \(12, 8\)"
    ):
        _load(root, model)
    assert all(map(torch.equal, before, model.parameters()))  # nothing was loaded
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        _load(root, model, optimizer=opt)
    sgd_root = root / "sgd"
    sgd = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9)
    loss_fn(original, dataset(8).tensors).backward()
    sgd.step()
    checkpoint.save(sgd_root, td.TrainState(model=original, optimizer=sgd), td.Topology.single())
    with pytest.raises(
        CheckpointError,
        match=r"missing from the checkpoint \(\d+\): "
        r"optim\.state\.inp\.weight\.step, optim\.state\.inp\.weight\.exp_avg",
    ):
        _load(sgd_root, model, optimizer=opt)


def test_truncated_and_corrupted_files(saved):
    _, path, _ = saved
    data = os.path.join(path, "__0_0.distcp")
    content = open(data, "rb").read()
    with open(data, "wb") as f:
        f.write(content[: len(content) // 2])
    with pytest.raises(
        CheckpointError, match=r"__0_0\.distcp: \d+ bytes, expected \d+ \(truncated\)"
    ):
        _load(path)
    with open(data, "wb") as f:
        f.write(b"\x00" * len(content))  # same size, garbage
    with pytest.raises(CheckpointError, match="reading checkpoint .* failed; a file is corrupted"):
        _load(path)
    metadata = os.path.join(path, ".metadata")
    size = os.path.getsize(metadata)
    with open(metadata, "wb") as f:
        f.write(b"\x80" * size)
    with pytest.raises(CheckpointError, match=r"DCP metadata .* is corrupted"):
        _load(path)


def test_metadata_that_would_run_code_is_refused(saved, tmp_path_factory):
    _, path, _ = saved
    flag = tmp_path_factory.mktemp("pwn") / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(flag), "w"))

    metadata = os.path.join(path, ".metadata")
    with open(metadata, "wb") as f:
        pickle.dump(Evil(), f)
    marker_path = os.path.join(path, checkpoint.MARKER)
    marker = json.load(open(marker_path))
    marker["files"][".metadata"] = os.path.getsize(metadata)
    json.dump(marker, open(marker_path, "w"))
    with pytest.raises(CheckpointError, match="io.open, which is not part of DCP's metadata"):
        _load(path)
    assert not flag.exists()


def test_not_a_checkpoint_and_newer_format(saved, tmp_path_factory):
    _, path, _ = saved
    empty = tmp_path_factory.mktemp("empty")
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(
        CheckpointError, match=r"is not a torchdist checkpoint: it contains notes\.txt"
    ):
        _load(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(empty / "nope")
    raw = tmp_path_factory.mktemp("raw")
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):
        dcp.save({"model": Net().state_dict()}, checkpoint_id=str(raw), no_dist=True)
    with pytest.raises(CheckpointError, match="raw torch.distributed.checkpoint"):
        _load(raw)
    partial = tmp_path_factory.mktemp("partial") / "step_00000001.tmp-abc"
    partial.mkdir()
    with pytest.raises(CheckpointError, match=r"only unfinished saves \(step_00000001\.tmp-abc\)"):
        _load(partial.parent)
    marker_path = os.path.join(path, checkpoint.MARKER)
    marker = json.load(open(marker_path))
    json.dump({**marker, "version": checkpoint.FORMAT_VERSION + 1}, open(marker_path, "w"))
    with pytest.raises(CheckpointError, match="format version 2, newer than this torchdist reads"):
        _load(path)


def test_state_that_does_not_fit_the_per_rank_part(tmp_path):
    topo = td.Topology.single()
    with pytest.raises(CheckpointError, match="cannot be checkpointed safely"):
        checkpoint.save(tmp_path, td.TrainState(model=Net(), extra={"obj": object()}), topo)
    assert os.listdir(tmp_path) == []  # nothing was written
    state, _, loader = fresh(0)
    checkpoint.save(tmp_path, state, topo, loader=loader)
    with pytest.raises(
        CheckpointError, match="holds a scheduler state, but TrainState.scheduler is None"
    ):
        _load(tmp_path)
    other_loader = shard_loader(dataset(24), topo, batch_size=8, seed=1)
    with pytest.raises(CheckpointError, match="dataset_len=40"):
        checkpoint.load(tmp_path, state, topo, loader=other_loader)
    with pytest.raises(CheckpointError, match="keep must be"):
        checkpoint.save(tmp_path, state, topo, keep=0)
