"""torchdist side by side with raw torch, Accelerate, Lightning Fabric and DeepSpeed: one workload.

Launch on 2 CPU ranks (see README.md in this folder for the extras to install)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/peers/run.py
    ... benchmarks/peers/run.py --rounds 9 --steps 6 --only torch-ddp,td-replicate

Every variant trains the same small GPT (``_workload.py``) from the same weights on the same
batches with AdamW in fp32, all in the same two rank processes. After a warm-up, ``--rounds``
rounds each time ``--steps`` steps of every variant, in an order that rotates every round, after a
barrier; a block's time is the slower rank's. Printed per variant: the per-step median over the
rounds with its min-max (the noise), the median of per-round ratios against its raw-torch
counterpart (neighbours in time, so load changes on a shared machine cancel) with their min-max,
the peak RSS of each rank after the variant was built and warmed (``ru_maxrss`` only grows, so the
growth column is what the variant added over what ran before it), and the largest difference
between its global mean loss and single-process training's, step by step. ``torch DDP again``
is an A/A control: its ratio to ``torch DDP`` is the run's noise floor. Ratios of the ranks' CPU
time (``process_time``, averaged over ranks) are printed beside wall time: on a shared machine
they move far less with other processes' load.

Modes a peer cannot run on CPU are reported with the reason. Accelerate's FSDP2 plugin becomes
DDP on CPU without saying so; the ``mode`` column shows what the prepared model actually is, and
its ratio is then taken against ``torch DDP``, never presented as FSDP2.

Not a test: it prints and never asserts.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _variants import BUILDERS, Runner, Unavailable  # noqa: E402
from _workload import Workload, global_batches, local, peak_rss_mib, reference_losses  # noqa: E402

import torchdist as td  # noqa: E402

GOAL = 1.02
# DeepSpeed's JIT-built CPU comm op: the same git-ignored cache the test suite uses.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
    _ROOT, ".cache", "torch_extensions", f"torch-{torch.__version__}"))  # fmt: skip


def quiet() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("DeepSpeed", "lightning", "lightning.fabric", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def build_all(topo: td.Topology, w: Workload, names: list[str], warmup: int, data: list):
    runners: dict[str, Runner] = {}
    skipped: dict[str, str] = {}
    losses: dict[str, list[torch.Tensor]] = {}
    rss: dict[str, tuple[float, float]] = {}
    for name in names:
        before = peak_rss_mib()
        reason = ""
        try:
            runner = BUILDERS[name](topo, w)
            quiet()  # peers may reset the intra-op thread count
            losses[name] = [runner.step(data[i % len(data)]) for i in range(warmup)]
        except Unavailable as exc:
            reason = str(exc)
        except Exception as exc:  # a peer's failure is a result to report, not a crash
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        ok = torch.tensor([0 if reason else 1])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            skipped[name] = reason or "failed on another rank"
            losses.pop(name, None)
            continue
        runners[name] = runner
        rss[name] = (peak_rss_mib(), peak_rss_mib() - before)
    return runners, skipped, losses, rss


def rank_main(args: argparse.Namespace) -> None:
    quiet()
    w = Workload(dim=args.dim, layers=args.layers, seq=args.seq, batch=args.batch)
    topo = td.Topology.from_env(dp_shard=-1)
    with td.distributed(topo, timeout=600.0) as topo:
        data = [local(b, topo.rank, w.batch) for b in global_batches(w, topo.world_size)]
        names = args.only.split(",") if args.only else list(BUILDERS)
        start = time.perf_counter()
        runners, skipped, losses, rss = build_all(topo, w, names, args.warmup, data)
        built = time.perf_counter() - start
        order = list(runners)
        times: dict[str, list[float]] = {n: [] for n in order}
        cpu: dict[str, list[float]] = {n: [] for n in order}
        cursor = dict.fromkeys(order, args.warmup)
        start = time.perf_counter()
        for r in range(args.rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                step = runners[name].step
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    losses[name].append(step(data[cursor[name] % len(data)]))
                    cursor[name] += 1
                c1, t1 = time.process_time(), time.perf_counter()
                times[name].append(slowest(t1 - t0) / args.steps)
                cpu[name].append((c1 - c0) / args.steps)
        timed = time.perf_counter() - start
        curves = {}
        for name in order:
            mean = torch.stack([x.float().reshape(()) for x in losses[name]])
            dist.all_reduce(mean)
            curves[name] = (mean / topo.world_size).tolist()
        for name in order:  # CPU seconds of the rank processes, averaged over ranks
            mean = torch.tensor(cpu[name], dtype=torch.float64)
            dist.all_reduce(mean)
            cpu[name] = (mean / topo.world_size).tolist()
        all_rss = [None] * topo.world_size
        dist.all_gather_object(all_rss, rss)
        if topo.rank == 0:
            ref = reference_losses(w, topo.world_size, args.warmup + args.rounds * args.steps)
            report(args, w, topo, runners, skipped, times, cpu, curves, ref, all_rss, built, timed)
        dist.barrier()


def report(args, w, topo, runners, skipped, times, cpu, curves, ref, all_rss, built, timed):
    params = sum(p.numel() for p in __import__("_workload").build(w).parameters())
    print(f"\npeers: GPT dim {w.dim}, {w.layers} layers, seq {w.seq}, batch {w.batch}/rank, "
          f"{params / 1e6:.3f} M params, AdamW fp32, {topo.world_size} CPU ranks (gloo, 1 thread "
          f"each); warm-up {args.warmup}, {args.rounds} rounds x {args.steps} steps; build "
          f"{built:.0f} s, timing {timed:.0f} s")  # fmt: skip
    head = (f"  {'variant':<34}{'mode':<28}{'ms/step':>9}{'(min-max)':>15}{'vs raw':>8}"
            f"{'(round min-max)':>17}  {'peak RSS MiB/rank (+growth)':<30}"
            f"{'max |dloss|':>12}")  # fmt: skip
    print(head)
    med = statistics.median
    verdicts = []
    for name, runner in runners.items():
        t = times[name]
        base = runner.baseline if runner.baseline in times else None
        if base:
            ratios = [a / b for a, b in zip(t, times[base])]
            ratio = f"{med(ratios):>8.3f}{f'({min(ratios):.3f}-{max(ratios):.3f})':>17}"
            if name.startswith("td-") or name == "torch-ddp-again":
                cpu_ratio = med(a / b for a, b in zip(cpu[name], cpu[base]))
                verdicts.append((runner.name, runners[base].name, med(ratios), cpu_ratio))
        else:
            ratio = f"{'-':>8}{'':>17}"
        mems = ", ".join(f"{r[name][0]:.0f} (+{r[name][1]:.0f})" for r in all_rss)
        dloss = max(abs(a - b) for a, b in zip(curves[name], ref))
        spread = f"({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})"
        print(f"  {runner.name:<34}{runner.mode[:27]:<28}{med(t) * 1e3:>9.2f}{spread:>15}{ratio}"
              f"  {mems:<30}{dloss:>12.1e}")  # fmt: skip
        if len(runner.mode) > 27:
            print(f"    mode: {runner.mode}")
    for name, reason in skipped.items():
        print(f"  {name:<34}not run: {reason}")
    band = None
    if "torch-ddp-again" in times and "torch-ddp" in times:
        r = sorted(a / b for a, b in zip(times["torch-ddp-again"], times["torch-ddp"]))
        q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
        band = (q[0], q[2])
        print(f"  noise floor (A/A: torch DDP again / torch DDP): median {med(r):.3f}, quartiles "
              f"[{q[0]:.3f}, {q[2]:.3f}]; inside that band is noise")  # fmt: skip
    print(
        "  against raw torch (median of per-round ratios; wall, and CPU time of the ranks, "
        f"which load from other processes disturbs less; goal <= {GOAL}):"
    )

    def verdict(ratio: float, noise: tuple[float, float] | None) -> str:
        if ratio <= GOAL:
            return "within the goal"
        if noise is not None and ratio <= noise[1]:
            return "above the goal, inside the A/A noise band"
        return "ABOVE the goal"

    for ours, raw, ratio, cpu_ratio in verdicts:
        print(f"    {ours} / {raw}: wall {ratio:.3f} ({verdict(ratio, band)}), "
              f"cpu {cpu_ratio:.3f} ({verdict(cpu_ratio, None)})")  # fmt: skip
    print("  torchdist against peers in the same mode (median of per-round ratios, wall with its "
          "[quartiles], and cpu):")  # fmt: skip
    family = lambda n: runners[n].baseline or n  # noqa: E731  raw variant = its mode family
    for ours in (n for n in runners if n.startswith("td-")):
        for peer in runners:
            if peer.split("-")[0] in ("accelerate", "fabric", "deepspeed") and family(
                peer
            ) == family(ours):
                r = sorted(a / b for a, b in zip(times[ours], times[peer]))
                q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0], r[0], r[0]]
                c = med(a / b for a, b in zip(cpu[ours], cpu[peer]))
                print(f"    {runners[ours].name} / {runners[peer].name}: wall {med(r):.3f} "
                      f"[{q[0]:.3f}, {q[2]:.3f}], cpu {c:.3f}")  # fmt: skip
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--only", default="", help="comma-separated: " + ",".join(BUILDERS))
    rank_main(parser.parse_args())


if __name__ == "__main__":
    main()
