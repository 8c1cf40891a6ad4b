"""torchdist.inference's bad inputs: each raises our own type with a message that names the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import torchdist as td
from torchdist.checkpoint import export_safetensors
from torchdist.errors import (
    CheckpointError,
    CompositionError,
    ConfigError,
    DeviceMapError,
    TopologyError,
)
from torchdist.inference import infer_device_map, init_empty, load_and_dispatch, parse_size


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture
def export(tmp_path):
    torch.manual_seed(0)
    model = _model()
    export_safetensors(model, tmp_path / "w", td.Topology.single())
    return model, tmp_path / "w"


@pytest.mark.parametrize("bad", ["20 gigs", "-1", "", "GiB", -5, None, "1.5.2GB", True])
def test_a_budget_that_does_not_parse(bad):
    with pytest.raises(ConfigError, match="cannot read the memory budget.*'20GiB'"):
        parse_size(bad, device="cpu")
    with pytest.raises(ConfigError, match="for 'cpu'"):
        infer_device_map(_model(), max_memory={"cpu": bad})


def test_a_device_that_does_not_exist():
    with pytest.raises(TopologyError, match="unknown device 'tpu:0'.*'cpu', 'disk', 'cuda:N'"):
        infer_device_map(_model(), max_memory={"tpu:0": "1GiB"})
    count = torch.cuda.device_count()
    with pytest.raises(TopologyError, match=f"cuda:{count} does not exist.*{count} CUDA"):
        infer_device_map(_model(), max_memory={f"cuda:{count}": "1GiB", "cpu": "1GiB"})
    with pytest.raises(TopologyError, match="unknown device"):
        load_and_dispatch(init_empty(_model), {}, {"": "gpu"})
    with pytest.raises(ConfigError, match="max_memory is empty"):
        infer_device_map(_model(), max_memory={})


def test_a_model_that_does_not_fit_even_on_disk():
    with pytest.raises(DeviceMapError, match=r"does not fit.*budgets are cpu=.*add 'disk'"):
        infer_device_map(init_empty(_model), max_memory={"cpu": 64, "disk": 100})


def test_an_offloaded_block_larger_than_the_compute_budget():
    with pytest.raises(DeviceMapError, match=r"offloaded unit 0 needs 160 B on cpu.*budget is 100"):
        infer_device_map(init_empty(_model), max_memory={"cpu": 100, "disk": "1GiB"})


def test_a_checkpoint_missing_tensors_names_them(export, tmp_path):
    _, path = export
    bigger = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))  # noqa: E731
    with pytest.raises(CheckpointError, match=r"missing \(2\): 3.weight, 3.bias.*Nothing was"):
        load_and_dispatch(init_empty(bigger), path, {"": "cpu"})
    wrong = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # noqa: E731
    with pytest.raises(CheckpointError, match=r"shape mismatch.*2.weight: checkpoint \(2, 8\)"):
        load_and_dispatch(init_empty(wrong), path, {"": "cpu"})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_and_dispatch(init_empty(_model), tmp_path / "nowhere", {"": "cpu"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_and_dispatch(init_empty(_model), tmp_path / "empty", {"": "cpu"})
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors"):
        load_and_dispatch(init_empty(_model), tmp_path / "bad.safetensors", {"": "cpu"})


def test_an_offload_dir_that_is_not_writable(export, tmp_path):
    model, path = export
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="offload_dir .*a_file/sub is not writable"):
        load_and_dispatch(init_empty(_model), path, {"": "disk"}, offload_dir=blocker / "sub")
    with pytest.raises(DeviceMapError, match="not safetensors.*pass offload_dir"):
        load_and_dispatch(init_empty(_model), model.state_dict(), {"": "disk"})


def test_a_map_that_misses_tensors_a_bad_map_kind_and_dispatching_twice(export):
    _, path = export
    with pytest.raises(DeviceMapError, match=r"places nothing for 2 tensor\(s\): 2.weight, 2.bias"):
        load_and_dispatch(init_empty(_model), path, {"0": "cpu"})
    with pytest.raises(ConfigError, match="'auto' or a mapping"):
        load_and_dispatch(init_empty(_model), path, "balanced")
    model = load_and_dispatch(init_empty(_model), path, {"": "cpu"})
    with pytest.raises(CompositionError, match="already applied"):
        load_and_dispatch(model, path, {"": "cpu"})


def test_a_meta_non_persistent_buffer_has_no_source(export):
    _, path = export

    def build():
        model = _model()
        model.register_buffer("table", torch.arange(3.0), persistent=False)
        return model

    with pytest.raises(CheckpointError, match="include_buffers=False"):
        load_and_dispatch(init_empty(build, include_buffers=True), path, {"": "cpu"})
