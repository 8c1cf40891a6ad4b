"""Train a small byte-level GPT with torchdist: a complete research-style script.

The corpus is the Python source of this repository (real text, shipped with it, no download).
Every rank reads its share of each global batch; gradients are averaged with ``sync_grads``;
the step is composed inline.

The layout comes from the topology the script is launched with (``--mesh`` of
``torchdist launch``, read by ``Topology.from_env``), and each axis larger than 1 gets the
transform that uses it: ``tp`` -> ``parallelize``, ``dp_shard`` -> ``shard`` (HSDP with
``dp_replicate``), ``dp_replicate`` alone -> ``replicate``, ``pp`` -> ``pipeline`` (and the
step runs its schedule), ``cp`` -> ``context_parallel`` (ring attention: CUDA only, see
docs/parallelism.md). ``--parallel`` picks them by hand (``pp``, or ``shard,tp,pp``); an axis
that nothing uses is an error (``torchdist._axes.check_axes_used``).

Run on 4 CPU ranks, FSDP2 x tensor parallel::

    torchdist launch -n 4 --mesh dp_shard=2,tp=2 examples/train_gpt.py --steps 100

on 8, FSDP2 x tensor x pipeline parallel (2 each; ``--pp-schedule Interleaved1F1B --layers 4``
for 2 stages per rank)::

    torchdist launch -n 8 examples/train_gpt.py --parallel shard,tp,pp --steps 100

on 2 ranks (what `just demo` does), or on one process: ``python examples/train_gpt.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdist as td
from torchdist.transforms import (
    accumulate,
    autocast,
    clip_grads,
    compose,
    optimize,
    sync_grads,
    value_and_grad,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Block(nn.Module):
    """Pre-norm attention + MLP. Head count is read from the projections' local width, so the
    block also runs tensor-parallel (q/k/v/up colwise, proj/down rowwise)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head_dim = dim // heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (
            p(h).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


TP_PLAN = {
    "blocks.*.q": "colwise", "blocks.*.k": "colwise", "blocks.*.v": "colwise",
    "blocks.*.proj": "rowwise", "blocks.*.up": "colwise", "blocks.*.down": "rowwise",
}  # fmt: skip


class GPT(nn.Module):
    def __init__(
        self, vocab: int = 256, dim: int = 128, layers: int = 2, heads: int = 4, seq: int = 64
    ):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        # A pipeline stage holds some blocks; only the first has the embeddings, only the last
        # the head (torchdist.sharding.pipeline sets the others to None). context_parallel
        # passes the global positions of this rank's tokens.
        if self.tok is not None:
            if positions is None:
                positions = torch.arange(idx.shape[1], device=idx.device)
            x = self.tok(idx) + self.pos(positions)
        else:
            x = idx  # a later stage: the activations of the stage before
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) if self.head is not None else x


def load_corpus() -> torch.Tensor:
    text = b"".join(p.read_bytes() for p in sorted(ROOT.glob("torchdist/**/*.py")))
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


class Windows(torch.utils.data.Dataset):
    """Overlapping windows of ``seq + 1`` bytes, every ``seq // 2`` bytes: (input, target)."""

    def __init__(self, corpus: torch.Tensor, seq: int) -> None:
        self.corpus, self.seq, self.stride = corpus, seq, seq // 2

    def __len__(self) -> int:
        return (self.corpus.numel() - self.seq - 1) // self.stride

    def __getitem__(self, i: int):
        window = self.corpus[i * self.stride : i * self.stride + self.seq + 1]
        return window[:-1], window[1:]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y, *positions = batch  # context_parallel appends the positions of this rank's tokens
    return F.cross_entropy(model(x, *positions).flatten(0, 1), y.flatten())


def stage_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The pipeline's loss: the last stage's output against the targets."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


PARALLEL = ("auto", "shard", "replicate", "tp", "sync", "pp", "cp")


def parallel_arg(text: str) -> str:
    parts = text.split(",")
    bad = [p for p in parts if p not in PARALLEL]
    if bad or (len(parts) > 1 and {"auto", "sync"} & set(parts)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give one of {PARALLEL} or a combination of shard/replicate/tp/pp/cp "
            "such as shard,tp,pp"
        )
    return text


def layout(parallel: str, topo: td.Topology) -> tuple[str, ...]:
    """The model transforms each mesh axis > 1 needs (``auto``), or those ``--parallel`` names."""
    if parallel != "auto":
        return () if parallel == "sync" else tuple(parallel.split(","))
    chosen = ("tp",) if topo.tp > 1 else ()
    chosen += ("pp",) if topo.pp > 1 else ()
    chosen += ("cp",) if topo.cp > 1 else ()
    if topo.dp_shard > 1:
        chosen += ("shard",)  # HSDP when dp_replicate > 1 too
    elif topo.dp_replicate > 1:
        chosen += ("replicate",)
    return chosen


def default_axes(parallel: str) -> dict[str, int]:
    """Mesh axes for ``--parallel`` without a launch mesh."""
    parts = parallel.split(",")
    if len(parts) == 1:
        return {"tp": {"tp": -1}, "pp": {"pp": -1, "dp_shard": 1}, "cp": {"cp": -1, "dp_shard": 1},
                "replicate": {"dp_replicate": -1, "dp_shard": 1}}.get(parallel, {})  # fmt: skip
    axes = {axis: 2 for axis in ("tp", "pp", "cp") if axis in parts}
    fill = "dp_replicate" if "replicate" in parts else "dp_shard"
    return {**axes, fill: -1, **({"dp_shard": 1} if fill == "dp_replicate" else {})}


def build_step(args, topo: td.Topology, model: nn.Module):
    """Model transforms in torchtitan's order, then the step transforms, composed inline."""
    from torchdist._axes import check_axes_used
    from torchdist.sharding import parallelize, replicate, shard
    from torchdist.transforms import checkpoint_activations
    from torchdist.transforms import compile as compile_model

    if args.precision == "fp8":  # first: fp8 -> tp -> activation checkpointing -> compile -> shard
        from torchdist.precision import Float8Recipe, autocast_fp8, converted_layers

        model = autocast_fp8(model, Float8Recipe.tensorwise())
        td.print0(topo, f"fp8 layers: {', '.join(converted_layers(model))}")
    chosen = layout(args.parallel, topo)
    if "pp" in chosen:  # right after fp8: the later transforms act on this rank's stage
        from torchdist.sharding import pipeline

        model = pipeline(model, topo, schedule=args.pp_schedule)
    if "tp" in chosen:
        model = parallelize(model, topo, TP_PLAN)
    if args.checkpoint_activations:
        model = checkpoint_activations(model)
    if args.compile:  # regional: each block, then embeddings, norm and head
        model = compile_model(model)
    if "shard" in chosen:
        model = shard(model, topo)
    elif "replicate" in chosen:
        model = replicate(model, topo)
    # An axis > 1 that nothing uses would make its ranks repeat each other's work.
    uses = ("sync_grads",) + (("context_parallel",) if "cp" in chosen else ())
    check_axes_used(topo, model, what="train_gpt.py", uses=uses)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1))),
    )
    transforms = [optimize(opt, sched), clip_grads(1.0), sync_grads(topo)]
    if args.accumulate > 1:
        transforms.append(accumulate(args.accumulate))
    if "cp" in chosen:
        from torchdist.transforms import context_parallel

        transforms.append(context_parallel(topo))
    if args.precision in ("bf16", "fp8"):
        transforms.append(autocast(torch.bfloat16))
    if "pp" in chosen:
        from torchdist.transforms import pipeline_value_and_grad

        base = pipeline_value_and_grad(stage_loss, microbatches=args.microbatches)
    else:
        base = value_and_grad(loss_fn)
    step = compose(*transforms)(base)
    return model, opt, sched, step


def main(argv: list[str] | None = None) -> None:
    """Train; ``argv`` defaults to the command line (a test runs two trainings in one job)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--parallel", type=parallel_arg, default="auto",
                        help="auto: what the launch mesh's axes need; or shard (FSDP2), "
                        "replicate (DDP), tp (tensor parallel), pp (pipeline), cp (context "
                        "parallel), sync (plain model + sync_grads), or a combination such as "
                        "shard,tp,pp")  # fmt: skip
    parser.add_argument("--pp-schedule", default="1F1B",
                        help="a torch.distributed.pipelining schedule: GPipe, 1F1B, "
                        "Interleaved1F1B, ZBVZeroBubble, ...")  # fmt: skip
    parser.add_argument("--microbatches", type=int, default=2,
                        help="pipeline micro-batches per step (must divide the per-rank batch)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default="fp32",
                        help="fp8: torchao float8 matmuls, bf16 elsewhere")  # fmt: skip
    parser.add_argument("--accumulate", type=int, default=1,
                        help="k: one --batch per step call, the optimizer steps every k-th call "
                        "(Accelerate's gradient_accumulation_steps); --steps counts "
                        "calls")  # fmt: skip
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--checkpoint-activations", action="store_true")
    parser.add_argument("--checkpoint-dir", default="", help="save here; resume from the newest")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--run-dir", default="runs/train_gpt",
                        help="metrics.jsonl (+ TensorBoard events) and loss.png go here; '' for "
                        "none")  # fmt: skip
    args = parser.parse_args(argv)

    # The launch mesh (torchdist launch --mesh, TORCHDIST_MESH) wins; without one, --parallel
    # tp / replicate / pp / cp put the whole world on that axis, and a combination gives each
    # of its tp, pp and cp axes 2 ranks and dp the rest.
    axes = {}
    if not os.environ.get("TORCHDIST_MESH"):
        axes = default_axes(args.parallel)
    topo = td.Topology.from_env(device="cpu", **axes)
    with td.distributed(topo) as topo:
        print(f"rank {topo.rank}: world {topo.world_size}, mesh {topo.axes}", flush=True)
        chosen = ", ".join(layout(args.parallel, topo)) or "sync_grads"
        td.print0(topo, f"training: {chosen}, {args.precision}, {args.steps} steps")
        td.set_seed(args.seed)
        model = td.to_device(GPT(dim=args.dim, layers=args.layers, seq=args.seq), topo)
        model, opt, sched, step = build_step(args, topo, model)
        data = Windows(load_corpus(), args.seq)
        per_rank = args.batch // topo.size("dp")
        loader = td.shard_loader(data, topo, batch_size=per_rank, seed=args.seed, drop_last=True)
        state = td.TrainState(model=model, optimizer=opt, scheduler=sched)
        ckpt = pathlib.Path(args.checkpoint_dir) if args.checkpoint_dir else None
        if ckpt is not None and any(ckpt.glob("step_*")):
            state = td.checkpoint.load(ckpt, state, topo, loader=loader)
            td.print0(topo, f"resumed from {ckpt} at step {state.step}")
        bar = td.progress(range(state.step, args.steps), topo, initial=state.step,
                          every=args.log_every, tokens_per_step=args.batch * args.seq)  # fmt: skip
        # Appends across resumes, so the plot below shows the whole run.
        logger = td.MetricsLogger(topo, args.run_dir) if args.run_dir else None
        batches, last, start = _forever(loader), None, time.perf_counter()
        for i in bar:
            state, metrics = step(state, next(batches))
            # With --accumulate k, a call closes an update every k-th batch; grad_norm is
            # reported on those calls only, so log there.
            updated = bool(metrics.get("update", True))
            if updated and ((i + 1) % args.log_every == 0 or i + 1 == args.steps):
                if logger is not None:  # reduced over "dp" only when logged; the row on rank 0
                    last = logger.log(i + 1, metrics)
                else:
                    last = {k: float(v) for k, v in td.all_reduce(
                        {k: v.float() for k, v in metrics.items()}, topo, op="mean",
                        axis="dp").items()}  # fmt: skip
                if last is not None:
                    bar.log(loss=last["loss"], grad_norm=last["grad_norm"])
            if ckpt is not None and (
                state.step % args.checkpoint_every == 0 or i + 1 == args.steps
            ):
                td.checkpoint.save(ckpt, state, topo, loader=loader, keep=2)
        if logger is not None:
            logger.close()
        if last is not None and td.is_main(topo):
            elapsed = time.perf_counter() - start
            print(f"done at step {state.step} ({elapsed:.1f} s), final loss {last['loss']:.4f}")
            if logger is not None:
                _plot(args.run_dir)


def _plot(run_dir: str) -> None:
    try:
        png = pathlib.Path(run_dir) / "loss.png"
        td.plot_metrics(pathlib.Path(run_dir) / "metrics.jsonl", png, keys=["loss", "grad_norm"])
        print(f"loss curve: {png}  (torchdist plot {run_dir}/metrics.jsonl redraws it)")
    except ImportError as missing:  # matplotlib is in .[dev], not a dependency of torchdist
        print(f"no loss curve: {missing}")


def _forever(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
