"""torchdist's sharding transforms against the torch they wrap: step time and per-rank memory.

Timing. A small GPT-style model (token + position embedding, pre-norm blocks of causal
self-attention and a 4x GELU MLP in an ``nn.ModuleList``, an LM head) is trained four ways on 2
CPU ranks started by ``torchdist.spawn`` (real processes, gloo, ``debug="OFF"``, one thread each):

  (a) hand-written FSDP2: ``fully_shard`` on every block, then on the root, and the loop
      ``loss_fn(model, batch).backward(); opt.step(); opt.zero_grad(set_to_none=True)``;
  (b) ``torchdist.sharding.shard`` and the composed step
      ``compose(optimize(opt))(value_and_grad(loss_fn))``;
  (c) hand-written DDP: ``torch.nn.parallel.DistributedDataParallel`` and the same loop as (a);
  (d) ``torchdist.sharding.replicate`` and the composed step of (b).

All four start from the same weights (one seed) and see the same batches, with AdamW. Each is
warmed up; then ``--rounds`` rounds each time ``--steps`` steps of every variant, in an order that
rotates every round, after a barrier; a block's time is the slower rank's. Reported: per-step
median over rounds (wall, and CPU time of the rank process), and (b)/(a), (d)/(c) both as the ratio
of the medians and as the median of per-round ratios (neighbours in time, so load changes on a
shared machine cancel). Goal: at most 1.03. The trained models are compared at the end: (a) and
(b), and (c) and (d), took the same steps on the same data, so they should agree closely.

Memory. A bigger model of the same shape (``--params-m`` million parameters, default 50) is built
on N = 2 and N = 4 ranks, once with ``replicate`` (every rank builds the whole model) and once with
``shard`` (built on the meta device, sharded, then ``materialize``-d with ``init=``, so no rank
ever holds the whole model), and trained ``--memory-steps`` steps with AdamW. Per rank it reports
the bytes of parameters + gradients + Adam state (a DTensor counted by its local shard,
``to_local()``; after one more backward so the gradients exist), and the process's peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) with its growth since the rank started. Goal: ``shard``'s
state bytes within 5 % of 1/N of ``replicate``'s. Peak RSS also holds torch itself, activations,
DDP's gradient buckets and optimizer temporaries, so it falls by less than 1/N.

Not a test: it prints and never asserts. Results are computed on the ranks and printed once.

    python benchmarks/sharding.py
    python benchmarks/sharding.py --steps 10 --rounds 9 --params-m 20
    python benchmarks/sharding.py --skip-memory          # timing only
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdist as td
from torchdist.sharding import materialize, replicate, shard
from torchdist.transforms import compose, optimize, value_and_grad

VOCAB = 256
GOAL_RATIO = 1.03
GOAL_MEMORY = 0.05
VARIANTS = ("fully_shard, hand loop", "shard, composed", "DDP, hand loop", "replicate, composed")


# --------------------------------------------------------------------------- the model
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
    def __init__(self, dim: int, layers: int, seq: int, heads: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def layers_for(params_m: float, dim: int) -> int:
    """Blocks of width ``dim`` (12 dim^2 parameters each) that make about ``params_m`` M."""
    return max(1, round(params_m * 1e6 / (12 * dim * dim)))


def make_batches(seed: int, count: int, batch: int, seq: int) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """Full parameter values (a collective for DTensors); DDP's ``module.`` prefix is ignored."""
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in model.parameters()
    ]


# --------------------------------------------------------------------------- timing
class Variant:
    """One way of training, with its own model, optimizer and batch cursor."""

    def __init__(self, name: str, model: nn.Module, composed: bool) -> None:
        self.name, self.model = name, model
        self.opt = make_optimizer(model)
        self.cursor = 0
        if composed:
            step = compose(optimize(self.opt))(value_and_grad(loss_fn))
            state = [td.TrainState(model=model, optimizer=self.opt)]

            def one(batch: Any) -> None:
                state[0], _ = step(state[0], batch)

        else:

            def one(batch: Any) -> None:
                loss_fn(model, batch).backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)

        self.one: Callable[[Any], None] = one

    def run(self, steps: int, data: list) -> None:
        for _ in range(steps):
            self.one(data[self.cursor % len(data)])
            self.cursor += 1


def quiet_rank() -> None:
    """One intra-op thread per rank (2 ranks on 2 cores), and no per-step torch warnings: the
    root's output is a view (harmless here) and DTensor's RNG is local on a CPU mesh."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    warnings.filterwarnings("ignore", message=".*DTensor random operators.*")


def timing_rank(topo: td.Topology, args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    quiet_rank()
    torch.manual_seed(0)
    base = GPT(args.dim, args.layers, args.seq)
    params = sum(p.numel() for p in base.parameters())
    dp_mesh, dp_group = topo.mesh["dp_shard"], topo.submesh("dp").get_group()

    hand_fsdp = copy.deepcopy(base)
    for block in hand_fsdp.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(hand_fsdp, mesh=dp_mesh)
    variants = [
        Variant(VARIANTS[0], hand_fsdp, composed=False),
        Variant(VARIANTS[1], shard(copy.deepcopy(base), topo), composed=True),
        Variant(
            VARIANTS[2],
            nn.parallel.DistributedDataParallel(copy.deepcopy(base), process_group=dp_group),
            composed=False,
        ),
        Variant(VARIANTS[3], replicate(copy.deepcopy(base), topo), composed=True),
    ]
    data = make_batches(100 + topo.rank, 8, args.batch, args.seq)

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    for variant in variants:  # warm-up: lazy init, allocator, DDP's bucket rebuild
        variant.run(args.warmup, data)
    wall = [[0.0] * len(variants) for _ in range(args.rounds)]
    cpu = [[0.0] * len(variants) for _ in range(args.rounds)]
    for r in range(args.rounds):
        order = list(range(len(variants)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            dist.barrier()
            w0, c0 = time.perf_counter(), time.process_time()
            variants[i].run(args.steps, data)
            c1, w1 = time.process_time(), time.perf_counter()
            wall[r][i] = slowest(w1 - w0) / args.steps
            cpu[r][i] = (c1 - c0) / args.steps
    cpu_avg = torch.tensor(cpu, dtype=torch.float64)
    dist.all_reduce(cpu_avg)
    finals = [full_params(v.model) for v in variants]

    def drift(a: int, b: int) -> float:
        return max((x - y).abs().max().item() for x, y in zip(finals[a], finals[b], strict=True))

    return {
        "params": params,
        "wall": wall,
        "cpu": (cpu_avg / topo.world_size).tolist(),
        "drift": (drift(0, 1), drift(2, 3)),
        "trained": max((x - y).abs().max().item() for x, y in zip(finals[0], full_params(base))),
    }


# --------------------------------------------------------------------------- memory
def _bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def _init(model: nn.Module) -> None:
    """``init=`` for ``materialize``: GPT-2-like values, on shards, never the full model."""
    for name, p in model.named_parameters():
        if "ln" in name.split(".")[-2]:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02)


def memory_rank(topo: td.Topology, args: argparse.Namespace, kind: str) -> dict[str, Any]:
    quiet_rank()
    rss_start = _rss_mb()
    layers = layers_for(args.params_m, args.memory_dim)
    if kind == "replicate":
        torch.manual_seed(0)
        model = replicate(GPT(args.memory_dim, layers, args.memory_seq), topo)
    else:
        with torch.device("meta"):
            model = GPT(args.memory_dim, layers, args.memory_seq)
        model = materialize(shard(model, topo), "cpu", init=_init)
    opt = make_optimizer(model)
    step = compose(optimize(opt))(value_and_grad(loss_fn))
    state = td.TrainState(model=model, optimizer=opt)
    data = make_batches(200 + topo.rank, 1, args.memory_batch, args.memory_seq)
    for _ in range(args.memory_steps):
        state, metrics = step(state, data[0])
    value_and_grad(loss_fn)(state, data[0])  # gradients present, as in the middle of a step
    params = list(model.parameters())
    adam = sum(_bytes(v) for p in params for v in opt.state[p].values() if torch.is_tensor(v))
    return {
        "params": sum(_bytes(p) for p in params),
        "grads": sum(_bytes(p.grad) for p in params),
        "adam": adam,
        "numel": sum(p.numel() for p in params),  # full sizes
        "rss": _rss_mb(),
        "rss_growth": _rss_mb() - rss_start,
        "loss": float(metrics["loss"]),
    }


# --------------------------------------------------------------------------- report
def med(xs: list[float]) -> float:
    return statistics.median(xs)


def report_timing(res: dict[str, Any], args: argparse.Namespace) -> None:
    wall, cpu = res["wall"], res["cpu"]
    col = lambda table, i: [row[i] for row in table]  # noqa: E731
    print(f"  {'variant':<26}{'wall ms/step median':>21}{'(min-max)':>18}{'cpu ms/step':>13}")
    for i, name in enumerate(VARIANTS):
        w = col(wall, i)
        spread = f"({min(w) * 1e3:.1f}-{max(w) * 1e3:.1f})"
        print(f"  {name:<26}{med(w) * 1e3:>21.2f}{spread:>18}{med(col(cpu, i)) * 1e3:>13.2f}")
    for label, ours, hand in (("shard / fully_shard", 1, 0), ("replicate / DDP", 3, 2)):
        per_round = [row[ours] / row[hand] for row in wall]
        of_medians = med(col(wall, ours)) / med(col(wall, hand))
        cpu_ratio = med(col(cpu, ours)) / med(col(cpu, hand))
        verdict = "meets" if med(per_round) <= GOAL_RATIO else "misses"
        print(
            f"  {label}: wall {med(per_round):.3f} (median of per-round ratios), "
            f"{of_medians:.3f} (ratio of medians); cpu {cpu_ratio:.3f}; {verdict} the goal "
            f"<= {GOAL_RATIO}"
        )
    d_fsdp, d_ddp = res["drift"]
    print(
        f"  agreement after {args.warmup + args.rounds * args.steps} steps each: max |param diff| "
        f"fully_shard vs shard {d_fsdp:.1e}, DDP vs replicate {d_ddp:.1e} "
        f"(moved {res['trained']:.1e} from the start)"
    )


def report_memory(rows: dict[tuple[int, str], list[dict[str, Any]]]) -> None:
    mb = 2**20
    print(
        f"  {'N':>2} {'transform':<10}{'params MB':>11}{'grads MB':>10}{'Adam MB':>9}"
        f"{'state MB':>10}{'of replicate':>14}{'peak RSS MB':>13}{'RSS growth MB':>15}"
    )
    for (n, kind), ranks in sorted(rows.items()):
        worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["adam"])
        state = worst["params"] + worst["grads"] + worst["adam"]
        full = rows[(n, "replicate")]
        full_state = max(r["params"] + r["grads"] + r["adam"] for r in full)
        share = state / full_state
        print(
            f"  {n:>2} {kind:<10}{worst['params'] / mb:>11.1f}{worst['grads'] / mb:>10.1f}"
            f"{worst['adam'] / mb:>9.1f}{state / mb:>10.1f}{share:>14.4f}"
            f"{max(r['rss'] for r in ranks):>13.0f}{max(r['rss_growth'] for r in ranks):>15.0f}"
        )
    for n in sorted({n for n, _ in rows}):
        full = max(r["params"] + r["grads"] + r["adam"] for r in rows[(n, "replicate")])
        ours = max(r["params"] + r["grads"] + r["adam"] for r in rows[(n, "shard")])
        off = ours / (full / n) - 1
        verdict = "meets" if abs(off) <= GOAL_MEMORY else "misses"
        rss_full = max(r["rss"] for r in rows[(n, "replicate")])
        rss_ours = max(r["rss"] for r in rows[(n, "shard")])
        print(
            f"  N={n}: shard state per rank = {ours / full:.4f} of replicate's "
            f"({1 / n:.4f} ideal, {off:+.2%} off 1/N: {verdict} the goal +-{GOAL_MEMORY:.0%}); "
            f"peak RSS {rss_ours / rss_full:.3f} of replicate's"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--params-m", type=float, default=50.0, help="memory model size, M")
    parser.add_argument("--memory-dim", type=int, default=512)
    parser.add_argument("--memory-seq", type=int, default=64)
    parser.add_argument("--memory-batch", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--memory-ranks", default="2,4", help="comma-separated world sizes")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    print(f"torch {torch.__version__}; CPU, gloo, one thread per rank; debug=OFF")
    if not args.skip_timing:
        start = time.perf_counter()
        res = td.spawn(timing_rank, 2, args, debug="OFF", timeout=1800.0)[0]
        print(
            f"\nstep time: 2 ranks, GPT dim {args.dim}, {args.layers} layers, seq {args.seq}, "
            f"batch {args.batch}/rank, {res['params'] / 1e6:.2f} M parameters, AdamW; "
            f"{args.rounds} rounds x {args.steps} steps per variant "
            f"({time.perf_counter() - start:.0f} s)"
        )
        report_timing(res, args)
    if not args.skip_memory:
        start = time.perf_counter()
        rows: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for n in (int(x) for x in args.memory_ranks.split(",")):
            for kind in ("replicate", "shard"):
                rows[(n, kind)] = td.spawn(memory_rank, n, args, kind, debug="OFF", timeout=1800.0)
        numel = next(iter(rows.values()))[0]["numel"]
        layers = layers_for(args.params_m, args.memory_dim)
        print(
            f"\nmemory per rank: GPT dim {args.memory_dim}, {layers} layers, "
            f"{numel / 1e6:.1f} M parameters, fp32, AdamW, {args.memory_steps} steps "
            f"({time.perf_counter() - start:.0f} s); worst rank shown"
        )
        report_memory(rows)
        losses = {k: [round(r["loss"], 3) for r in v] for k, v in rows.items()}
        print(f"  last losses (finite = trained): {losses}")


if __name__ == "__main__":
    main()
