"""Under load: does a long run keep its memory flat, and do many worlds leave nothing behind?

1. **Long run.** ``--steps`` (2,000) small training steps on 2 ranks started by ``torchdist.spawn``
   (real processes, gloo): forward, backward, ``td.all_reduce`` of the gradients (mean), SGD,
   and a ``td.all_reduce`` of the loss as a metric. Each rank samples its RSS (``/proc/self/
   statm``) every ``--every`` steps. Reported per rank: RSS after warm-up (step ``--every``),
   at the end, the maximum, and the slope of a least-squares line over the samples after
   warm-up (KiB per 1,000 steps). Flat means the slope is within a few hundred KiB per 1,000
   steps (allocator noise), not growing with the step count.
2. **Many worlds.** ``--worlds`` (50) worlds created and destroyed one after another in this
   process, as threads (``in_process``, 2 ranks, dp_shard=2) and as processes (``spawn``, 2
   ranks), each running one all-reduce. Counted after the first world (first-use pools start
   there) and after the last: this process's threads (``/proc/self/task``: Python and native,
   gloo's included), open file descriptors (``/proc/self/fd``), sockets among them, TCP ports it
   listens on (``/proc/net/tcp{,6}`` rows in state LISTEN whose inode is one of its sockets),
   and live child processes. Nothing may grow with the number of worlds.

Not a test: it prints and never asserts (``tests/test_soak.py`` runs a cheap version with
assertions). Linux only (``/proc``).

    python benchmarks/soak.py                       # 2,000 steps, 50 + 50 worlds
    python benchmarks/soak.py --steps 500 --worlds 10
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import torch

import torchdist as td

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_kib() -> float:
    """This process's resident set size in KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 1024


def _long_run(topo: td.Topology, steps: int, every: int) -> list[tuple[int, float]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(topo.rank)
    x, y = torch.randn(16, 32, generator=g), torch.randn(16, 1, generator=g)
    samples = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        grads = td.all_reduce([p.grad for p in model.parameters()], topo, op="mean")
        for p, grad in zip(model.parameters(), grads):
            p.grad.copy_(grad)
        opt.step()
        td.all_reduce({"loss": loss.detach()}, topo, op="mean")
        if step % every == 0:
            samples.append((step, rss_kib()))
    return samples


def _slope_per_1000(samples: list[tuple[int, float]]) -> float:
    xs, ys = [s for s, _ in samples], [r for _, r in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def long_run(steps: int, every: int) -> list[dict[str, float]]:
    """Per rank: RSS after warm-up, at the end, max, and slope (KiB / 1,000 steps)."""
    out = []
    for samples in td.spawn(_long_run, 2, steps, every, timeout=max(600, steps), debug="OFF"):
        rest = samples[1:] if len(samples) > 2 else samples  # the first sample is warm-up
        out.append({"warm_kib": samples[0][1], "end_kib": samples[-1][1],
                    "max_kib": max(r for _, r in samples),
                    "slope_kib_per_1000": _slope_per_1000(rest)})  # fmt: skip
    return out


def _listening_inodes() -> set[str]:
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        inodes |= {row.split()[9] for row in rows if row.split()[3] == "0A"}  # 0A: LISTEN
    return inodes


def resources() -> dict[str, int]:
    """Threads, fds, sockets, listening TCP ports and live children of this process."""
    fds = os.listdir("/proc/self/fd")
    sockets = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listdir's own fd)
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    return {"threads": len(os.listdir("/proc/self/task")), "fds": len(fds),
            "sockets": len(sockets), "listening": len(sockets & _listening_inodes()),
            "children": len(multiprocessing.active_children())}  # fmt: skip


def _one_all_reduce(topo: td.Topology) -> float:
    return td.all_reduce(torch.ones(1), topo).item()


def many_worlds(count: int, kind: str) -> tuple[dict[str, int], dict[str, int], float]:
    """``count`` worlds of ``kind`` ("threads" or "processes"); resources after the first and
    after the last, and the mean seconds per world."""
    def world() -> None:
        if kind == "threads":
            assert td.in_process(_one_all_reduce, 2, timeout=60, dp_shard=2) == [2.0, 2.0]
        else:
            assert td.spawn(_one_all_reduce, 2, timeout=60, debug="OFF") == [2.0, 2.0]

    world()
    first = resources()
    start = time.perf_counter()
    for _ in range(count - 1):
        world()
    per_world = (time.perf_counter() - start) / max(count - 1, 1)
    time.sleep(0.2)  # threads that are ending (gloo's, a store's) finish
    return first, resources(), per_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="sample RSS every N steps")
    parser.add_argument("--worlds", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus; load {os.getloadavg()[0]:.1f}")
    # processes first: forked ranks then inherit the least from earlier thread worlds
    for kind in ("processes", "threads"):
        first, last, per = many_worlds(args.worlds, kind)
        grew = {k: last[k] - first[k] for k in first}
        print(f"{args.worlds} worlds as {kind} ({per * 1e3:.0f} ms each): after the first "
              f"{first}, after the last {last}; growth {grew}")  # fmt: skip
    start = time.perf_counter()
    ranks = long_run(args.steps, args.every)
    took = time.perf_counter() - start
    print(f"{args.steps} steps on 2 ranks in {took:.1f} s ({took / args.steps * 1e3:.2f} ms/step)")
    for rank, r in enumerate(ranks):
        print(f"  rank {rank}: RSS {r['warm_kib'] / 1024:.1f} MiB at step {args.every}, "
              f"{r['end_kib'] / 1024:.1f} MiB at the end (max {r['max_kib'] / 1024:.1f}); "
              f"slope {r['slope_kib_per_1000']:+.0f} KiB per 1,000 steps")  # fmt: skip


if __name__ == "__main__":
    main()
