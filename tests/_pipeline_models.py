"""The small models the pipeline tests share (not collected as tests).

``Model`` follows the pipeline convention (``torchdist.sharding.pipeline``): its forward skips a
module that is ``None`` and iterates over the blocks it holds.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PLAN = {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


class Model(nn.Module):
    """An input projection, ``layers`` residual MLP blocks, an output head."""

    def __init__(self, d: int = 8, layers: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inp is not None:
            x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x) if self.out is not None else x


class TokenModel(nn.Module):
    """Tokens and positions in, logits out, every token on its own (no attention): context
    parallelism's sharding, positions and loss can be checked on CPU with it."""

    def __init__(self, vocab: int = 11, d: int = 8, seq: int = 16) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.tok is None:  # a later pipeline stage: idx are the activations
            x = idx
        else:
            if positions is None:
                positions = torch.arange(idx.shape[1], device=idx.device)
            x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(x) if self.head is not None else x


class AttentionModel(TokenModel):
    """``TokenModel`` with causal SDPA in front of its blocks (one head)."""

    def __init__(self, vocab: int = 11, d: int = 8, seq: int = 16) -> None:
        super().__init__(vocab, d, seq)
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # (batch, 1 head, seq, d)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
