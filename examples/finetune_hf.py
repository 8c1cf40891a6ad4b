"""Fine-tune a small Hugging Face Llama with torchdist: streamed text, FSDP2, resume, HF export.

Everything is local: the text is ``examples/data/*.txt``; the tokenizer is a byte-level BPE
trained on it with ``tokenizers``; the model is a tiny ``LlamaConfig`` with random weights, or
``--model DIR`` (any local ``from_pretrained`` directory, e.g. an earlier ``--out``/hf). Lines
are streamed (``datasets.IterableDataset``), padded per batch, and the loss is the mean over the
real tokens of the whole global batch (``td.data.count_tokens`` + ``token_mean_loss``).

Run on 2 CPU ranks::

    torchdist launch -n 2 examples/finetune_hf.py --steps 20 --out /tmp/ft
    torchdist launch -n 2 examples/finetune_hf.py --steps 30 --out /tmp/ft   # resumes at 20

then ``AutoModelForCausalLM.from_pretrained("/tmp/ft/hf")`` loads the result.
"""

from __future__ import annotations

import argparse
import glob
import os
import pathlib
from typing import Any

import torch

import torchdist as td
from torchdist import checkpoint
from torchdist.data import count_tokens, shard_loader, token_mean_loss
from torchdist.sharding import shard
from torchdist.transforms import clip_grads, compose, optimize, value_and_grad

DATA = pathlib.Path(__file__).resolve().parent / "data"


def train_tokenizer(files: list[str], path: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``files``, saved to ``path`` (rank 0 trains)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not os.path.exists(path):
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train(files, trainer)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tok.save(path + ".tmp")
        os.replace(path + ".tmp", path)
    return PreTrainedTokenizerFast(tokenizer_file=path, pad_token="<pad>", bos_token="<s>")


def text_stream(files: list[str], tokenizer, seq_len: int):
    """Each non-empty line as ``input_ids``, streamed; one generator shard per file."""
    import datasets

    def lines(paths: list[str]):
        for p in paths:
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        ids = tokenizer(line.strip())["input_ids"][: seq_len - 1]
                        yield {"input_ids": [tokenizer.bos_token_id] + ids}

    return datasets.IterableDataset.from_generator(lines, gen_kwargs={"paths": files})


def pad_collate(pad_id: int):
    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            labels[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        return {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}

    return collate


def build_model(args, vocab_size: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.dim,
        intermediate_size=2 * args.dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # every rank builds the same initial weights before sharding
    return LlamaForCausalLM(config)


def run(topo: td.Topology, args: argparse.Namespace) -> dict[str, Any]:
    """Train (resuming from ``args.out``/ckpt when it holds a checkpoint), export; return stats."""
    files = sorted(glob.glob(str(DATA / "*.txt")))
    tok_path = os.path.join(args.out, "tokenizer", "tokenizer.json")
    with td.main_first(topo):
        tokenizer = train_tokenizer(files, tok_path, args.vocab)
    model = shard(build_model(args, len(tokenizer)), topo)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    loader = shard_loader(
        text_stream(files, tokenizer, args.seq_len),
        topo,
        batch_size=args.batch_size,
        collate_fn=pad_collate(tokenizer.pad_token_id),
    )

    def loss_fn(model, batch):
        n = count_tokens(batch["labels"], topo)  # real targets over all dp ranks
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_mean_loss(logits, batch["labels"], n, topo=topo)

    step = compose(optimize(opt), clip_grads(max_norm=1.0))(value_and_grad(loss_fn))
    state = td.TrainState(model=model, optimizer=opt)
    ckpt = os.path.join(args.out, "ckpt")
    resumed_from = None
    if os.path.isdir(ckpt) and any(n.startswith("step_") for n in os.listdir(ckpt)):
        state = checkpoint.load(ckpt, state, topo, loader=loader)
        resumed_from = state.step
    losses: dict[int, float] = {}
    while state.step < args.steps:
        for batch in loader:
            state, metrics = step(state, batch)
            losses[state.step] = float(td.all_reduce(metrics["loss"].detach(), topo, op="mean"))
            td.print0(topo, f"step {state.step} loss {losses[state.step]:.4f}")
            if state.step % args.save_every == 0 or state.step == args.steps:
                checkpoint.save(ckpt, state, topo, loader=loader, keep=2)
            if state.step >= args.steps:
                break
    hf_dir = os.path.join(args.out, "hf")
    checkpoint.export_safetensors(model, hf_dir, topo)  # weights + config.json
    if topo.rank == 0:
        tokenizer.save_pretrained(hf_dir)
    probe = torch.arange(1, 9).unsqueeze(0) % len(tokenizer)
    with torch.no_grad():  # every rank runs the forward: FSDP all-gathers inside it
        logits = model(input_ids=probe).logits
    td.barrier(topo)
    return {"losses": losses, "resumed_from": resumed_from, "step": state.step,
            "logits": logits, "hf_dir": hf_dir}  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/finetune_hf")
    p.add_argument("--model", default=None, help="a local from_pretrained directory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    return p.parse_args(argv)


def main() -> None:
    args = parse()
    with td.distributed(td.Topology.from_env(dp_shard=-1)) as topo:
        out = run(topo, args)
        td.print0(topo, f"done at step {out['step']}; exported to {out['hf_dir']}")


if __name__ == "__main__":
    main()
