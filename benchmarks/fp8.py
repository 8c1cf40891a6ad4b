"""fp8 training speed: each torchao recipe against bf16, composed step against a hand-written loop.

**CPU** (always): a small GPT-style model (token + position embedding, pre-norm attention/MLP
blocks, LM head) trained with the composed step ``compose(optimize(opt), ...)(value_and_grad(
loss_fn))`` in bf16 (``autocast(torch.bfloat16)``, fp32 master weights) and with
``autocast_fp8(model, Float8Recipe.<recipe>())`` for each recipe (fp32 master weights, fp8
matmuls), plus tensorwise without the fp8-all-gather weight subclass (which only pays off under
``shard``) beside a hand-written torchao loop with that same config (``convert_to_float8_training``,
forward, backward, ``opt.step()``, ``zero_grad``). All variants are warmed up, then timed in
``--rounds`` interleaved rounds of ``--steps`` steps, the order rotating every round so that
load on a shared machine hits all alike. Reported per variant: the median step time, the ratio
of medians to bf16 and the median of the per-round ratios. CPUs have no fp8 matmul units:
``torch._scaled_mm`` on CPU is a reference kernel, and the casts, amaxes and tensor-subclass
dispatch around it are pure overhead, so fp8 is expected to be *slower* here. The point is that
it runs, and that the number is reported as measured.

**GPU** (when ``torch.cuda.is_available()``): tokens/s of a Llama-style stack of blocks
(``--gpu-dim`` 4096, 32 heads, 8 KV heads, SwiGLU 14336, RoPE; ``--gpu-layers`` blocks; no
embedding or head, so every Linear is in a block and all are converted) with bf16 parameters,
in bf16 and under each fp8 recipe, each block compiled (``torchdist.transforms.compile``: the
repeated blocks, as torchtitan does; ``--no-compile`` to skip), on one GPU. For each recipe the
composed torchdist step is run beside the hand-written torchao loop with the same config and
per-block ``compile``. Variants run one after another (each holds a multi-GB model and its
AdamW state), each after ``--gpu-warmup`` steps. Goals (issue 5): tensorwise >= 1.2x bf16
tokens/s, torchdist within 2% of the hand-written loop. The device name is printed.

Not a test: it prints and never asserts.

    python benchmarks/fp8.py                          # CPU part; GPU part where CUDA is present
    python benchmarks/fp8.py --rounds 9 --steps 5 --threads 2
    python benchmarks/fp8.py --gpu-layers 8 --gpu-seq 4096
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdist as td
from torchdist.precision import Float8Recipe, autocast_fp8
from torchdist.transforms import autocast, compose, optimize, value_and_grad
from torchdist.transforms import compile as compile_model

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


# --------------------------------------------------------------------------- CPU: small GPT
class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def cpu_variants(model0: nn.Module, lr: float) -> dict[str, Callable[[Any], Any]]:
    """name -> a function running one training step on a batch (each owns its model copy)."""
    variants: dict[str, Callable[[Any], Any]] = {}

    def composed(model: nn.Module, *forward) -> Callable[[Any], Any]:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        step = compose(optimize(opt), *forward)(value_and_grad(lm_loss))
        state = [td.TrainState(model=model, optimizer=opt)]

        def run(batch):
            state[0], metrics = step(state[0], batch)
            return metrics["loss"]

        return run

    variants["bf16"] = composed(copy.deepcopy(model0), autocast(torch.bfloat16))
    for name in RECIPES:
        model = autocast_fp8(copy.deepcopy(model0), getattr(Float8Recipe, name)())
        variants[f"fp8 {name}"] = composed(model)
    # The same config as the hand-written loop: torchao's default, weights without the
    # fp8-all-gather subclass (which only pays off under shard).
    plain = Float8Recipe.tensorwise(fsdp_float8_all_gather=False)
    variants["fp8 tensorwise, no fp8 all-gather"] = composed(
        autocast_fp8(copy.deepcopy(model0), plain)
    )
    variants["  the same, torchao by hand"] = hand_written(copy.deepcopy(model0), lr)
    return variants


def hand_written(model: nn.Module, lr: float, compile_blocks: bool = False):
    """The torchao README's loop: convert, then forward / backward / step / zero_grad."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    edges = {linears[0], linears[-1]}  # the same layers Float8Recipe's default converts
    convert_to_float8_training(
        model,
        config=Float8LinearConfig.from_recipe_name("tensorwise"),
        module_filter_fn=lambda m, fqn: fqn not in edges and m.in_features % 16 == 0,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def run(batch):
        loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return run


def time_interleaved(variants: dict, batches: list, rounds: int, steps: int, warmup: int):
    """Per variant: every step's wall time, and per round the median step time."""
    for run in variants.values():
        for batch in batches[:warmup]:
            run(batch)
    names = list(variants)
    per_step = {n: [] for n in names}
    per_round = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times = []
            for i in range(steps):
                batch = batches[(r * steps + i) % len(batches)]
                t0 = time.perf_counter()
                variants[name](batch).item()  # the loss on the host: the step has finished
                times.append(time.perf_counter() - t0)
            per_step[name] += times
            per_round[name].append(statistics.median(times))
    return per_step, per_round


def cpu_section(args) -> None:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model0 = GPT(args.vocab, args.dim, args.layers, args.heads, args.seq)
    batches = []
    for _ in range(8):
        toks = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        batches.append((toks[:, :-1], toks[:, 1:]))
    variants = cpu_variants(model0, lr=1e-3)
    print(
        f"CPU: GPT dim {args.dim}, {args.layers} layers, {args.heads} heads, seq {args.seq}, "
        f"batch {args.batch}, vocab {args.vocab}; {args.threads} intra-op thread(s); "
        f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps; "
        f"load average before: {os.getloadavg()[0]:.1f}"
    )
    per_step, per_round = time_interleaved(variants, batches, args.rounds, args.steps, args.warmup)
    base = statistics.median(per_step["bf16"])
    print(f"  {'variant':36s} {'median step':>12s} {'vs bf16':>8s} {'per-round':>10s}")
    for name in variants:
        med = statistics.median(per_step[name])
        ratios = [a / b for a, b in zip(per_round[name], per_round["bf16"])]
        print(
            f"  {name:36s} {med * 1e3:9.1f} ms {med / base:7.2f}x {statistics.median(ratios):9.2f}x"
        )
    print(f"  load average after: {os.getloadavg()[0]:.1f}")


# --------------------------------------------------------------------------- GPU: Llama stack
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return norm.type_as(x) * self.weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attention_norm(x)
        q = self.wq(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(att.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class LlamaStack(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, kv_heads: int, hidden: int, seq: int):
        super().__init__()
        self.layers = nn.ModuleList(LlamaBlock(dim, heads, kv_heads, hidden) for _ in range(layers))
        half = dim // heads // 2
        freqs = 1.0 / (500000.0 ** (torch.arange(half).float() / half))
        angles = torch.outer(torch.arange(seq).float(), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return x


def stack_loss(model: nn.Module, batch) -> torch.Tensor:
    x, target = batch
    return F.mse_loss(model(x).float(), target.float())


def gpu_run(args, recipe: str | None, by_hand: bool) -> float:
    """tokens/s of one variant: ``recipe`` None is bf16; ``by_hand`` the plain torchao loop."""
    device = torch.device("cuda")
    with torch.random.fork_rng(devices=[device]):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaStack(
                args.gpu_dim, args.gpu_layers, 32, 8, args.gpu_hidden, args.gpu_seq
            ).to(torch.bfloat16)
    shape = (args.gpu_batch, args.gpu_seq, args.gpu_dim)
    gen = torch.Generator(device).manual_seed(1)
    batch = tuple(
        torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2)
    )
    compiled = not args.no_compile
    if by_hand:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe))
        if compiled:
            for layer in model.layers:
                layer.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            loss = stack_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        if recipe is not None:
            # All Linears are inside blocks: convert them all (no first/last to keep in bf16).
            # A single GPU has no FSDP all-gather: tensorwise without it, as torchao's default.
            make = getattr(Float8Recipe, recipe)
            extra = {"fsdp_float8_all_gather": False} if recipe == "tensorwise" else {}
            model = autocast_fp8(model, make(skip_first_last=False, **extra))
        if compiled:  # the model transform: each block (and anything outside them)
            model = compile_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        composed = compose(optimize(opt))(value_and_grad(stack_loss))
        state = [td.TrainState(model=model, optimizer=opt)]

        def step():
            state[0], _ = composed(state[0], batch)

    for _ in range(args.gpu_warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.gpu_steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return args.gpu_batch * args.gpu_seq / statistics.median(times)


def gpu_tokens_per_s(args, recipe: str | None, by_hand: bool) -> float:
    """``gpu_run``, then free its model and optimizer state before the next variant."""
    tokens_per_s = gpu_run(args, recipe, by_hand)
    gc.collect()
    torch.cuda.empty_cache()
    return tokens_per_s


def gpu_section(args) -> None:
    if not torch.cuda.is_available():
        print(
            "\nGPU: skipped -- torch.cuda.is_available() is False on this machine. Run this "
            "script on a CUDA machine (an H100 for the issue's goals) to measure tokens/s of "
            "the Llama-style stack in bf16 vs each fp8 recipe."
        )
        return
    name = torch.cuda.get_device_name()
    print(
        f"\nGPU: {name} (capability {torch.cuda.get_device_capability()}); Llama-style stack: "
        f"dim {args.gpu_dim}, {args.gpu_layers} blocks, hidden {args.gpu_hidden}, seq "
        f"{args.gpu_seq}, batch {args.gpu_batch}, bf16 parameters, AdamW (fused); "
        f"{'per-block torch.compile' if not args.no_compile else 'eager'}; median of "
        f"{args.gpu_steps} steps after {args.gpu_warmup} warm-up steps"
    )
    bf16 = gpu_tokens_per_s(args, None, by_hand=False)
    print(f"  {'variant':36s} {'tokens/s':>10s} {'vs bf16':>8s} {'vs by hand':>11s}")
    print(f"  {'bf16 (torchdist)':36s} {bf16:10.0f} {1.0:7.2f}x")
    for recipe in RECIPES:
        ours = gpu_tokens_per_s(args, recipe, by_hand=False)
        theirs = gpu_tokens_per_s(args, recipe, by_hand=True)
        print(f"  {'fp8 ' + recipe + ' (by hand)':36s} {theirs:10.0f} {theirs / bf16:7.2f}x")
        print(
            f"  {'fp8 ' + recipe + ' (torchdist)':36s} {ours:10.0f} {ours / bf16:7.2f}x "
            f"{ours / theirs:10.3f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--gpu-dim", type=int, default=4096)
    parser.add_argument("--gpu-layers", type=int, default=4)
    parser.add_argument("--gpu-hidden", type=int, default=14336)
    parser.add_argument("--gpu-seq", type=int, default=2048)
    parser.add_argument("--gpu-batch", type=int, default=2)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--gpu-warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="GPU: run eagerly")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}")
    if not args.skip_cpu:
        cpu_section(args)
    gpu_section(args)


if __name__ == "__main__":
    main()
