"""check_axes_used: an axis > 1 that no transform uses is an error naming it (pure, no ranks)."""

from __future__ import annotations

import pytest
import torch

from torchdist import Topology, TopologyError
from torchdist._axes import check_axes_used, unused_axes
from torchdist.marks import mark


def _model(*names: str) -> torch.nn.Module:
    model = torch.nn.Linear(2, 2)
    for name in names:
        mark(model, name)
    return model


def test_each_transform_uses_its_axes():
    fsdp_tp = Topology(world_size=4, dp_shard=2, tp=2)
    assert unused_axes(fsdp_tp, _model("parallelize", "shard")) == ()
    assert unused_axes(fsdp_tp, _model("shard")) == ("tp",)
    assert unused_axes(fsdp_tp, _model()) == ("dp_shard", "tp")
    assert unused_axes(fsdp_tp, _model("parallelize"), uses=("sync_grads",)) == ()
    hsdp = Topology(world_size=4, dp_replicate=2, dp_shard=2)
    assert unused_axes(hsdp, _model("shard")) == unused_axes(hsdp, _model("replicate")) == ()
    assert unused_axes(Topology(world_size=2, dp_shard=2), _model("deepspeed")) == ()
    assert unused_axes(Topology(), _model()) == ()  # one rank: nothing to use


def test_an_unused_axis_is_an_error_naming_it_and_its_transform():
    with pytest.raises(TopologyError, match=r"train.py: mesh axis tp=2 .*parallelize\(model"):
        check_axes_used(Topology(world_size=4, dp_shard=2, tp=2), _model("shard"), what="train.py")
    check_axes_used(Topology(world_size=4, dp_shard=2, tp=2), _model("shard", "parallelize"))


@pytest.mark.parametrize(("axis", "fix"), [("pp", r"pipeline\(model"), ("cp", "context_parallel")])
def test_pp_and_cp_need_their_transform(axis, fix):
    topo = Topology(world_size=2, dp_shard=1, **{axis: 2})
    with pytest.raises(TopologyError, match=f"{axis}=2 .*{fix}"):
        check_axes_used(topo, _model("shard", "parallelize"), uses=("sync_grads",))
    used = ("pipeline",) if axis == "pp" else ()
    steps = ("sync_grads",) + (() if used else ("context_parallel",))
    check_axes_used(topo, _model(*used), uses=steps)
