"""torchdist's regional ``compile`` against eager and whole-model ``torch.compile``, on CPU.

A Llama-style model (``benchmarks/gpu/_model.py``, ``--dim``/``--layers``) is trained with the
composed step ``compose(optimize(opt))(value_and_grad(loss_fn))``, AdamW, fp32, four ways:

  eager          no compile;
  td blocks      ``compile`` of the repeated blocks only (``rest=False``);
  td regional    ``compile`` of the blocks, then the rest (embedding, final norm, head);
  whole model    ``model.compile()`` (one graph for everything).

Cold start: each variant in its own fresh interpreter with an empty inductor cache
(``TORCHINDUCTOR_CACHE_DIR`` in a new temporary folder), so no variant profits from another's
compiled graphs: the wall time of the first step (the compile), its CPU time (one compile
thread; this process and the C++ compiler runs it waits for: what the compile costs whatever else
runs on the machine), and the
mean of the next ``--steps``.
Steady state: all four in one process, compiled once, then ``--rounds`` rounds of ``--steps``
steps each, the order rotating every round; per-step medians and the median of per-round ratios
against eager, in wall time and in the process's CPU time (steadier on a shared machine).
torchdist's ``compile`` is reached through ``apply_compile`` only, which works
whether ``compile`` is a model transform (``compile(model, **kw)``) or a step transform.

Not a test: it prints and never asserts.

    python benchmarks/compile.py
    python benchmarks/compile.py --dim 256 --layers 6 --rounds 7
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# Run as a script, this folder is sys.path[0]; its deepspeed.py would shadow the real package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

VARIANTS = ("eager", "td blocks", "td regional", "whole model")


def apply_compile(model: torch.nn.Module, transforms: tuple = (), **kwargs: Any):
    """``(model, transforms)`` with torchdist's ``compile`` applied, whichever kind it is.

    A model transform (``compile(model, **kw)``) compiles ``model`` now; a step transform
    (``compile(**kw)``) is appended as the innermost step transform. The one place that knows.
    """
    from torchdist.transforms import compile as td_compile

    params = list(inspect.signature(td_compile).parameters.values())
    if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return td_compile(model, **kwargs), tuple(transforms)
    kwargs.pop("rest", None)  # the step transform compiles the blocks or the whole model
    return model, (*transforms, td_compile(**kwargs))


def load_model_module() -> Any:
    path = os.path.join(_HERE, "gpu", "_model.py")
    spec = importlib.util.spec_from_file_location("gpu_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def make(variant: str, args: argparse.Namespace):
    """A one-step callable for ``variant`` (built, not yet compiled by a first call)."""
    from torchdist import TrainState
    from torchdist.transforms import compose, optimize, value_and_grad

    m = load_model_module()
    config = m.LlamaConfig(args.dim, args.layers, 4, 2 * args.dim, 256, args.seq)
    model = m.build(config, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    transforms: tuple = (optimize(opt),)
    if variant == "td blocks":
        model, transforms = apply_compile(model, transforms, rest=False)
    elif variant == "td regional":
        model, transforms = apply_compile(model, transforms)
    elif variant == "whole model":
        model.compile()
    step = compose(*transforms)(value_and_grad(m.loss_fn))
    box = [TrainState(model=model, optimizer=opt)]
    data = m.batches(config, args.batch, 4, torch.device("cpu"))
    cursor = [0]

    def one() -> float:
        box[0], metrics = step(box[0], data[cursor[0] % len(data)])
        cursor[0] += 1
        return float(metrics["loss"])

    return one


def _cpu_with_children() -> float:
    """CPU seconds of this process and its finished children (inductor's C++ compiler runs)."""
    import resource

    usage = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


def cold(variant: str, args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    one = make(variant, args)
    built = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), _cpu_with_children()
    loss = one()
    first, first_cpu = time.perf_counter() - t0, _cpu_with_children() - c0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one()
    rest = (time.perf_counter() - t0) / args.steps
    return {"build": built, "first": first, "first_cpu": first_cpu, "next": rest, "loss": loss}


def steady(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-round seconds per step of each variant: wall time, and this process's CPU time (one
    thread: it moves far less than wall time when other processes compete for the cores)."""
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    steps = {v: make(v, args) for v in VARIANTS}
    for one in steps.values():
        for _ in range(2):
            one()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS[r % 4 :] + VARIANTS[: r % 4]:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                steps[v]()
            c1, t1 = time.process_time(), time.perf_counter()
            times[v].append((t1 - t0) / args.steps)
            cpu[v].append((c1 - c0) / args.steps)
    return times, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cold", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold:
        print(json.dumps(cold(args.cold, args)))
        return
    argv = list(sys.argv[1:])
    print(f"compile, CPU: Llama-style dim {args.dim}, {args.layers} layers, seq {args.seq}, "
          f"batch {args.batch}, AdamW fp32, {args.threads} thread(s), "
          f"torch {torch.__version__}")  # fmt: skip
    print("  cold start (fresh interpreter, empty inductor cache each):")
    print(f"  {'variant':<13}{'build s':>9}{'first step s':>14}{'(its CPU s)':>13}"
          f"{'next steps ms':>15}{'loss':>9}")  # fmt: skip
    for v in VARIANTS:
        with tempfile.TemporaryDirectory(prefix="td-compile-bench-") as cache:
            # One compile thread: the cold start of one process, not of a worker pool.
            env = {"TORCHINDUCTOR_COMPILE_THREADS": "1", **os.environ,
                   "TORCHINDUCTOR_CACHE_DIR": cache}  # fmt: skip
            out = subprocess.run([sys.executable, __file__, *argv, "--cold", v], env=env,
                                 capture_output=True, text=True)  # fmt: skip
        if out.returncode:
            print(f"  {v:<13}failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {v:<13}{r['build']:>9.2f}{r['first']:>14.2f}{r['first_cpu']:>13.2f}"
              f"{r['next'] * 1e3:>15.2f}"
              f"{r['loss']:>9.4f}")  # fmt: skip
    times, cpu = steady(args)
    med = statistics.median
    print(f"  steady state ({args.rounds} interleaved rounds x {args.steps} steps, one process; "
          "median of per-round ratios to eager, wall and CPU time):")  # fmt: skip
    for v in VARIANTS:
        ratios = [a / b for a, b in zip(times[v], times["eager"])]
        cpu_ratios = [a / b for a, b in zip(cpu[v], cpu["eager"])]
        print(f"  {v:<13}{med(times[v]) * 1e3:>9.2f} ms/step  (min-max {min(times[v]) * 1e3:.2f}-"
              f"{max(times[v]) * 1e3:.2f}); vs eager: wall {med(ratios):.3f} "
              f"(rounds {min(ratios):.3f}-{max(ratios):.3f}), cpu {med(cpu_ratios):.3f} "
              f"(rounds {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
