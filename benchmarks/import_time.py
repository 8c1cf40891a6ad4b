"""How much `import torchdist` costs on top of `import torch`, and what heavy modules it pulls in.

Each sample is a fresh interpreter (``sys.executable -c "import ..."``), timed from the parent:
wall time with ``time.perf_counter`` and CPU time (user + sys of the child, from
``getrusage(RUSAGE_CHILDREN)``). The two commands alternate, and the order within a pair flips
every pair, so drift on a shared machine hits both equally. The report is the median of each, the
difference of the medians and the median of the per-pair differences; the goal is that torchdist
adds less than 0.05 s of wall time. Interpreter start-up is in both and cancels out. CPU time is
printed beside wall time because it moves less when other processes compete for the cores. Each
torchdist child also times ``import torchdist`` right after ``import torch`` inside itself: the
sharpest figure, since the whole-process times vary by more than the difference they measure.

Bytecode: by default the children write and reuse ``.pyc`` files under a private
``PYTHONPYCACHEPREFIX`` (a temporary directory kept between runs), as a normal install does, even
when the environment sets ``PYTHONDONTWRITEBYTECODE``; the first warm-up pair fills it (a few
seconds, once). ``--as-is`` runs the children with the environment unchanged instead, which, with
``PYTHONDONTWRITEBYTECODE=1`` and no ``__pycache__`` in the source tree, adds the compilation of
torchdist's sources to every import.

A last child imports torchdist and lists which heavy optional modules came with it (torchao,
deepspeed, FSDP, dynamo); the lazy submodules should keep that list empty.

Not a test: it prints and never asserts.

    python benchmarks/import_time.py            # 15 pairs
    python benchmarks/import_time.py --runs 31
"""

from __future__ import annotations

import argparse
import ast
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

GOAL_S = 0.05
HEAVY = ("torchao", "deepspeed", "torch.distributed.fsdp", "torch._dynamo")
PYCACHE = os.path.join(tempfile.gettempdir(), "torchdist-bench-pycache")


def child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# Each child also times its own imports, so that the cost of torchdist *after* torch is measured
# inside one process (``import torch`` first, then ``import torchdist``): the sharpest number on a
# noisy machine, since nothing else in that interval varies. Costs a perf_counter call or two.
CHILD = {
    "torch": "import torch",
    "torchdist": "import time; import torch; w, c = time.perf_counter(), time.process_time(); "
    "import torchdist; print(time.perf_counter() - w, time.process_time() - c)",
}


def time_import(module: str, env: dict[str, str]) -> tuple[float, float, tuple[float, float]]:
    """(wall s, cpu s, (wall s, cpu s) of torchdist after torch, in the child) of a fresh
    interpreter importing ``module``."""
    cpu0 = child_cpu_s()
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD[module]], check=True, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    after_torch = tuple(map(float, out.stdout.split())) if module == "torchdist" else (0.0, 0.0)
    return wall, child_cpu_s() - cpu0, after_torch


def heavy_modules(env: dict[str, str]) -> list[str]:
    code = f"import sys, torchdist\nprint([m for m in {HEAVY!r} if m in sys.modules])\n"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    )
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def summary(name: str, samples: list[float]) -> str:
    return (
        f"{name:<26}: {statistics.median(samples):.3f} s  "
        f"(min {min(samples):.3f}, max {max(samples):.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed pairs of imports (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs first (default 2)")
    parser.add_argument(
        "--as-is",
        action="store_true",
        help="run the children in this environment unchanged (no private bytecode cache)",
    )
    args = parser.parse_args()

    env = dict(os.environ)
    if args.as_is:
        bytecode = f"as-is (PYTHONDONTWRITEBYTECODE={env.get('PYTHONDONTWRITEBYTECODE', '')!r})"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = PYCACHE
        bytecode = f"cached under PYTHONPYCACHEPREFIX={PYCACHE}"

    for _ in range(max(args.warmup, 1)):
        time_import("torch", env)
        time_import("torchdist", env)

    wall = {"torch": [], "torchdist": []}
    cpu = {"torch": [], "torchdist": []}
    incremental: list[tuple[float, float]] = []
    for i in range(args.runs):
        order = ("torch", "torchdist") if i % 2 == 0 else ("torchdist", "torch")
        for module in order:
            w, c, after_torch = time_import(module, env)
            wall[module].append(w)
            cpu[module].append(c)
            if module == "torchdist":
                incremental.append(after_torch)

    def diffs(samples):
        med = statistics.median(samples["torchdist"]) - statistics.median(samples["torch"])
        pair = statistics.median(b - a for a, b in zip(samples["torch"], samples["torchdist"]))
        return med, pair

    def spread(samples):
        """Interquartile range of the per-pair differences: the noise the difference sits in."""
        pairs = sorted(b - a for a, b in zip(samples["torch"], samples["torchdist"]))
        q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [0.0, 0.0, 0.0]
        return q[2] - q[0]

    print(f"python: {sys.executable}")
    print(f"bytecode: {bytecode}")
    print(f"pairs: {args.runs} timed (interleaved, order alternating), {args.warmup} warm-up")
    print("wall time")
    print("  " + summary("median `import torch`", wall["torch"]))
    print("  " + summary("median `import torchdist`", wall["torchdist"]))
    wall_diff, wall_pair = diffs(wall)
    print(f"  difference of medians     : {wall_diff * 1000:+.1f} ms")
    print(
        f"  median per-pair difference: {wall_pair * 1000:+.1f} ms "
        f"(IQR of the pair differences: {spread(wall) * 1000:.0f} ms)"
    )
    print("cpu time (user + sys of the child)")
    print("  " + summary("median `import torch`", cpu["torch"]))
    print("  " + summary("median `import torchdist`", cpu["torchdist"]))
    cpu_diff, cpu_pair = diffs(cpu)
    print(f"  difference of medians     : {cpu_diff * 1000:+.1f} ms")
    print(
        f"  median per-pair difference: {cpu_pair * 1000:+.1f} ms "
        f"(IQR of the pair differences: {spread(cpu) * 1000:.0f} ms)"
    )
    inc_wall = [w for w, _ in incremental]
    inc_cpu = [c for _, c in incremental]
    print("in one process: `import torchdist` right after `import torch`")
    print("  " + summary("wall", inc_wall))
    print("  " + summary("cpu", inc_cpu))
    print(f"goal: torchdist adds < {GOAL_S * 1000:.0f} ms over `import torch`")
    for name, value in (
        ("whole-process wall, difference of medians", wall_diff),
        ("whole-process cpu, difference of medians", cpu_diff),
        ("in-process wall, median", statistics.median(inc_wall)),
        ("in-process cpu, median", statistics.median(inc_cpu)),
    ):
        verdict = "meets" if value < GOAL_S else "misses"
        print(f"  {name:<42}: {value * 1000:+7.1f} ms -> {verdict} the goal")
    if spread(wall) > GOAL_S:
        print(
            "  (the whole-process wall difference is within noise on this machine: the pair "
            "differences spread wider than the goal; trust the in-process figures)"
        )

    heavy = heavy_modules(env)
    print(
        f"heavy modules imported by `import torchdist`: {heavy or 'none'} "
        f"(checked: {', '.join(HEAVY)})"
    )


if __name__ == "__main__":
    main()
