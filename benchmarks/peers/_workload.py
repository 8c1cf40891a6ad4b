"""The one workload every peer runs: a small GPT, fixed token batches, AdamW, fp32.

Pure setup, no process group: the model, the data (one list of global batches, each rank takes a
contiguous slice), the loss, and the single-process reference loss curve every variant is
compared with.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 256


@dataclass(frozen=True)
class Workload:
    """Sizes of the workload; ``batch`` is sequences per rank per step."""

    dim: int = 128
    layers: int = 2
    heads: int = 4
    seq: int = 64
    batch: int = 4
    batches: int = 6  # distinct global batches, cycled
    lr: float = 1e-3


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, w: Workload) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, w.dim), nn.Embedding(w.seq, w.dim)
        self.blocks = nn.ModuleList([Block(w.dim, w.heads) for _ in range(w.layers)])
        self.ln, self.head = nn.LayerNorm(w.dim), nn.Linear(w.dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build(w: Workload) -> GPT:
    """The same initial weights on every rank and in the reference (seed 0)."""
    torch.manual_seed(0)
    return GPT(w)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def global_batches(w: Workload, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(w.batches):
        tokens = torch.randint(0, VOCAB, (w.batch * world, w.seq + 1), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def local(batch: tuple[torch.Tensor, ...], rank: int, per_rank: int) -> tuple[torch.Tensor, ...]:
    return tuple(t[rank * per_rank : (rank + 1) * per_rank] for t in batch)


def reference_losses(w: Workload, world: int, steps: int) -> list[float]:
    """Single-process training on the global batches, in the order every variant sees them."""
    model = build(w)
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0)
    data = global_batches(w, world)
    out = []
    for i in range(steps):
        loss = loss_fn(model, data[i % len(data)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(float(loss))
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
