"""Run a causal LM whose weights are several times the CPU budget: meta init, map, disk offload.

With no ``--checkpoint``, a random Llama (``--layers`` x ``--hidden``; 8 x 512 by default:
~130 MiB of fp32 weights) is saved with ``save_pretrained`` by a child process, so this process
never holds the whole model. Then: ``init_empty`` builds it on meta, ``infer_device_map`` keeps
what fits in ``--budget`` of RAM (minus one decoder layer kept free to run offloaded layers) and
sends the rest to disk, ``load_and_dispatch`` reads the safetensors into that map, and
``generate()`` runs, each disk-mapped layer read just before its forward and freed after. It
prints the map and the process's peak RSS above its RSS before loading.

    python examples/big_model_inference.py                        # random tiny Llama, 40 MiB
    python examples/big_model_inference.py --checkpoint path/to/hf_model --budget 2GiB
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import torch


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=8192, hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden),
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip


def export(args) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(_config(args)).save_pretrained(args.checkpoint, max_shard_size="50MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="", help="a Hugging Face model directory")
    parser.add_argument("--budget", default="40MiB", help="RAM for weights, e.g. 40MiB, 2GiB")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_only:
        return export(args)
    from transformers import AutoConfig, AutoModelForCausalLM

    from torchdist.inference import infer_device_map, init_empty, load_and_dispatch, parse_size

    scratch = None
    if not args.checkpoint:
        scratch = tempfile.TemporaryDirectory(prefix="td-big-model-")
        args.checkpoint = scratch.name
        child = [sys.executable, __file__, "--export-only", "--checkpoint", scratch.name,
                 "--layers", str(args.layers), "--hidden", str(args.hidden)]  # fmt: skip
        subprocess.run(child, check=True)
    config = AutoConfig.from_pretrained(args.checkpoint)
    model = init_empty(lambda: AutoModelForCausalLM.from_config(config)).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = parse_size(args.budget)
    dmap = infer_device_map(model, max_memory={"cpu": budget, "disk": "1TiB"})
    print(dmap)
    print(
        f"weights {weights / 2**20:.0f} MiB = {weights / budget:.1f}x the CPU budget {args.budget}"
    )
    before = _rss_mib()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the peak from here on
        f.write("5")
    start = time.perf_counter()
    model = load_and_dispatch(model, args.checkpoint, dmap)
    loaded = time.perf_counter() - start
    prompt = torch.randint(0, config.vocab_size, (1, 16))
    start = time.perf_counter()
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                pad_token_id=0)  # fmt: skip
    took = time.perf_counter() - start
    print(f"generated {tokens.shape[1] - prompt.shape[1]} tokens in {took:.2f} s "
          f"(load {loaded:.2f} s): {tokens[0, prompt.shape[1]:].tolist()}")  # fmt: skip
    print(f"peak RSS above the RSS before loading: {_rss_mib('VmHWM') - before:.0f} MiB "
          f"(CPU budget {budget / 2**20:.0f} MiB; weights {weights / 2**20:.0f} MiB)")  # fmt: skip
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
