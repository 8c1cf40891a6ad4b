"""`to_device`: batches (pytrees), modules, non-tensor leaves and objects with `.to`."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

import torchdist as td
from torchdist import Topology

Batch = namedtuple("Batch", ["x", "y"])


class Encoding:
    """A leaf that is not a tensor but moves itself, like a Hugging Face BatchEncoding."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self.moved_to: list[torch.device] = []

    def to(self, device):
        self.moved_to.append(torch.device(device))
        return Encoding(self.ids.to(device))


def _targets():
    targets = [Topology.single(), torch.device("cpu"), "cpu"]
    if torch.cuda.is_available():
        targets.append(Topology.single(device="cuda:0"))
    return targets


@pytest.mark.parametrize("target", _targets(), ids=lambda t: type(t).__name__)
def test_nested_batch(target):
    device = target.device if isinstance(target, Topology) else torch.device(target)
    x = torch.arange(6.0).reshape(2, 3)
    batch = {
        "inputs": Batch(x=x, y=torch.tensor([0, 1])),
        "mask": [torch.ones(2, dtype=torch.bool), (torch.zeros(1),)],
        "meta": {"name": "batch-0", "step": 3, "weights": None, "scale": 0.5},
    }
    out = td.to_device(batch, target)
    assert isinstance(out, dict) and set(out) == set(batch)
    assert isinstance(out["inputs"], Batch)
    assert isinstance(out["mask"], list) and isinstance(out["mask"][1], tuple)
    for moved, original in [
        (out["inputs"].x, x),
        (out["inputs"].y, batch["inputs"].y),
        (out["mask"][0], batch["mask"][0]),
        (out["mask"][1][0], batch["mask"][1][0]),
    ]:
        assert moved.device.type == device.type
        assert moved.dtype == original.dtype
        assert torch.equal(moved.cpu(), original)
    # non-tensor leaves come back as they are (None included)
    assert out["meta"] == {"name": "batch-0", "step": 3, "weights": None, "scale": 0.5}
    # the input tree is not modified
    assert batch["inputs"].x is x


def test_module_is_moved_and_returned():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    out = td.to_device(model, Topology.single())
    assert out is model
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())


def test_module_dtype_and_values_kept():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    td.to_device(model, "cpu")
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float64 and torch.equal(v, before[k])


def test_objects_with_to_are_moved_with_it():
    enc = Encoding(torch.tensor([1, 2, 3]))
    out = td.to_device({"enc": enc, "labels": torch.tensor([1])}, Topology.single())
    assert enc.moved_to == [torch.device("cpu")]
    assert isinstance(out["enc"], Encoding) and out["enc"] is not enc
    assert torch.equal(out["enc"].ids, enc.ids)
    assert torch.equal(out["labels"], torch.tensor([1]))


def test_single_tensor_and_plain_values():
    t = torch.ones(2)
    assert torch.equal(td.to_device(t, "cpu"), t)
    assert td.to_device("text", "cpu") == "text"
    assert td.to_device(None, "cpu") is None
    assert td.to_device([1, "a", 2.5], Topology.single()) == [1, "a", 2.5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_to_gpu_and_back():
    topo = Topology.single(device="cuda:0")
    batch = {"x": torch.randn(4, 4).pin_memory(), "k": "v"}
    out = td.to_device(batch, topo)
    torch.cuda.synchronize()
    assert out["x"].is_cuda and out["k"] == "v"
    back = td.to_device(out, "cpu")
    assert torch.equal(back["x"], batch["x"])
    model = td.to_device(torch.nn.Linear(2, 2), topo)
    assert next(model.parameters()).is_cuda
