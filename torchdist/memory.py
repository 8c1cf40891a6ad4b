"""Per-rank memory of model state (parameters, gradients, optimizer state) for each strategy.

Bytes per parameter, mixed-precision Adam (the ZeRO paper's accounting; bf16 compute copies,
fp32 master weights and Adam moments), before any division by ranks:

=====================  =======  =====  ==========  =====
strategy               params   grads  optimizer   total
=====================  =======  =====  ==========  =====
replicate (DDP)        2        2      12 (4+4+4)  16
ZeRO-1 (DeepSpeed)     2        2      12 / N      4 + 12/N
ZeRO-2 (DeepSpeed)     2        2 / N  12 / N      2 + 14/N
shard (FSDP2 = ZeRO-3) 2 / N    2 / N  12 / N      16 / N
=====================  =======  =====  ==========  =====

``N`` is the number of ranks that share the state (the data-parallel ranks for ZeRO; ``shard``
divides by ``dp_shard`` only: HSDP replicates across ``dp_replicate``). Tensor parallelism divides
everything by ``tp`` and pipeline parallelism by ``pp`` on top (a stage holds ``1/pp`` of the
blocks; the embeddings sit on the first stage and the head on the last, so those two hold a
little more). Context parallelism (``cp``) does not divide model state: cp ranks hold the same
parameters (``shard`` shards over ``dp_shard``); it divides activations by ``cp``. FSDP2 keeps
fp32 sharded parameters and gradients rather than bf16 ones plus an fp32 copy: 4/N + 4/N + 8/N,
the same 16/N.

Variants: ``fp8`` (torchao float8 training) leaves these numbers as they are: master weights stay
fp32 and the fp8 casts are transient (it saves activation memory, communication with fp8
all-gather, and time). ``adamw8bit`` stores the two moments in 1 byte each (optimizer 4 + 2 =
6 bytes), ``adamw4bit`` in half a byte each (4 + 1 = 5), plus small per-block scales (ignored).
``dtype="fp32"`` (no mixed precision) keeps 4-byte parameters and gradients and no extra master
copy: 4 + 4 + 8 = 16 bytes for Adam. ``sgd`` keeps no moments (only the master copy under mixed
precision), ``momentum`` one 4-byte buffer. Activations are estimated separately
(``activation_bytes``) from a model config, a micro-batch and a sequence length; ``ASSUMPTIONS``
lists what every estimate leaves out.

Example::

    >>> estimate(7e9, Topology(world_size=8))["shard"].total == 16 * 7e9 / 8
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torchdist.errors import TopologyError
from torchdist.topology import Topology

__all__ = [
    "StateBytes",
    "estimate",
    "params_from_config",
    "load_config",
    "params_from_model",
    "activation_bytes",
    "format_table",
    "OPTIMIZERS",
    "DTYPES",
    "ASSUMPTIONS",
    "INFERENCE_DTYPES",
    "largest_layer",
    "inference_table",
]

#: bytes per parameter of optimizer state under mixed precision (fp32 master weights + moments)
OPTIMIZERS = {"adamw": 12.0, "adamw8bit": 6.0, "adamw4bit": 5.0, "sgd": 4.0, "momentum": 8.0}
#: bytes per element of the parameters, gradients and activations in each compute dtype
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
ASSUMPTIONS = (
    "parameters and gradients in the compute dtype; under bf16/fp16 an fp32 master copy sits "
    "in the optimizer state (ZeRO paper accounting)",
    "optimizer state in fp32 (low-bit: 1 or 0.5 byte per moment, block scales ignored)",
    "activations: a Transformer decoder with fused/flash attention (no seq x seq scores), "
    "no sequence parallelism, logits also kept in fp32 for the loss; MLP width from the config",
    "eager PyTorch keeps more activations: on Hugging Face GPT-2 under CPU bf16 autocast "
    "(4 layers, h=512, seq 512, batch 2) the layers saved 1.7x this per-layer term "
    "(fp32 norms, extra views), "
    "and autocast keeps a 16-bit copy of the weights (2 bytes/param); with checkpointing the "
    "saved layer inputs and logits matched it (the estimate adds one layer's recomputation)",
    "left out: CUDA context and allocator fragmentation (~0.5-2 GiB per GPU), communication "
    "buffers (FSDP all-gathered blocks, DDP buckets), temporary tensors of the optimizer step",
)


@dataclass(frozen=True)
class StateBytes:
    """Per-rank bytes of model state under one strategy."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def estimate(
    params: float, topo: Topology, *, optimizer: str = "adamw", dtype: str = "bf16"
) -> dict[str, StateBytes]:
    """Per-rank model-state bytes of ``params`` parameters for every strategy on ``topo``.

    ``dtype``: the compute dtype (``bf16``/``fp16``: mixed precision with an fp32 master copy;
    ``fp32``: none). Communicates nothing (pure arithmetic on a topology that need not be live).
    """
    if optimizer not in OPTIMIZERS:
        raise TopologyError(f"unknown optimizer {optimizer!r}; expected one of {list(OPTIMIZERS)}.")
    if dtype not in DTYPES:
        raise TopologyError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}.")
    if params <= 0:
        raise TopologyError(f"the parameter count must be positive, got {params}.")
    w = float(DTYPES[dtype])
    opt = OPTIMIZERS[optimizer] - (4.0 if dtype == "fp32" else 0.0)  # fp32: no master copy
    model_parallel = topo.tp * topo.pp
    p = params / model_parallel
    dp, fsdp = topo.dp_size, topo.dp_shard
    return {
        "replicate": StateBytes(w * p, w * p, opt * p),
        "zero1": StateBytes(w * p, w * p, opt * p / dp),
        "zero2": StateBytes(w * p, w * p / dp, opt * p / dp),
        "shard": StateBytes(w * p / fsdp, w * p / fsdp, opt * p / fsdp),
    }


def params_from_config(config: Mapping[str, Any] | str) -> int:
    """Parameter count of a Hugging Face style decoder config (a dict or a JSON file path).

    Understands Llama-style keys (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``vocab_size``, ``tie_word_embeddings``;
    gated MLP) and GPT-2-style keys (``n_embd``, ``n_layer``, ``n_inner``, ``n_positions``).
    Norm weights are counted, biases only for GPT-2.
    """
    c = load_config(config) if isinstance(config, (str, os.PathLike)) else _text(config)
    try:
        if "n_embd" in c:  # GPT-2
            h, layers, v = c["n_embd"], c["n_layer"], c["vocab_size"]
            inner = c.get("n_inner") or 4 * h
            per_layer = 4 * h * h + 4 * h + 2 * h * inner + inner + h + 4 * h
            return v * h + c.get("n_positions", 1024) * h + layers * per_layer + 2 * h
        h, layers, v = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        inner = c["intermediate_size"]
        heads = c["num_attention_heads"]
        kv = c.get("num_key_value_heads", heads)
        head_dim = c.get("head_dim", h // heads)
        attn = h * heads * head_dim * 2 + 2 * h * kv * head_dim
        experts = c.get("num_local_experts") or c.get("num_experts") or 1  # MoE: all experts
        per_layer = attn + experts * 3 * h * inner + (h * experts if experts > 1 else 0) + 2 * h
        head = 0 if c.get("tie_word_embeddings", False) else v * h
        return v * h + layers * per_layer + h + head
    except KeyError as missing:
        raise TopologyError(
            f"the model config has no {missing} key; expected a Hugging Face style decoder "
            "config (Llama: hidden_size, intermediate_size, num_hidden_layers, "
            "num_attention_heads, vocab_size; or GPT-2: n_embd, n_layer, vocab_size)."
        ) from None


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Hugging Face ``config.json`` (the file, or a model directory holding it), read locally:
    nothing is downloaded. A multimodal config's ``text_config`` is the decoder's."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise TopologyError(
            f"no model config at {file}; expected a Hugging Face config.json or a model directory "
            "that holds one (download it first, e.g. huggingface-cli download <model> config.json)."
        )
    try:
        with open(file) as handle:
            return _text(json.load(handle))
    except json.JSONDecodeError as exc:
        raise TopologyError(f"{file} is not JSON ({exc}); expected a config.json.") from None


def _text(config: Mapping[str, Any]) -> dict[str, Any]:
    c = dict(config)
    return dict(c["text_config"]) if isinstance(c.get("text_config"), Mapping) else c


def params_from_model(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Parameter count of a local model (a directory or a config.json) and how it was found:
    exactly, from the safetensors headers when the directory has weights (no tensor is read),
    else from the config's shapes."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if files:
            total = sum(_safetensors_numel(os.path.join(path, f)) for f in files)
            return total, f"counted from the headers of {len(files)} safetensors file(s)"
    return params_from_config(path), "computed from config.json shapes"


def _safetensors_numel(file: str) -> int:
    import math
    import struct

    with open(file, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def activation_bytes(
    config: Mapping[str, Any],
    *,
    seq: int,
    batch: int,
    topo: Topology | None = None,
    checkpointing: bool = False,
    dtype: str = "bf16",
    in_flight: int | None = None,
) -> float:
    """Per-rank activation bytes of one forward of a ``batch`` x ``seq`` micro-batch (per
    data-parallel rank) of the decoder ``config`` describes, kept for the backward.

    Per layer ``s*b*h*(10 + 24/tp)`` bytes in 16 bits (Korthikanti et al. 2022, with fused
    attention: no ``s*s`` scores; the MLP term scaled to the config's width), plus the logits
    (``6*s*b*vocab/tp`` bytes: 16-bit, and fp32 for the loss). With activation checkpointing
    only each layer's input (``2*s*b*h``) is kept, plus one layer's activations while it is
    recomputed.

    ``topo.cp`` shards the sequence: ``s`` becomes ``s/cp`` (ring attention keeps no more).
    ``topo.pp``: a stage runs ``ceil(layers/pp)`` layers, and ``in_flight`` micro-batches are
    alive on the first stage at once (default ``pp``: 1F1B and interleaved 1F1B; GPipe keeps
    all its micro-batches), while the last stage holds the logits of one. The larger of the
    two stages is returned, with ``batch`` the micro-batch size. Communicates nothing.
    """
    if seq < 1 or batch < 1:
        raise TopologyError(f"--seq and --batch must be positive, got seq={seq}, batch={batch}.")
    c = _text(config)
    h = c.get("hidden_size") or c.get("n_embd")
    layers = c.get("num_hidden_layers") or c.get("n_layer")
    vocab = c.get("vocab_size")
    if not (h and layers and vocab):
        raise TopologyError(
            "activations need the model's hidden size, layer count and vocabulary "
            "(hidden_size/n_embd, num_hidden_layers/n_layer, vocab_size); pass --model with a "
            "config.json that has them."
        )
    inner = c.get("intermediate_size") or c.get("n_inner") or 4 * h
    gated = "intermediate_size" in c  # Llama-style gated MLP: three matrices, not two
    tp = topo.tp if topo is not None else 1
    cp = topo.cp if topo is not None else 1
    pp = topo.pp if topo is not None else 1
    seq = seq / cp
    scale = DTYPES[dtype] / 2
    # 10 s*b*h bytes (norm inputs, attention in/out, residuals) do not split with tp;
    # 24 do (q, k, v, attention output, and the MLP: 16 of them at a 4h width, 2 matrices).
    mlp = 16 * (inner / (4 * h)) * (1.5 if gated else 1.0)
    per_layer = seq * batch * h * (10 + (8 + mlp) / tp) * scale  # bytes, 16-bit
    # The head's output is kept for its backward, and its fp32 copy for the loss.
    logits = (4.0 + (DTYPES[dtype] if dtype != "fp32" else 0)) * seq * batch * vocab / tp
    if pp > 1:
        stage_layers = -(-layers // pp)
        flight = pp if in_flight is None else in_flight
        kept = 2 * seq * batch * h * scale if checkpointing else per_layer
        recompute = per_layer if checkpointing else 0.0
        first = flight * stage_layers * kept + recompute
        last = stage_layers * kept + recompute + logits
        return max(first, last)
    if checkpointing:
        return layers * 2 * seq * batch * h * scale + per_layer + logits
    return layers * per_layer + logits


def format_table(
    params: float,
    topo: Topology,
    *,
    optimizers: tuple[str, ...] | None = None,
    dtype: str = "bf16",
    config: Mapping[str, Any] | None = None,
    seq: int | None = None,
    batch: int | None = None,
) -> str:
    """A text table: strategies x optimizers, per-rank GiB of params/grads/optimizer state; with
    ``config``, ``seq`` and ``batch`` also activations with and without checkpointing; then the
    assumptions."""
    gib = 2.0**30
    lines = [
        f"model state per rank for {params / 1e9:.3g}B parameters ({dtype}), world "
        f"{topo.world_size}, mesh "
        f"{', '.join(f'{k}={v}' for k, v in topo.axes.items() if v > 1) or 'single'}",
        f"{'strategy':<12}{'optimizer':<11}{'params':>10}{'grads':>10}{'optimizer':>11}"
        f"{'total GiB':>11}",
    ]
    for optimizer in optimizers or tuple(OPTIMIZERS):
        for name, row in estimate(params, topo, optimizer=optimizer, dtype=dtype).items():
            lines.append(
                f"{name:<12}{optimizer:<11}{row.params / gib:>10.2f}{row.grads / gib:>10.2f}"
                f"{row.optimizer / gib:>11.2f}{row.total / gib:>11.2f}"
            )
    if config is not None and seq and batch:
        full, ckpt = (
            activation_bytes(config, seq=seq, batch=batch, topo=topo, checkpointing=c, dtype=dtype)
            / gib
            for c in (False, True)
        )
        lines.append(
            f"activations per rank, micro-batch {batch} x seq {seq}: {full:.2f} GiB; with "
            f"checkpoint_activations {ckpt:.2f} GiB (add to the total above)"
        )
        if topo.pp > 1 or topo.cp > 1:
            lines.append(
                "  (" + "; ".join(
                    ([f"cp={topo.cp}: {seq // topo.cp} tokens of each sequence per rank"]
                     if topo.cp > 1 else [])
                    + ([f"pp={topo.pp}: the busier stage, 1F1B ({topo.pp} micro-batches alive "
                        "on the first; GPipe keeps all of them)"] if topo.pp > 1 else [])
                ) + ")"
            )  # fmt: skip
    lines.append("fp8 (torchao) leaves model state unchanged; it saves activations and bandwidth.")
    lines.append("assumptions:")
    lines += [f"  - {line}" for line in ASSUMPTIONS]
    return "\n".join(lines)


#: bytes per parameter of inference weights in each storage dtype (accelerate estimate-memory's)
INFERENCE_DTYPES = {"fp32": 4.0, "bf16/fp16": 2.0, "int8": 1.0, "int4": 0.5}


def largest_layer(config: Mapping[str, Any]) -> tuple[str, int]:
    """The largest unit ``torchdist.inference`` moves at once, and its parameter count: one
    decoder layer, or the token embedding when it is bigger. Communicates nothing."""
    c = _text(config)
    key = "n_layer" if "n_embd" in c else "num_hidden_layers"
    layer = params_from_config({**c, key: 1}) - params_from_config({**c, key: 0})
    embedding = c["vocab_size"] * (c.get("n_embd") or c["hidden_size"])
    return ("embedding", embedding) if embedding > layer else ("decoder layer", layer)


def inference_table(params: float, *, config: Mapping[str, Any] | None = None) -> str:
    """A text table: inference weight GiB per storage dtype, and the largest layer's, which a
    device map must leave free on the compute device to run offloaded layers."""
    gib = 2.0**30
    name, largest = largest_layer(config) if config is not None else ("", 0)
    lines = [
        "inference (weights only, no KV cache or activations)"
        + (f"; largest layer: {name}, {largest / 1e6:.1f}M parameters" if name else ""),
        f"{'dtype':<12}{'weights GiB':>12}{'largest layer GiB':>19}",
    ]
    for dtype, size in INFERENCE_DTYPES.items():
        layer = f"{largest * size / gib:>19.3f}" if name else f"{'(needs --model)':>19}"
        lines.append(f"{dtype:<12}{params * size / gib:>12.2f}{layer}")
    return "\n".join(lines)
