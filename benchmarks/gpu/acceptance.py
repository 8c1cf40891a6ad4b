"""GPU acceptance: fp8 (tensorwise, rowwise) vs bf16 tokens/s, compile on and off, peak memory,
and a bf16 loss-parity check, torchdist's composed step beside a hand-written torchao loop.

One table, one process, one GPU. Each row is one configuration, built fresh (model, AdamW,
fp32 master weights, ``torch.autocast`` bf16 around the forward), ``--warmup`` steps (the first
one compiles; its time is the ``cold s`` column), then ``--steps`` timed steps between two device
synchronisations. ``td`` rows use ``autocast_fp8(model, Float8Recipe.<recipe>())`` and
``compose(optimize(opt), autocast(torch.bfloat16))(value_and_grad(loss_fn))``; ``hand`` rows use
``torchao.float8.convert_to_float8_training`` on the very layers the recipe selects, and the
loop ``with torch.autocast(...): loss = loss_fn(model, batch)``, ``loss.backward()``,
``opt.step()``, ``opt.zero_grad(set_to_none=True)``. Compile on: torchdist's regional
``compile`` (through ``benchmarks/compile.py``'s ``apply_compile``) for ``td``, and
``block.compile()`` on every block for ``hand`` (torchtitan's per-block compile).

Parity: the bf16 ``td`` and ``hand`` rows (same compile setting) see the same batches from the
same weights; their losses must agree to ``--parity-atol`` at every step. The exit status is 1
when parity fails, when no parity pair was measured at all, or when a row raised.

``--cpu`` runs the same code on a tiny model on CPU in seconds (``compile`` with
``--compile-backend aot_eager`` there: Dynamo and AOTAutograd run, inductor's C++ codegen is
skipped), for the test suite. A time budget (``--budget-s``, 420 s on a GPU: with the start of the
interpreter and CUDA, the run ends under 8 minutes) skips, and names, each row that would end
past it, judged by the slowest row of the same compile setting so far.

    bash benchmarks/gpu/run.sh            # one NVIDIA GPU, ~1 B parameter model
    bash benchmarks/gpu/run.sh --cpu      # smoke
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

RECIPES = ("bf16", "tensorwise", "rowwise")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="smoke mode: tiny model on CPU")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="override the model's depth")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--compile", default="off,on", help="off, on or off,on")
    parser.add_argument("--compile-backend", default=None, help="default: inductor (aot_eager "
                        "with --cpu)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=None,
                        help="default 420 (GPU), 270 (--cpu)")  # fmt: skip
    parser.add_argument("--parity-atol", type=float, default=None)
    return parser


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    build_parser().print_help()  # at once: importing torch first takes seconds on a busy CPU
    sys.exit(0)

import torch  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def _load(name: str, path: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


M = _load("gpu_model", os.path.join(_HERE, "_model.py"))
apply_compile = _load("bench_compile", os.path.join(_HERE, "..", "compile.py")).apply_compile


@dataclass
class Row:
    recipe: str
    impl: str  # "td" or "hand"
    compiled: bool
    tokens_s: float = 0.0
    cold_s: float = 0.0
    peak: float = 0.0  # GiB on GPU (max allocated), MiB of RSS on CPU
    losses: tuple[float, ...] = ()
    error: str = ""
    skipped: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_step(row: Row, config: Any, device: torch.device, compile_kwargs: dict):
    """A one-step callable returning the loss (a tensor), for ``row``'s configuration."""
    from torchdist import TrainState
    from torchdist.precision import Float8Recipe, autocast_fp8
    from torchdist.transforms import autocast, compose, optimize, value_and_grad

    model = M.build(config, device)
    recipes = {  # one GPU, no shard: the fp8 all-gather weight subclass would be pure overhead
        "bf16": lambda: None,
        "tensorwise": lambda: Float8Recipe.tensorwise(fsdp_float8_all_gather=False),
        "rowwise": Float8Recipe.rowwise,
    }
    recipe = recipes[row.recipe]()
    if row.impl == "td":
        if recipe is not None:
            model = autocast_fp8(model, recipe)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        transforms: tuple = (optimize(opt), autocast(torch.bfloat16))
        if row.compiled:
            model, transforms = apply_compile(model, transforms, **compile_kwargs)
        step = compose(*transforms)(value_and_grad(M.loss_fn))
        box = [TrainState(model=model, optimizer=opt)]

        def one(batch: Any) -> torch.Tensor:
            box[0], metrics = step(box[0], batch)
            return metrics["loss"]

        return one

    if recipe is not None:
        from torchao.float8 import convert_to_float8_training

        chosen = set(recipe.select(model))
        convert_to_float8_training(model, config=recipe.to_torchao(),
                                   module_filter_fn=lambda _m, fqn: fqn in chosen)  # fmt: skip
    if row.compiled:
        for block in model.blocks:
            block.compile(**compile_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def one(batch: Any) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = M.loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return one


def run_row(row: Row, args: argparse.Namespace, config: Any, device: torch.device) -> None:
    kwargs = {"backend": args.compile_backend} if args.compile_backend else {}
    data = M.batches(config, args.batch, 4, device)
    torch._dynamo.reset()  # first: compiled code may hold the previous row's model alive
    reset_peak(device)
    one = make_step(row, config, device, kwargs)
    losses = []
    sync(device)
    t0 = time.perf_counter()
    losses.append(one(data[0]))
    sync(device)
    row.cold_s = time.perf_counter() - t0
    for i in range(1, args.warmup):
        losses.append(one(data[i % len(data)]))
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        losses.append(one(data[(args.warmup + i) % len(data)]))
    sync(device)
    elapsed = time.perf_counter() - t0
    row.tokens_s = args.batch * config.seq * args.steps / elapsed
    row.peak = peak(device)
    row.losses = tuple(float(x) for x in losses)
    del one, losses
    torch._dynamo.reset()
    reset_peak(device)


def table(rows: list[Row], device: torch.device) -> list[str]:
    unit = "peak GiB" if device.type == "cuda" else "peak RSS MiB"
    out = [f"{'recipe':<12}{'compile':<9}{'impl':<6}{'tokens/s':>12}{'vs bf16':>9}"
           f"{'td/hand':>9}{'cold s':>9}{unit:>14}{'last loss':>11}"]  # fmt: skip
    find = {(r.recipe, r.impl, r.compiled): r for r in rows}
    for r in rows:
        head = f"{r.recipe:<12}{'on' if r.compiled else 'off':<9}{r.impl:<6}"
        if r.error or r.skipped:
            out.append(head + (f"error: {r.error}" if r.error else f"skipped: {r.skipped}"))
            continue
        base = find.get(("bf16", r.impl, r.compiled))
        other = find.get((r.recipe, "hand" if r.impl == "td" else "td", r.compiled))
        vs = f"{r.tokens_s / base.tokens_s:.3f}" if base and base.tokens_s else "-"
        td_hand = "-"
        if other and other.tokens_s and r.impl == "td":
            td_hand = f"{r.tokens_s / other.tokens_s:.3f}"
        out.append(head + f"{r.tokens_s:>12.0f}{vs:>9}{td_hand:>9}{r.cold_s:>9.2f}"
                   f"{r.peak:>14.2f}{r.losses[-1]:>11.4f}")  # fmt: skip
    return out


def parity(rows: list[Row], atol: float) -> tuple[bool, list[str]]:
    """Each measured bf16 td-vs-hand check passes, and at least one was measured."""
    lines, ok, measured = [], True, 0
    for compiled in (False, True):
        find = {(r.recipe, r.impl, r.compiled): r for r in rows if r.losses}
        td, hand = find.get(("bf16", "td", compiled)), find.get(("bf16", "hand", compiled))
        if td is None or hand is None:
            lines.append(f"bf16 parity, compile {'on' if compiled else 'off'}: not measured")
            continue
        diff = max(abs(a - b) for a, b in zip(td.losses, hand.losses))
        good = diff <= atol
        ok &= good
        measured += 1
        lines.append(f"bf16 parity, compile {'on' if compiled else 'off'}: max |loss td - hand| "
                     f"over {len(td.losses)} steps = {diff:.2e} ({'PASS' if good else 'FAIL'}, "
                     f"atol {atol:g})")  # fmt: skip
    return ok and measured > 0, lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cpu:
        device, config = torch.device("cpu"), M.LlamaConfig.tiny(seq=args.seq or 32)
        defaults = {"batch": 2, "warmup": 1, "steps": 1, "budget_s": 270.0, "parity_atol": 1e-4,
                    "compile_backend": "aot_eager"}  # fmt: skip
        torch.set_num_threads(1)  # seconds, on a shared machine
        # oneDNN runs tensorwise fp8 matmuls with its reference kernel on CPUs without fp8
        # instructions (~180x torch's emulated path, same results): the smoke takes the latter
        torch.backends.mkldnn.enabled = False
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu for the smoke mode", file=sys.stderr)
            return 2
        device, config = torch.device("cuda", 0), M.LlamaConfig.one_b(seq=args.seq or 2048)
        defaults = {"batch": 4, "warmup": 3, "steps": 8, "budget_s": 420.0, "parity_atol": 2e-2,
                    "compile_backend": None}  # fmt: skip
        torch.backends.cuda.matmul.allow_tf32 = True
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.layers is not None:
        config = M.LlamaConfig(config.dim, args.layers, config.heads, config.ffn, config.vocab,
                               config.seq)  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu acceptance on {name}: Llama-style {config.params() / 1e9:.3f} B parameters "
          f"(dim {config.dim}, {config.layers} layers), seq {config.seq}, batch {args.batch}, "
          f"AdamW, bf16 autocast, fp32 master weights; warm-up {args.warmup}, {args.steps} timed "
          f"steps; torch {torch.__version__}")  # fmt: skip
    rows = [Row(recipe, impl, c == "on") for c in args.compile.split(",")
            for recipe in args.recipes.split(",") for impl in ("td", "hand")]  # fmt: skip
    start = time.perf_counter()
    took: dict[bool, float] = {}  # the longest row so far, per compile setting
    for row in rows:
        elapsed = time.perf_counter() - start
        # A row starts only if it should end inside the budget, judged by the slowest row of its
        # compile setting so far (a compiled row's cold start dominates): the budget bounds the
        # end of the run, not the start of its last row.
        if elapsed + took.get(row.compiled, 0.0) > args.budget_s:
            row.skipped = (f"time budget: {elapsed:.0f} s spent + ~{took.get(row.compiled, 0):.0f}"
                           f" s for this row > {args.budget_s:.0f} s")  # fmt: skip
            continue
        try:
            run_row(row, args, config, device)
        except Exception as exc:  # a row's failure is a result of the acceptance run
            first = str(exc).splitlines()[0][:120] if str(exc) else ""
            row.error = f"{type(exc).__name__}: {first}"
        if row.error:  # after the except block: its traceback holds the row's model alive
            torch._dynamo.reset()
            reset_peak(device)  # an out-of-memory row must not take the next rows with it
        took[row.compiled] = max(took.get(row.compiled, 0.0),
                                 time.perf_counter() - start - elapsed)  # fmt: skip
        result = row.error or row.skipped or f"{row.tokens_s:.0f} tokens/s"
        print(f"  [{time.perf_counter() - start:6.1f} s] {row.recipe} compile="
              f"{'on' if row.compiled else 'off'} {row.impl}: {result}", flush=True)  # fmt: skip
    print("\n".join(table(rows, device)))
    ok, lines = parity(rows, args.parity_atol)
    print("\n".join(lines))
    failed = [r for r in rows if r.error]
    print(f"total {time.perf_counter() - start:.0f} s; "
          f"{'ACCEPTED' if ok and not failed else 'NOT ACCEPTED'}")  # fmt: skip
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
