"""torchdist's ``deepspeed`` transform against a hand-written DeepSpeed loop: step time, peak RSS.

Timing. An MLP (``--layers`` blocks of Linear(dim, 4 dim) -> GELU -> Linear(4 dim, dim), with
residuals; ~``8 * layers * dim**2`` parameters) is trained four ways on 2 CPU ranks started by
``torchdist.spawn`` (real processes, gloo, ``debug="OFF"``, one thread each), AdamW, fp32:

  (a) hand-written ZeRO-2: ``deepspeed.initialize(model=m, optimizer=opt, config=cfg)`` and the
      loop ``loss = loss_fn(engine, batch); engine.backward(loss); engine.step()``;
  (b) ``torchdist.sharding.deepspeed(m, opt, topo, zero_stage=2, ...)`` and the composed step
      ``compose(optimize())(value_and_grad(loss_fn))``;
  (c), (d): the same with ZeRO-3.

The hand-written config is the one ``deepspeed_config`` builds (same batch sizes, no clipping),
so both run the same DeepSpeed work. All start from the same weights and see the same batches.
Each is warmed up; then ``--rounds`` rounds each time ``--steps`` steps of every variant, in an
order that rotates every round, after a barrier; a block's time is the slower rank's. Reported:
per-step median over rounds, and (b)/(a), (d)/(c) as the median of per-round ratios (neighbours
in time, so load changes on a shared machine cancel). Goal: at most 1.03.

Memory. Each variant again in its own fresh pair of processes, ``--memory-steps`` steps; per
rank the process's peak RSS (``ru_maxrss``) and its growth since the rank started.

Not a test: it prints and never asserts.

    python benchmarks/deepspeed.py
    python benchmarks/deepspeed.py --steps 10 --rounds 9 --dim 512 --layers 4
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import warnings
from typing import Any

# This file is named deepspeed.py: run as a script, its folder is sys.path[0] and would shadow
# the real package for every `import deepspeed` (ours and torchdist's).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torchdist as td  # noqa: E402
from torchdist.sharding._deepspeed import deepspeed, deepspeed_config  # noqa: E402
from torchdist.transforms import compose, optimize, value_and_grad  # noqa: E402

GOAL_RATIO = 1.03
VARIANTS = ("hand-zero2", "td-zero2", "hand-zero3", "td-zero3")


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def build(dim: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(dim) for _ in range(layers)], nn.Linear(dim, dim))


def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def make(variant: str, topo: td.Topology, args: argparse.Namespace):
    """A one-step callable for ``variant``."""
    import deepspeed as ds

    stage = 2 if variant.endswith("2") else 3
    model = build(args.dim, args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if variant.startswith("hand"):
        os.environ.setdefault("LOCAL_RANK", str(topo.local_rank))
        cfg = {
            "train_batch_size": args.batch * topo.world_size,
            "train_micro_batch_size_per_gpu": args.batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = ds.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)

        def one(batch: Any) -> None:
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()

        return one
    assert deepspeed_config(dp=topo.size("dp"), zero_stage=stage, micro_batch_size=args.batch)
    box = [deepspeed(model, opt, topo, zero_stage=stage, micro_batch_size=args.batch)]
    step = compose(optimize())(value_and_grad(loss_fn))

    def one(batch: Any) -> None:
        box[0], _ = step(box[0], batch)

    return one


def batches(args: argparse.Namespace, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1 + rank)
    shape = (args.batch, args.dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
            for _ in range(args.steps)]  # fmt: skip


def timing_rank(topo: td.Topology, args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist

    quiet()
    steps = {name: make(name, topo, args) for name in VARIANTS}
    data = batches(args, topo.rank)
    for one in steps.values():  # warm-up
        for batch in data[:2]:
            one(batch)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            for batch in data:
                steps[name](batch)
            elapsed = torch.tensor(time.perf_counter() - start)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(float(elapsed) / args.steps)
    return times


def memory_rank(topo: td.Topology, args: argparse.Namespace, variant: str) -> dict[str, float]:
    quiet()
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731 MiB
    start = rss()
    one = make(variant, topo, args)
    for batch in batches(args, topo.rank)[: args.memory_steps]:
        one(batch)
    return {"rss": rss(), "growth": rss() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory-steps", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    params = sum(p.numel() for p in build(args.dim, args.layers).parameters())
    print(f"model: {params / 1e6:.2f} M parameters, batch {args.batch}/rank, 2 CPU ranks, AdamW")

    times = td.spawn(timing_rank, 2, args, debug="OFF", timeout=600)[0]
    for name in VARIANTS:
        print(f"{name:>11}: median {statistics.median(times[name]) * 1e3:8.2f} ms/step")
    for hand, ours in (("hand-zero2", "td-zero2"), ("hand-zero3", "td-zero3")):
        ratios = [b / a for a, b in zip(times[hand], times[ours])]
        ratio = statistics.median(ratios)
        verdict = "ok" if ratio <= GOAL_RATIO else "ABOVE GOAL"
        print(f"{ours}/{hand}: median per-round ratio {ratio:.3f} (goal <= {GOAL_RATIO}) "
              f"{verdict}; rounds {', '.join(f'{x:.3f}' for x in ratios)}")  # fmt: skip
    if args.skip_memory:
        return
    for name in VARIANTS:
        per_rank = td.spawn(memory_rank, 2, args, name, debug="OFF", timeout=600)
        shown = ", ".join(f"rank {r}: peak {m['rss']:.0f} MiB (+{m['growth']:.0f})"
                          for r, m in enumerate(per_rank))  # fmt: skip
        print(f"{name:>11}: {shown}")


if __name__ == "__main__":
    main()
