"""A Llama-style decoder for the GPU acceptance run: RMSNorm, RoPE, causal SDPA, SwiGLU.

``LlamaConfig.one_b()`` is about 0.95 B parameters (dim 2048, 16 layers, SwiGLU 5632, vocab
32000); ``LlamaConfig.tiny()`` is the ``--cpu`` smoke size. The blocks sit in an
``nn.ModuleList`` so regional compile finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq: int

    @classmethod
    def one_b(cls, seq: int = 2048) -> LlamaConfig:
        return cls(dim=2048, layers=16, heads=16, ffn=5632, vocab=32000, seq=seq)

    @classmethod
    def tiny(cls, seq: int = 32) -> LlamaConfig:
        return cls(dim=64, layers=2, heads=4, ffn=128, vocab=256, seq=seq)

    def params(self) -> int:
        per_block = 4 * self.dim**2 + 3 * self.dim * self.ffn + 2 * self.dim
        return self.layers * per_block + 2 * self.vocab * self.dim + self.dim


def rope(seq: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq, device=device).float(), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (seq, 1, head_dim/2)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(c.dim), nn.RMSNorm(c.dim)
        self.wq, self.wk = nn.Linear(c.dim, c.dim, bias=False), nn.Linear(c.dim, c.dim, bias=False)
        self.wv, self.wo = nn.Linear(c.dim, c.dim, bias=False), nn.Linear(c.dim, c.dim, bias=False)
        self.w1 = nn.Linear(c.dim, c.ffn, bias=False)
        self.w3 = nn.Linear(c.dim, c.ffn, bias=False)
        self.w2 = nn.Linear(c.ffn, c.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (w(h).view(shape) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.wo(attn.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.layers)])
        self.norm = nn.RMSNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        cos, sin = rope(idx.shape[1], self.config.dim // self.config.heads, idx.device)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def build(c: LlamaConfig, device: torch.device) -> Llama:
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(c)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    return model


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def batches(c: LlamaConfig, batch: int, count: int, device: torch.device) -> list:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, c.vocab, (batch, c.seq + 1), generator=gen).to(device)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out
