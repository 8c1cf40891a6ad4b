"""Tiny Hugging Face models built from configs with random weights (no download), their data,
and the single-process oracle the HF tests share (not collected as tests).

Dropout is off everywhere so that training is deterministic; the sizes are the smallest that
still have several heads, key/value groups and layers. Models are built in the main thread from
fixed seeds (in-process ranks share the global RNG) and deep-copied by each rank.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
from _seeded import seeded

# A test module importing this one is skipped, not failed, where transformers is missing.
transformers = pytest.importorskip("transformers")

VOCAB, SEQ, GLOBAL_BATCH, STEPS, LR = 64, 8, 8, 2, 0.1


def llama_config(**overrides) -> transformers.LlamaConfig:
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attention_dropout=0.0)  # fmt: skip
    config.update(overrides)
    return transformers.LlamaConfig(**config)


def qwen2_config(**overrides) -> transformers.Qwen2Config:
    # 4 key/value heads so that tp=4 fits; tied embeddings, as the small Qwen2 checkpoints have.
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                  tie_word_embeddings=True, attention_dropout=0.0)  # fmt: skip
    config.update(overrides)
    return transformers.Qwen2Config(**config)


def gpt2_config(**overrides) -> transformers.GPT2Config:
    config = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    config.update(overrides)
    return transformers.GPT2Config(**config)


def bert_config(**overrides) -> transformers.BertConfig:
    config = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=32, num_labels=3,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    config.update(overrides)
    return transformers.BertConfig(**config)


BUILDERS = {
    "llama": lambda: transformers.LlamaForCausalLM(llama_config()),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(qwen2_config()),
    "gpt2": lambda: transformers.GPT2LMHeadModel(gpt2_config()),
    "bert": lambda: transformers.BertForSequenceClassification(bert_config()),
}
LAYERS = {
    "llama": ("model.layers.0", "model.layers.1"),
    "qwen2": ("model.layers.0", "model.layers.1"),
    "gpt2": ("transformer.h.0", "transformer.h.1"),
    "bert": ("bert.encoder.layer.0", "bert.encoder.layer.1"),
}



@functools.cache
def model0(kind: str) -> nn.Module:
    """The starting model of ``kind`` (train mode; never trained: tests deep-copy it)."""
    return seeded(0, BUILDERS[kind]).train()


@functools.cache
def batches(kind: str) -> tuple:
    """``STEPS`` global batches ``(input_ids, labels)``: the tokens for causal LMs, a class for
    BERT."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
        labels = torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen) if kind == "bert" else ids
        out.append((ids, labels))
    return tuple(out)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """HF's own loss: mean token cross-entropy (shifted) or sequence-classification CE."""
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter at its full value (a collective for DTensors: all ranks call it)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].shape == b[k].shape, k
    return max((a[k] - b[k]).abs().max().item() for k in a)


@functools.cache
def reference(kind: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Plain torch on one process, the whole global batch per step: (final params, losses)."""
    model = copy.deepcopy(model0(kind))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in batches(kind):
        loss = loss_fn(model, batch)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return full_params(model), losses
