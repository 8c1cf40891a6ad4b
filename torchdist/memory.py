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
everything by ``tp`` (and pipeline parallelism by ``pp``) on top. FSDP2 keeps fp32 sharded
parameters and gradients rather than bf16 ones plus an fp32 copy: 4/N + 4/N + 8/N, the same 16/N.

Variants: ``fp8`` (torchao float8 training) leaves these numbers as they are: master weights stay
fp32 and the fp8 casts are transient (it saves activation memory, communication with fp8
all-gather, and time). ``adamw8bit`` stores the two moments in 1 byte each (optimizer 4 + 2 =
6 bytes), ``adamw4bit`` in half a byte each (4 + 1 = 5), plus small per-block scales (ignored).
Activations are not counted: they depend on batch, sequence length and checkpointing.

Example::

    >>> estimate(7e9, Topology(world_size=8))["shard"].total == 16 * 7e9 / 8
    True
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torchdist.errors import TopologyError
from torchdist.topology import Topology

__all__ = ["StateBytes", "estimate", "params_from_config", "format_table", "OPTIMIZERS"]

#: bytes per parameter of optimizer state (fp32 master weights + moments)
OPTIMIZERS = {"adamw": 12.0, "adamw8bit": 6.0, "adamw4bit": 5.0}


@dataclass(frozen=True)
class StateBytes:
    """Per-rank bytes of model state under one strategy."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def estimate(params: float, topo: Topology, *, optimizer: str = "adamw") -> dict[str, StateBytes]:
    """Per-rank model-state bytes of ``params`` parameters for every strategy on ``topo``.

    Communicates nothing (pure arithmetic on a topology that need not be live).
    """
    if optimizer not in OPTIMIZERS:
        raise TopologyError(f"unknown optimizer {optimizer!r}; expected one of {list(OPTIMIZERS)}.")
    if params <= 0:
        raise TopologyError(f"the parameter count must be positive, got {params}.")
    opt = OPTIMIZERS[optimizer]
    model_parallel = topo.tp * topo.pp
    p = params / model_parallel
    dp, fsdp = topo.dp_size, topo.dp_shard
    return {
        "replicate": StateBytes(2 * p, 2 * p, opt * p),
        "zero1": StateBytes(2 * p, 2 * p, opt * p / dp),
        "zero2": StateBytes(2 * p, 2 * p / dp, opt * p / dp),
        "shard": StateBytes(2 * p / fsdp, 2 * p / fsdp, opt * p / fsdp),
    }


def params_from_config(config: Mapping[str, Any] | str) -> int:
    """Parameter count of a Hugging Face style decoder config (a dict or a JSON file path).

    Understands Llama-style keys (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``vocab_size``, ``tie_word_embeddings``;
    gated MLP) and GPT-2-style keys (``n_embd``, ``n_layer``, ``n_inner``, ``n_positions``).
    Norm weights are counted, biases only for GPT-2.
    """
    if isinstance(config, str):
        with open(config) as handle:
            config = json.load(handle)
    c = dict(config)
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
        per_layer = attn + 3 * h * inner + 2 * h
        head = 0 if c.get("tie_word_embeddings", False) else v * h
        return v * h + layers * per_layer + h + head
    except KeyError as missing:
        raise TopologyError(
            f"the model config has no {missing} key; expected a Hugging Face style decoder "
            "config (Llama: hidden_size, intermediate_size, num_hidden_layers, "
            "num_attention_heads, vocab_size; or GPT-2: n_embd, n_layer, vocab_size)."
        ) from None


def format_table(params: float, topo: Topology) -> str:
    """A text table: strategies x optimizers, per-rank GiB of params/grads/optimizer state."""
    gib = 2.0**30
    lines = [
        f"model state per rank for {params / 1e9:.3g}B parameters, world {topo.world_size}, "
        f"mesh {', '.join(f'{k}={v}' for k, v in topo.axes.items() if v > 1) or 'single'}",
        f"{'strategy':<12}{'optimizer':<11}{'params':>10}{'grads':>10}{'optimizer':>11}"
        f"{'total GiB':>11}",
    ]
    for optimizer in OPTIMIZERS:
        for name, row in estimate(params, topo, optimizer=optimizer).items():
            lines.append(
                f"{name:<12}{optimizer:<11}{row.params / gib:>10.2f}{row.grads / gib:>10.2f}"
                f"{row.optimizer / gib:>11.2f}{row.total / gib:>11.2f}"
            )
    lines.append("fp8 (torchao) leaves model state unchanged; it saves activations and bandwidth.")
    return "\n".join(lines)
