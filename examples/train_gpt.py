"""Train a small byte-level GPT with torchdist: a complete research-style script.

The corpus is the Python source of this repository (real text, shipped with it, no download).
Every rank reads its share of each global batch; gradients are averaged with ``sync_grads``;
the step is composed inline.

Run on 2 CPU ranks (what `just demo` does)::

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --steps 60

or on one process: ``python examples/train_gpt.py``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdist as td
from torchdist.transforms import accumulate, autocast, clip_grads, compose, optimize, sync_grads, value_and_grad

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 128, layers: int = 2, heads: int = 4, seq: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def load_corpus() -> torch.Tensor:
    text = b"".join(p.read_bytes() for p in sorted(ROOT.glob("torchdist/**/*.py")))
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def global_batch(corpus: torch.Tensor, step: int, batch: int, seq: int, seed: int):
    """The same global batch on every rank: a pure function of (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=gen)
    window = torch.stack([corpus[s : s + seq + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()

    topo = td.Topology.from_env(device="cpu")
    with td.distributed(topo) as topo:
        td.print0(topo, f"world {topo.world_size} ranks, mesh {topo.axes}, device {topo.device}")
        td.set_seed(args.seed)
        model = td.to_device(GPT(dim=args.dim, layers=args.layers, seq=args.seq), topo)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
        )
        transforms = [optimize(opt, sched), clip_grads(1.0), sync_grads(topo)]
        if args.accumulate > 1:
            transforms.append(accumulate(args.accumulate))
        if args.bf16:
            transforms.append(autocast(torch.bfloat16))
        step = compose(*transforms)(value_and_grad(loss_fn))

        corpus = load_corpus()
        state = td.TrainState(model=model, optimizer=opt, scheduler=sched)
        tokens_per_step = args.batch * args.seq
        start = last = time.perf_counter()
        for i in range(args.steps):
            x, y = global_batch(corpus, i, args.batch, args.seq, args.seed)
            mine = td.split_between_ranks({"x": x, "y": y}, topo, axis="dp")
            state, metrics = step(state, td.to_device((mine["x"], mine["y"]), topo))
            if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
                m = td.all_reduce(metrics, topo, op="mean", axis="dp")  # reduced only when logged
                now = time.perf_counter()
                rate = tokens_per_step * args.log_every / (now - last)
                td.print0(
                    topo,
                    f"step {i + 1:4d}/{args.steps}  loss {m['loss'].item():.4f}  "
                    f"grad_norm {m['grad_norm'].item():.3f}  {rate:,.0f} tokens/s",
                    flush=True,
                )
                last = now
        final = td.all_reduce(metrics["loss"], topo, op="mean", axis="dp").item()
        td.print0(topo, f"done: {args.steps} steps in {time.perf_counter() - start:.1f} s, final loss {final:.4f}")


if __name__ == "__main__":
    main()
