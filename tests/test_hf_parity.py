"""Hugging Face models (Llama, Qwen2, GPT-2 with tied embeddings, BERT for sequence
classification) under every data/tensor-parallel transform, with no extra user code: parity with
single-process training on the same global batch (issue 12, item 2).

Oracle: plain torch on one process, the whole global batch per step, SGD, fp32
(``_hf_models.reference``). Each N-rank run trains a deep copy of the same model for ``STEPS``
steps through the composed step (``optimize``, ``sync_grads``, optionally ``accumulate(2)`` with
each rank's share fed as two calls) and must end within ``ATOL`` of it, with the mean of the
ranks' losses equal to the reference losses. No plan, no ``blocks=``: ``shard`` and
``checkpoint_activations`` find the decoder layers themselves (asserted from the record) and
``parallelize(model, topo)`` uses the model's own plan (its source is asserted). One in-process
world (ranks are threads with real gloo groups) per mesh covers all its cases, so the file
starts no process.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _hf_models import LAYERS, LR, STEPS, batches, full_params, max_diff, model0, reference
from _hf_models import loss_fn as hf_loss

import torchdist as td
from torchdist._model_record import record_of
from torchdist.errors import ShardingError
from torchdist.sharding import parallelize, replicate, shard
from torchdist.transforms import (
    accumulate,
    checkpoint_activations,
    compose,
    optimize,
    sync_grads,
    value_and_grad,
)
from torchdist.transforms._accumulate import split_batch

ATOL = 1e-6
TIMEOUT = 400


def build(topo, kind: str, how: str):
    """A deep copy of ``model0(kind)`` with the model transforms in ``how`` ("tp+shard")."""
    model = copy.deepcopy(model0(kind))
    for part in how.split("+"):
        if part == "shard":
            shard(model, topo)
        elif part == "replicate":
            replicate(model, topo)
        elif part == "tp":
            parallelize(model, topo)  # no plan: the model's own
        elif part == "ca":
            checkpoint_activations(model)
        elif part not in ("sync_grads", "acc"):
            raise AssertionError(part)
    return model


def train(topo, kind: str, how: str) -> dict:
    """Train a fresh build; return its full params, per-step losses and what the record says."""
    model = build(topo, kind, how)
    k = 2 if how.endswith("+acc") else 1
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    inner = [sync_grads(topo)] + ([accumulate(k)] if k > 1 else [])
    step = compose(optimize(opt), *inner)(value_and_grad(hf_loss))
    state = step.init(td.TrainState(model=model, optimizer=opt))
    losses = []
    for ids, labels in batches(kind):
        local = td.split_between_ranks({"ids": ids, "labels": labels}, topo, axis="dp")
        micro_losses = []
        for micro in split_batch((local["ids"], local["labels"]), k):
            state, metrics = step(state, micro)
            micro_losses.append(float(metrics["loss"]))
        losses.append(sum(micro_losses) / k)
    assert state.step == STEPS * k
    record = record_of(model)
    found = {
        name: record.find(name).options
        for name in ("shard", "checkpoint_activations", "parallelize")
        if record.find(name) is not None
    }
    tied, head = None, model.get_output_embeddings()
    if model.config.tie_word_embeddings and head is not None:
        tied = head.weight is model.get_input_embeddings().weight
    return {"params": full_params(model), "losses": losses, "options": found, "tied": tied}


def check(results: list[dict], kind: str, how: str, world: int, dp: int) -> None:
    ref_params, ref_losses = reference(kind)
    for rank, out in enumerate(results):
        diff = max_diff(out["params"], ref_params)
        assert diff <= ATOL, f"{kind} {how} on {world}: rank {rank} is {diff:.2e} from one process"
        options = out["options"]
        if "shard" in how:
            assert options["shard"]["blocks"] == LAYERS[kind], options["shard"]
        if "ca" in how.split("+"):
            assert options["checkpoint_activations"]["blocks"] == LAYERS[kind]
        if "tp" in how.split("+"):
            assert options["parallelize"]["plan_source"] == f"{type(model0(kind)).__name__}.tp_plan"
        if out["tied"] is not None:
            assert out["tied"], f"{kind} {how}: the LM head is no longer tied to the embeddings"
    # each dp rank's loss is the mean over its share; their mean is the global batch's
    per_rank = torch.tensor([out["losses"] for out in results])
    torch.testing.assert_close(per_rank.mean(0), torch.tensor(ref_losses), rtol=0, atol=1e-5)
    assert max_diff(ref_params, full_params(model0(kind))) > 1e-3  # it did train


def run_cases(cases, world: int, **axes) -> None:
    for kind, _ in cases:  # built here, not in the rank threads: they share the global RNG
        reference(kind)

    def rank(topo):
        return [train(topo, kind, how) for kind, how in cases]

    per_rank = td.in_process(rank, world, timeout=TIMEOUT, **axes)
    dp = world // axes.get("tp", 1)
    for i, (kind, how) in enumerate(cases):
        check([out[i] for out in per_rank], kind, how, world, dp)


DATA_PARALLEL = [
    (kind, how)
    for kind in ("llama", "qwen2", "gpt2", "bert")
    for how in ("sync_grads", "replicate", "shard", "shard+acc")
] + [(kind, how) for kind in ("llama", "gpt2") for how in ("ca+shard", "sync_grads+acc")]


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_transforms_match_one_process(world):
    run_cases(DATA_PARALLEL, world)


@pytest.mark.timeout(TIMEOUT + 60)
def test_tensor_parallel_with_the_models_own_plan_matches_one_process():
    # tp=2: Llama (4 heads, 2 kv heads) and the tied Qwen2; accumulation on top.
    run_cases([("llama", "tp"), ("llama", "tp+acc"), ("qwen2", "tp")], 2, tp=2)


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp_and_shard_on_four_ranks_match_one_process():
    run_cases(
        [("llama", "tp+shard"), ("llama", "tp+shard+acc"), ("qwen2", "tp+shard")],
        4,
        dp_shard=2,
        tp=2,
    )


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp4_fits_qwen2_and_refuses_llamas_two_kv_heads():
    def rank(topo):
        try:
            parallelize(copy.deepcopy(model0("llama")), topo)
        except ShardingError as exc:
            refused = str(exc)
        else:
            refused = ""
        return refused, train(topo, "qwen2", "tp")

    reference("qwen2"), model0("llama")
    per_rank = td.in_process(rank, 4, timeout=TIMEOUT, tp=4)
    for refused, _ in per_rank:
        assert "num_key_value_heads=2" in refused and "LlamaForCausalLM.tp_plan" in refused
        assert "tp=4" in refused and "[1, 2]" in refused
    check([out for _, out in per_rank], "qwen2", "tp", 4, 1)
