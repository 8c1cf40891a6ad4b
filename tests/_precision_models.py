"""The small GPT-style model and data the precision tests share (not a test module).

``GPT``: token + position embeddings, pre-norm attention/MLP blocks in a ModuleList, a rank-24
adapter (its 24-wide Linears are not multiples of 16) and a bias-free LM head. In the order
``named_modules`` lists its Linears, the first is ``blocks.0.qkv`` and the last ``head``; outside
the blocks, the first is ``adapter_down``.

``markov_batches``: token sequences from a fixed random Markov chain in which every token has
``fanout`` equally likely successors, so the loss falls from ln(vocab) towards ln(fanout) and
never reaches zero -- relative comparisons of final losses stay meaningful.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=bias), nn.Linear(dim, dim, bias=bias)
        self.up, self.down = nn.Linear(dim, 4 * dim, bias=bias), nn.Linear(4 * dim, dim, bias=bias)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(
        self, vocab: int = 64, dim: int = 64, layers: int = 2, heads: int = 4, seq: int = 32,
        adapter: int = 24, bias: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, bias) for _ in range(layers))
        self.adapter_down, self.adapter_up = nn.Linear(dim, adapter), nn.Linear(adapter, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        x = x + self.adapter_up(self.adapter_down(x))
        return self.head(self.norm(x))


# What Float8Recipe's default filter converts in GPT(layers=2): every block Linear (the edges it
# skips lie outside the blocks: the adapter's first Linear and the head); not the 24-wide adapter.
DEFAULT_FP8_LAYERS = (
    "blocks.0.qkv", "blocks.0.proj", "blocks.0.up", "blocks.0.down",
    "blocks.1.qkv", "blocks.1.proj", "blocks.1.up", "blocks.1.down",
)  # fmt: skip


@contextlib.contextmanager
def onednn_off() -> Iterator[None]:
    """Run CPU ``torch._scaled_mm`` on torch's emulated path (dequantize, then a float matmul).

    With oneDNN on, torch 2.13 sends tensorwise-scaled fp8 matmuls to oneDNN, which on a CPU
    without fp8 instructions (AMX-FP16/AVX10.2) runs its reference kernel: about 80 ms for a
    128x64x256 product, 180x the emulated path, and the fp8 tests' whole cost on such a
    machine. The results are the same; only the process-wide oneDNN switch is flipped, so
    enter it in the main thread, around the worlds it should cover.
    """
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def build_gpt(seed: int = 0, **kwargs) -> GPT:
    """A GPT initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT(**kwargs)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def markov_batches(
    steps: int, batch: int, seq: int, vocab: int = 64, fanout: int = 4, seed: int = 0
):
    """``steps`` batches of ``(tokens, next tokens)`` from a fixed random Markov chain."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, fanout), generator=gen)
    batches = []
    for _ in range(steps):
        toks = torch.empty(batch, seq + 1, dtype=torch.long)
        toks[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(seq):
            pick = torch.randint(0, fanout, (batch,), generator=gen)
            toks[:, t + 1] = successors[toks[:, t], pick]
        batches.append((toks[:, :-1], toks[:, 1:]))
    return batches
