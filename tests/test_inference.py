"""torchdist.inference: meta init, device maps, and dispatched forwards equal to the plain model."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdist as td
from torchdist.checkpoint import export_safetensors
from torchdist.inference import (
    DeviceMap,
    dispatched,
    infer_device_map,
    init_empty,
    load_and_dispatch,
    parse_size,
)

sys.path.insert(0, str(Path(__file__).parent))
from _sharding_models import Model  # noqa: E402

ATOL = 1e-6


class Block(nn.Module):
    """Attention + MLP with a persistent and a non-persistent buffer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.register_buffer("scale", torch.full((dim,), 0.5))
        self.register_buffer("bias", torch.linspace(-1, 1, dim), persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.scale * self.down(F.gelu(self.up(x))) + self.bias


class GPT(nn.Module):
    """Tied embedding/head, a direct parameter on the root, blocks in a ModuleList."""

    def __init__(self, vocab: int = 32, dim: int = 16, layers: int = 3, seq: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _unique_bytes(model: nn.Module) -> int:
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    torch.manual_seed(0)
    ref = GPT().eval()
    root = tmp_path_factory.mktemp("gpt")
    export_safetensors(ref, root / "one", td.Topology.single())
    export_safetensors(ref, root / "many", td.Topology.single(), max_shard_bytes=4000)
    idx = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        want = ref(idx)
    return ref, root, idx, want


# --------------------------------------------------------------------------- init_empty
def test_init_empty_puts_parameters_on_meta_and_keeps_buffers_and_ties():
    model = init_empty(GPT)
    assert all(p.is_meta for p in model.parameters())
    assert not model.blocks[0].bias.is_meta and torch.equal(
        model.blocks[0].bias, torch.linspace(-1, 1, 16)
    )
    assert model.head.weight is model.tok.weight
    assert nn.Module.register_parameter is not None and all(
        not p.is_meta for p in GPT().parameters()
    )  # the patch is gone once the build returns
    assert all(b.is_meta for b in init_empty(GPT, include_buffers=True).buffers())


# --------------------------------------------------------------------------- sizes and maps
@pytest.mark.parametrize(
    "text, expected",
    [("20GiB", 20 * 2**30), ("8GB", 8 * 10**9), ("512MB", 512 * 10**6), ("1.5 GiB", 3 * 2**29),
     ("100", 100), (4096, 4096), ("3kib", 3072)],
)  # fmt: skip
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


def test_a_model_that_fits_maps_whole_and_the_map_is_a_frozen_value():
    model = init_empty(GPT)
    dmap = infer_device_map(model, max_memory={"cpu": "1GiB"})
    assert dict(dmap) == {"": "cpu"} and dmap.compute_device == "cpu"
    assert dmap == DeviceMap.of({"": "cpu"}) or dmap.entries == (("", "cpu"),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dmap.entries = ()  # type: ignore[misc]
    hash(dmap)
    assert "<model>" in str(dmap) and "cpu" in str(dmap)


def test_infer_device_map_keeps_blocks_whole_counts_ties_once_and_reserves_a_block():
    model = init_empty(GPT)
    block = _unique_bytes(GPT().blocks[0])
    budget = 2 * block + 1000
    dmap = infer_device_map(model, max_memory={"cpu": budget, "disk": "1GiB"})
    assert all(not k.startswith("blocks.0.") for k in dmap), "a block was split"
    assert {dmap.device_of(f"blocks.{i}.qkv.weight") for i in range(3)} <= {"cpu", "disk"}
    assert "disk" in dmap.devices
    per_device = dict(dmap.bytes_per_device)
    assert sum(per_device.values()) == _unique_bytes(GPT())  # the tied weight counted once
    assert per_device["cpu"] <= budget - block  # room kept to run one offloaded block
    assert "blocks.1" in str(dmap)


def test_infer_device_map_honours_no_split_and_dtype():
    model = init_empty(GPT)
    half = infer_device_map(model, max_memory={"cpu": "1GiB"}, dtype=torch.float16)
    assert (
        dict(half.bytes_per_device)["cpu"] < dict(infer_device_map(model).bytes_per_device)["cpu"]
    )
    dmap = infer_device_map(model, max_memory={"cpu": 8000, "disk": "1GiB"}, no_split=[])
    assert any(k.startswith("blocks.0.") for k in dmap)  # nothing kept whole: leaves mapped


# --------------------------------------------------------------------------- parity
MAPS = {
    "cpu": {"": "cpu"},
    "disk": {"": "disk"},
    "mixed": {"tok": "cpu", "pos": "disk", "blocks.0": "disk", "blocks.1": "cpu",
              "blocks.2": "disk", "head": "disk"},
}  # fmt: skip


@pytest.mark.parametrize("layout", ["one", "many"])
@pytest.mark.parametrize("kind", list(MAPS))
def test_dispatched_forward_equals_the_plain_model(gpt, kind, layout):
    ref, root, idx, want = gpt
    model = load_and_dispatch(init_empty(GPT), root / layout, MAPS[kind])
    with torch.no_grad():
        got = model(idx)
        again = model(idx)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(again, want, atol=ATOL, rtol=0)
    record = dispatched(model)
    assert sum(record.stored_bytes.values()) == _unique_bytes(ref) - 3 * 16 * 4  # no dup, no
    # non-persistent buffers (they are not loaded; 3 blocks x 16 floats)
    if kind != "cpu":  # offloaded weights are released after the forward
        assert model.blocks[0].qkv.weight.is_meta
    assert not model.blocks[0].bias.is_meta


def test_auto_map_under_a_budget_and_a_state_dict_source_written_to_offload_dir(gpt, tmp_path):
    ref, _, idx, want = gpt
    block = _unique_bytes(GPT().blocks[0])
    model = load_and_dispatch(
        init_empty(GPT), ref.state_dict(), "auto",
        max_memory={"cpu": 2 * block + 1000, "disk": "1GiB"}, offload_dir=tmp_path,
    )  # fmt: skip
    assert (tmp_path / "offload.safetensors").is_file()
    assert set(dispatched(model).stored_bytes) == {"cpu", "disk"}
    with torch.no_grad():
        torch.testing.assert_close(model(idx), want, atol=ATOL, rtol=0)


def test_sharding_model_and_a_torch_save_file_with_a_dtype_cast(tmp_path):
    torch.manual_seed(1)
    ref = Model(16)
    torch.save(ref.state_dict(), tmp_path / "model.pt")
    x = torch.randn(4, 8, dtype=torch.float64)
    model = load_and_dispatch(
        init_empty(lambda: Model(16)), tmp_path / "model.pt",
        {"inp": "cpu", "blocks": "disk", "out": "cpu"}, offload_dir=tmp_path / "off",
        dtype=torch.float64,
    )  # fmt: skip
    assert model.inp.weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.double()(x), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("tie", [True, False])
def test_hf_llama_logits_and_generate_on_a_dispatched_model(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)  # transformers' own writer: the same HF layout
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        want = ref(ids).logits
        tokens = ref.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    model = init_empty(lambda: transformers.LlamaForCausalLM(cfg)).eval()
    layer = _unique_bytes(ref.model.layers[0])
    model = load_and_dispatch(model, tmp_path, max_memory={"cpu": 2 * layer, "disk": "1GiB"})
    dmap = dispatched(model).device_map
    assert "disk" in dmap.devices and any(k.startswith("model.layers.") for k in dmap)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=ATOL, rtol=0)
        got = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, tokens)


def test_offloaded_blocks_are_loaded_one_at_a_time(gpt):
    _, root, idx, want = gpt
    model = load_and_dispatch(init_empty(GPT), root / "many", {"": "disk"})
    seen = []

    def watch(i):
        def hook(module, args):
            seen.append([b.qkv.weight.is_meta for b in model.blocks])

        return hook

    for i, block in enumerate(model.blocks):
        block.qkv.register_forward_pre_hook(watch(i))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), want, atol=ATOL, rtol=0)
    assert seen == [[i != j for j in range(3)] for i in range(3)]  # only the running block is real
    assert all(b.qkv.weight.is_meta for b in model.blocks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cpu_and_disk_in_one_map(gpt):
    _, root, idx, want = gpt
    dmap = {"tok": 0, "pos": 0, "blocks.0": "cuda:0", "blocks.1": "cpu", "blocks.2": "disk",
            "head": "cpu"}  # fmt: skip
    model = load_and_dispatch(init_empty(GPT), root / "one", dmap)
    assert model.blocks[0].qkv.weight.device.type == "cuda" and model.blocks[1].qkv.weight.is_meta
    with torch.no_grad():
        got = model(idx.cuda())
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=0)  # TF32-free fp32 on GPU


def test_the_safetensors_names_and_dtype_codes_match_the_exporter():
    from torchdist.checkpoint import _safetensors as exporter
    from torchdist.inference import _weights

    assert (_weights.SINGLE, _weights.INDEX) == (exporter.SINGLE, exporter.INDEX)
    assert _weights._CODES == {code: dtype for dtype, code in exporter._DTYPES.items()}


def test_a_bf16_checkpoint_loads_as_the_models_dtype_unless_dtype_is_given(tmp_path):
    torch.manual_seed(2)
    ref = Model(16).to(torch.bfloat16)
    export_safetensors(ref, tmp_path, td.Topology.single())
    x = torch.randn(2, 8)
    for dmap in ({"": "cpu"}, {"": "disk"}):
        model = load_and_dispatch(init_empty(lambda: Model(16)), tmp_path, dmap)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref.float()(x), atol=ATOL, rtol=0)
        ref = ref.to(torch.bfloat16)
    half = load_and_dispatch(init_empty(lambda: Model(16)), tmp_path, {"": "cpu"},
                             dtype=torch.bfloat16)  # fmt: skip
    assert half.inp.weight.dtype == torch.bfloat16
