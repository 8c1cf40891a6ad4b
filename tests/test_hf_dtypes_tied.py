"""Mixed parameter dtypes under ``shard`` and tied weights through shard, DCP and export
(issue 12, items 3 and 4), on tiny random-weight HF models (no download).

Mixed dtypes: a Llama whose Linear/Embedding weights are bf16 and whose RMSNorm weights are fp32
(the layout of a model loaded in bf16 with some modules kept in fp32). Without mixed precision
its first forward raises a ``ShardingError`` naming the parameters (never FSDP2's first-forward
``AssertionError``); with it, the trainable bf16 parameters become fp32 master weights (one
warning) and training tracks an fp32 run within bf16 tolerance; frozen parameters and a model of
one dtype keep their dtypes.

Tied weights: GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``. It stays one parameter
under ``shard`` (and trains as one: parity is in ``test_hf_parity.py``), through
``checkpoint.save`` on 2 ranks and ``checkpoint.load`` on 4 and on 1 (resharding), and through
``export_safetensors`` (written once, under its first name) -> ``from_pretrained`` and
``load_safetensors``.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from _hf_models import (
    LR,
    batches,
    full_params,
    loss_fn,
    max_diff,
    model0,
    transformers,
)

import torchdist as td
from torchdist import checkpoint
from torchdist.checkpoint import export_safetensors, load_safetensors
from torchdist.errors import ShardingError
from torchdist.sharding import MixedPrecision, shard
from torchdist.transforms import compose, optimize, value_and_grad

BF16 = MixedPrecision(param_dtype=torch.bfloat16)


def mixed_llama() -> torch.nn.Module:
    """Llama with bf16 Linear and Embedding weights and fp32 norms, from fixed weights."""
    model = copy.deepcopy(model0("llama"))
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.to(torch.bfloat16)
    return model


def _local(ids, labels, topo) -> tuple:
    local = td.split_between_ranks({"ids": ids, "labels": labels}, topo, axis="dp")
    return local["ids"], local["labels"]


def _train(model, topo, steps: int = 4) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = compose(optimize(opt))(value_and_grad(loss_fn))
    state, losses = td.TrainState(model=model, optimizer=opt), []
    for ids, labels in (batches("llama") * 2)[:steps]:
        state, metrics = step(state, _local(ids, labels, topo))
        losses.append(float(metrics["loss"]))
    return losses


def test_mixed_dtypes_without_mixed_precision_name_the_parameters():
    model = mixed_llama()
    ids = batches("llama")[0][0]
    with td.distributed(td.Topology.single()) as topo:
        shard(model, topo)  # fine for what needs no forward (export, load, state dict) ...
        for _ in range(2):  # ... but no forward runs into FSDP2's AssertionError
            with pytest.raises(ShardingError) as err:
                model(ids)
    message = str(err.value)
    assert "unit 'model.layers.0'" in message and "uniform" not in message
    assert "torch.bfloat16: model.layers.0.self_attn.q_proj.weight" in message
    assert "torch.float32: model.layers.0.input_layernorm.weight" in message
    assert "mixed_precision=MixedPrecision" in message
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # left alone


def test_mixed_precision_upcasts_trainable_low_precision_params_once():
    model, frozen = mixed_llama(), mixed_llama()
    bf16_values = {n: p.detach().float() for n, p in model.named_parameters()}
    for name, param in frozen.named_parameters():
        param.requires_grad_("layernorm" in name or name == "model.norm.weight")
    with td.distributed(td.Topology.single()) as topo:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shard(model, topo, mixed_precision=BF16)
        upcast = [w for w in caught if "upcast" in str(w.message)]
        assert len(upcast) == 1, [str(w.message) for w in caught]
        n_bf16 = sum(1 for p in mixed_llama().parameters() if p.dtype == torch.bfloat16)
        assert f"upcast {n_bf16} trainable torch.bfloat16 parameters" in str(upcast[0].message)
        assert {p.to_local().dtype for p in model.parameters()} == {torch.float32}
        assert max_diff(full_params(model), bf16_values) == 0  # the same values, in fp32
        # frozen bf16 weights stay bf16 (FSDP2 checks only trainable ones): no upcast, no error
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shard(frozen, topo, mixed_precision=BF16)
        assert not [w for w in caught if "upcast" in str(w.message)]
        q = frozen.model.layers[0].self_attn.q_proj.weight
        assert q.to_local().dtype == torch.bfloat16 and not q.requires_grad
        losses = _train(frozen, topo, steps=2)
        assert all(torch.isfinite(torch.tensor(losses)))
        # one dtype, no mixed precision: left alone
        whole = copy.deepcopy(model0("llama")).to(torch.bfloat16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shard(whole, topo)
        assert not [w for w in caught if "upcast" in str(w.message)]
        assert {p.to_local().dtype for p in whole.parameters()} == {torch.bfloat16}


def test_mixed_dtype_llama_trains_sharded_in_bf16_like_fp32():
    reference = mixed_llama().float()  # the same (bf16-rounded) start, all fp32

    def rank(topo):
        model = shard(mixed_llama(), topo, mixed_precision=BF16)
        masters = {p.to_local().dtype for p in model.parameters()}
        fp32 = shard(copy.deepcopy(reference), topo)
        return masters, _train(model, topo), _train(fp32, topo), full_params(model)

    for masters, bf16, fp32, params in td.in_process(rank, 2, timeout=240):
        assert masters == {torch.float32}
        bf16, fp32 = torch.tensor(bf16), torch.tensor(fp32)
        assert not torch.equal(bf16, fp32)  # computed in bf16 ...
        torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=1e-2)  # ... within its precision
        assert bf16[2:].sum() < bf16[:2].sum()  # and it trains (the same two batches again)
        assert {p.dtype for p in params.values()} == {torch.float32}


# ----------------------------------------------------------------------------- tied weights
def _tied(model) -> bool:
    return model.lm_head.weight is model.transformer.wte.weight


def test_blocks_that_would_split_a_tied_parameter_are_refused():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    model = copy.deepcopy(model0("gpt2"))
    with td.distributed(td.Topology.single()) as topo:
        with pytest.raises(
            ShardingError,
            match=r"tied parameters \['transformer\.wte\.weight', 'lm_head\.weight'\].*blocks=",
        ):
            shard(model, topo, blocks=[GPT2Block, torch.nn.Embedding])
    assert not td.marks.applied(model)  # refused before anything was sharded


def _save_trained(topo, root: str):
    model = shard(copy.deepcopy(model0("gpt2")), topo)
    assert _tied(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)  # state for the tied param
    step = compose(optimize(opt))(value_and_grad(loss_fn))
    state = td.TrainState(model=model, optimizer=opt)
    for ids, labels in batches("gpt2"):
        state, _ = step(state, _local(ids, labels, topo))
    checkpoint.save(os.path.join(root, "ckpt"), state, topo)
    files = export_safetensors(model, os.path.join(root, "hf"), topo, max_shard_bytes=20_000)
    return _tied(model), full_params(model), files


def _load_and_continue(topo, root: str):
    model = copy.deepcopy(model0("gpt2"))
    model = shard(model, topo) if topo.world_size > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    state = checkpoint.load(
        os.path.join(root, "ckpt"), td.TrainState(model=model, optimizer=opt), topo
    )
    loaded = full_params(model)
    momentum = opt.state[model.lm_head.weight]["momentum_buffer"]
    momentum = momentum.full_tensor() if hasattr(momentum, "full_tensor") else momentum
    step = compose(optimize(opt))(value_and_grad(loss_fn))
    ids, labels = batches("gpt2")[0]
    state, _ = step(state, _local(ids, labels, topo))
    again = (
        shard(copy.deepcopy(model0("gpt2")), topo)
        if topo.world_size > 1
        else copy.deepcopy(model0("gpt2"))
    )
    read = load_safetensors(again, os.path.join(root, "hf"), topo)
    return (
        _tied(model),
        loaded,
        momentum.clone(),
        full_params(model),
        _tied(again),
        full_params(again),
        read,
    )


def test_tied_weights_survive_shard_checkpoint_resharding_and_export(tmp_path):
    model0("gpt2"), batches("gpt2")
    saved = td.in_process(_save_trained, 2, str(tmp_path), timeout=240)
    tied, trained, files = saved[0]
    assert tied and "lm_head.weight" not in trained  # one parameter, one name
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # several files + index
    assert os.path.basename(files[-2]) == "model.safetensors.index.json"

    # the export is HF's layout: from_pretrained ties lm_head to wte again
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert max_diff(full_params(hf), trained) == 0

    results = {n: td.in_process(_load_and_continue, n, str(tmp_path), timeout=240) for n in (4, 1)}
    after = {}
    for n, per_rank in results.items():
        for tied, loaded, momentum, stepped, tied_again, read_back, read in per_rank:
            assert tied and tied_again, n
            assert max_diff(loaded, trained) == 0, n
            assert momentum.abs().sum() > 0
            assert max_diff(read_back, trained) == 0, n
            assert read.tensors == len(read_back)  # the tied one once, though it has two names
            after[n] = stepped
    assert max_diff(after[4], after[1]) <= 1e-6  # the tied update is the same at 4 and 1 ranks
