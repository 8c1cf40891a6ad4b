"""The model-transform protocol: phases, the one table of reasons, the one record per model,
``distribution_of`` (torchdist- and raw-torch-distributed models) and ``compile`` as a model
transform (regional: blocks, then the rest; parity with eager; graphs; its slot in the order).

Pure checks first (milliseconds), then compile with dynamo's non-optimising backends (seconds),
then in-process gloo worlds.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
import torch.nn as nn
from _precision_models import build_gpt, loss_fn, markov_batches
from _sharding_models import PLAN, Model

import torchdist as td
from torchdist._model_record import MODEL_ORDER, PHASES, REASONS, ModelPhase, ModelRecord, reason
from torchdist.errors import CompositionError
from torchdist.marks import (
    after_optimizer_step_hooks,
    applied,
    data_parallel_owner,
    mark,
    record_of,
)
from torchdist.precision import autocast_fp8
from torchdist.sharding import parallelize, replicate, shard
from torchdist.transforms import (
    checkpoint_activations,
    compile,
    compiled_regions,
    compose,
    optimize,
    value_and_grad,
)

ORDER = "The order that works, first to last: " + MODEL_ORDER
DDP_DEBUG = "INFO"  # DETAIL crashes DDP's constructor on CPU in torch 2.13 (see sharding/_ddp.py)


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphCounter:
    """A dynamo backend that runs each captured graph eagerly and keeps it for inspection."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def calling(self, name: str) -> int:
        """How many captured graphs call a function whose name contains ``name``."""
        return sum(
            any(n.op == "call_function" and name in str(n.target) for n in gm.graph.nodes)
            for gm in self.graphs
        )


# --------------------------------------------------------------------------- pure: the table
def test_phases_follow_torchtitans_order():
    order = ["autocast_fp8", "parallelize", "checkpoint_activations", "compile", "shard"]
    assert [PHASES[n] for n in order] == sorted(PHASES[n] for n in order)
    assert PHASES["msamp"] == PHASES["autocast_fp8"] == ModelPhase.PRECISION
    assert {PHASES[n] for n in ("shard", "replicate", "deepspeed")} == {ModelPhase.DATA_PARALLEL}
    positions = [MODEL_ORDER.index(n) for n in order]
    assert positions == sorted(positions)
    for later, earlier in REASONS:  # the table names only known transforms
        assert later in PHASES and earlier in PHASES


def test_every_order_that_cannot_work_has_a_reason_and_the_right_order_has_none():
    for later, earlier in itertools.product(PHASES, PHASES):
        why = reason(later, earlier)
        if PHASES[earlier] > PHASES[later] or later == earlier:
            assert why, (later, earlier)
    exclusive = [("shard", "replicate"), ("replicate", "shard"), ("deepspeed", "shard"),
                 ("msamp", "autocast_fp8"), ("autocast_fp8", "msamp"),
                 ("shard", "msamp")]  # fmt: skip
    for later, earlier in exclusive:
        assert reason(later, earlier), (later, earlier)
    chain = ["autocast_fp8", "parallelize", "checkpoint_activations", "compile", "shard"]
    for i, later in enumerate(chain):
        assert all(reason(later, earlier) is None for earlier in chain[:i]), later
    assert reason("replicate", "compile") is None and reason("deepspeed", "autocast_fp8") is None


# --------------------------------------------------------------------------- pure: the record
def test_one_frozen_record_in_one_attribute():
    model = Model()
    hook = lambda: None  # noqa: E731
    mark(model, "parallelize", options={"plan": dict(PLAN)})
    first = record_of(model)
    mark(model, "checkpoint_activations", after_optimizer_step=hook)
    second = record_of(model)
    assert isinstance(second, ModelRecord) and first.names == ("parallelize",)  # a new value
    assert applied(model) == second.names == ("parallelize", "checkpoint_activations")
    assert second.find("parallelize").options["plan"] == PLAN
    assert second.find("parallelize").phase == ModelPhase.TENSOR_PARALLEL
    assert after_optimizer_step_hooks(model) == (hook,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.transforms = ()  # type: ignore[misc]
    ours = [k for k in vars(model) if k.startswith("_torchdist")]
    assert ours == ["_torchdist_record"]
    assert not model.state_dict().keys() & {"_torchdist_record"}
    assert "_torchdist_record" not in dict(model.named_modules())
    assert applied(copy.deepcopy(model)) == applied(model)
    assert applied(Model()) == () and record_of(Model()) == ModelRecord()
    with pytest.raises(CompositionError, match="unknown model transform 'fsdp'"):
        mark(Model(), "fsdp")


def test_fp8_filter_treats_sibling_layers_alike():
    """A block's q, k, v are never the "first Linear": the edges lie outside the blocks."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))
            self.o = nn.Linear(32, 32)

        def forward(self, x):
            return self.o(self.q(x) + self.k(x) + self.v(x))

    class Net(nn.Module):
        def __init__(self, with_edges: bool) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Attention(), Attention()])
            self.head = nn.Linear(32, 32) if with_edges else None

    from torchdist.precision import Float8Recipe

    picked = Float8Recipe.tensorwise().select(Net(with_edges=False))
    assert {n.split(".")[-1] for n in picked} == {"q", "k", "v", "o"} and len(picked) == 8
    with_head = Float8Recipe.tensorwise().select(Net(with_edges=True))
    assert with_head == picked  # the head (first and last outside the blocks) is skipped
    flat = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    assert Float8Recipe.tensorwise().select(flat) == ("1",)  # no blocks: the plain edges


# --------------------------------------------------------------------------- order errors
def test_order_errors_name_the_reason_and_the_order(fresh_dynamo):
    counter = GraphCounter()
    compiled = compile(build_gpt(), backend=counter)
    cases = [
        (lambda: checkpoint_activations(compiled), "checkpoint_activations after compile",
         "checkpoint first"),
        (lambda: autocast_fp8(compiled), "autocast_fp8 after compile", "convert first"),
        (lambda: compile(compiled), "compile after compile", "compile it once"),
        (lambda: parallelize(compiled, td.Topology.single(), {"blocks.*.up": "colwise"}),
         "parallelize after compile", "apply tensor parallelism first"),
        (lambda: compile(mark(build_gpt(), "shard")), "compile after shard", "before shard"),
        (lambda: compile(mark(build_gpt(), "deepspeed")), "compile after deepspeed", "DeepSpeed"),
    ]  # fmt: skip
    for apply, *fragments in cases:
        with pytest.raises(CompositionError) as info:
            apply()
        for fragment in fragments + [ORDER]:
            assert fragment in str(info.value), (fragment, str(info.value))
    assert applied(compiled) == ("compile",) and counter.graphs == []  # nothing ran
    in_order = compile(checkpoint_activations(autocast_fp8(build_gpt())), backend=counter)
    assert applied(in_order) == ("autocast_fp8", "checkpoint_activations", "compile")


# --------------------------------------------------------------------------- compile
def test_compile_blocks_and_the_rest_matches_eager_with_one_graph_per_block_kind(fresh_dynamo):
    counter = GraphCounter()
    model0 = build_gpt(layers=3)
    batches = markov_batches(3, 4, 32, seed=1)
    losses = {}
    for mode in ("eager", "compiled"):
        model = copy.deepcopy(model0)
        if mode == "compiled":
            model = compile(model, backend=counter)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = compose(optimize(opt))(value_and_grad(loss_fn))
        state, losses[mode] = td.TrainState(model=model, optimizer=opt), []
        for batch in batches:
            state, metrics = step(state, batch)
            losses[mode].append(metrics["loss"])
    torch.testing.assert_close(torch.stack(losses["compiled"]), torch.stack(losses["eager"]),
                               rtol=0, atol=1e-6)  # fmt: skip
    blocks = ("blocks.0", "blocks.1", "blocks.2")
    rest = ("tok", "pos", "adapter_down", "adapter_up", "norm", "head")
    assert compiled_regions(model) == blocks + rest
    assert record_of(model).find("compile").options["torch_compile_kwargs"] == {"backend": counter}
    # Three blocks, one compiled code: attention appears in exactly one graph.
    assert counter.calling("scaled_dot_product_attention") == 1
    assert counter.calling("embedding") >= 1 and counter.calling("layer_norm") >= 2
    assert 4 <= len(counter.graphs) <= 9, len(counter.graphs)  # regions, not one graph per call
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in model0.named_parameters()]  # no _orig_mod. prefix


def test_compile_options_rest_false_whole_model_and_deepcopy(fresh_dynamo):
    counter = GraphCounter()
    blocks_only = compile(build_gpt(), rest=False, backend=counter)
    assert compiled_regions(blocks_only) == ("blocks.0", "blocks.1")
    flat = compile(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), backend=counter)
    assert compiled_regions(flat) == ("",)  # no repeated blocks: the whole model
    x = torch.randn(2, 4)
    torch.testing.assert_close(flat(x), torch.tanh(flat[0](x)))
    # A deep copy runs its own parameters, not the original's.
    model = compile(build_gpt(), backend=counter)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    tokens = markov_batches(1, 2, 32)[0][0]
    eager = copy.deepcopy(build_gpt())
    with torch.no_grad():
        for p in eager.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(clone(tokens), eager(tokens), rtol=0, atol=1e-6)
    torch.testing.assert_close(model(tokens), build_gpt()(tokens), rtol=0, atol=1e-6)


def test_checkpoint_then_compile_then_shard_matches_one_process(fresh_dynamo):
    """torchtitan's slot: AC -> compile -> shard on 2 ranks equals eager on the global batch."""
    model0 = build_gpt()
    batches = markov_batches(2, 4, 32, seed=2)

    def train(model, local):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = compose(optimize(opt))(value_and_grad(loss_fn))
        state, out = td.TrainState(model=model, optimizer=opt), []
        for x, y in local:
            state, metrics = step(state, (x, y))
            out.append(float(metrics["loss"]))
        return out

    reference = train(copy.deepcopy(model0), batches)

    def rank(topo):
        model = checkpoint_activations(copy.deepcopy(model0))
        model = shard(compile(model, backend="aot_eager"), topo)
        assert applied(model) == ("checkpoint_activations", "compile", "shard")
        half = [(x[topo.rank * 2 :][:2], y[topo.rank * 2 :][:2]) for x, y in batches]
        losses = train(model, half)
        return [float(td.all_reduce(torch.tensor(v), topo, op="mean")) for v in losses]

    for losses in td.in_process(rank, 2, timeout=120, dp_shard=2):
        assert losses == pytest.approx(reference, abs=1e-5)


# --------------------------------------------------------------------------- distribution_of
def test_distribution_of_sharded_models_by_torchdist_and_by_hand():
    from torch.distributed.fsdp import fully_shard

    def rank(topo):
        plain = td.distribution_of(Model())
        ours = td.distribution_of(shard(Model(), topo))
        raw = td.distribution_of(fully_shard(Model(), mesh=topo.mesh["dp_shard"]))
        raw_blocks = Model()
        for block in raw_blocks.blocks:
            fully_shard(block, mesh=topo.mesh["dp_shard"])
        by_blocks = td.distribution_of(raw_blocks)
        with pytest.raises(CompositionError, match="compile after fully_shard") as info:
            compile(raw_blocks)  # raw torch is seen too, not only torchdist's record
        assert ORDER in str(info.value)
        return plain, ours, raw, by_blocks, data_parallel_owner(raw_blocks)

    plain, ours, raw, by_blocks, owner = td.in_process(rank, 2, dp_shard=2)[0]
    assert plain == td.Distribution() and not plain.is_distributed
    assert (ours.data_parallel, ours.dp_axes, ours.by_torchdist) == ("fsdp2", ("dp_shard",), True)
    assert ours.applied == ("shard",) and ours.tp_mesh is None and not ours.deepspeed_engine
    assert (raw.data_parallel, raw.dp_axes, raw.by_torchdist) == ("fsdp2", ("dp_shard",), False)
    assert raw.tp_mesh is None and raw.applied == ()
    assert by_blocks.data_parallel == "fsdp2" and "FSDP2" in owner


def test_distribution_of_replicated_models_by_torchdist_and_by_hand():
    from torch.distributed._composable import replicate as torch_replicate
    from torch.nn.parallel import DistributedDataParallel

    def rank(topo):
        ours = td.distribution_of(replicate(Model(), topo))
        ddp = td.distribution_of(DistributedDataParallel(Model()))
        lazy = torch_replicate(Model())
        before = td.distribution_of(lazy)  # replicate builds its DDP at the first forward
        lazy(torch.randn(2, 8))
        return ours, ddp, td.distribution_of(lazy), before

    ours, ddp, composable, before = td.in_process(rank, 2, debug=DDP_DEBUG, dp_replicate=2)[0]
    assert before.data_parallel == "ddp" and before.dp_group is None
    assert (ours.data_parallel, ours.by_torchdist, ours.dp_axes) == ("ddp", True, ("dp",))
    for raw in (ddp, composable):
        assert (raw.data_parallel, raw.by_torchdist) == ("ddp", False)
        assert raw.dp_group is not None and raw.is_distributed


def test_distribution_of_tensor_parallel_and_2d_models():
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    def torch_plan():
        return {"blocks.*.up": ColwiseParallel(), "blocks.*.down": RowwiseParallel()}

    def rank(topo):
        tp_ours = td.distribution_of(parallelize(Model(), topo, PLAN))
        tp_raw = td.distribution_of(parallelize_module(Model(), topo.mesh["tp"], torch_plan()))
        both = td.distribution_of(shard(parallelize(Model(), topo, PLAN), topo))
        raw = parallelize_module(Model(), topo.mesh["tp"], torch_plan())
        both_raw = td.distribution_of(fully_shard(raw, mesh=topo.mesh["dp_shard"]))
        return tp_ours, tp_raw, both, both_raw

    tp_ours, tp_raw, both, both_raw = td.in_process(rank, 4, dp_shard=2, tp=2)[0]
    for found in (tp_ours, tp_raw):
        assert found.data_parallel is None and found.tp_axes == ("tp",) and found.is_distributed
    for found in (both, both_raw):
        assert (found.data_parallel, found.dp_axes, found.tp_axes) == ("fsdp2", ("dp_shard",),
                                                                       ("tp",))  # fmt: skip
    assert both.applied == ("parallelize", "shard") and both_raw.applied == ()


def test_distribution_of_a_deepspeed_module_and_an_engine_like_object():
    marked = td.distribution_of(mark(Model(), "deepspeed"))
    assert (marked.data_parallel, marked.by_torchdist, marked.deepspeed_engine) == (
        "deepspeed", True, False)  # fmt: skip
    Engine = type("DeepSpeedEngine", (nn.Module,), {"backward": lambda self, loss: None})
    Engine.__module__ = "deepspeed.runtime.engine"
    engine = Engine()
    engine.module = Model()
    found = td.distribution_of(engine)
    assert found.deepspeed_engine and found.data_parallel == "deepspeed"
    assert "DeepSpeed engine" in data_parallel_owner(engine)
