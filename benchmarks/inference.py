"""Big-model inference on CPU: torchdist.inference against Accelerate, same model, same map.

A GPT-style model (``--layers`` blocks of width ``--dim``; 10 x 1024 by default: about 0.5 GB of
fp32 weights) is exported with ``export_safetensors`` (sharded files), then each library runs,
in a fresh subprocess, on the same device map planned by ``infer_device_map`` for a CPU budget
(``--budget-mib``, 128 MiB by default, so the weights are ~3.7x the budget) with the rest on
disk:

* ``torchdist``: ``init_empty`` -> ``load_and_dispatch(model, dir, dmap)``.
* ``accelerate``: ``init_empty_weights`` -> ``load_checkpoint_and_dispatch(model, dir,
  device_map=dict(dmap), offload_folder=...)``.

Reported per library: load seconds, median seconds per forward (``--forwards``, batch 1 x 64
tokens, ``torch.no_grad``), the child's RSS after imports and the meta build (the baseline), its
peak RSS (``VmHWM``, reset after the baseline; ``ru_maxrss`` would carry the parent's RSS over
fork+exec) and peak minus baseline, checked against the budget plus a stated constant
(``CONSTANT_MIB``: activations, freed blocks glibc keeps for reuse, small tensors). The map
already keeps one block of the budget free for the disk-mapped block that is running. Not a
test: it prints, and says whether the claim held.

    python benchmarks/inference.py
    python benchmarks/inference.py --layers 6 --dim 768 --budget-mib 64 --forwards 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CONSTANT_MIB = 64


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, 8, d // 8).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self, dim: int, layers: int, vocab: int = 4096, seq: int = 256) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    # ru_maxrss would carry the parent's RSS over fork+exec; VmHWM is this process's own, and
    # writing 5 to clear_refs resets it to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child(args) -> None:
    """One library's run; prints one JSON line."""
    torch.manual_seed(0)
    idx = torch.randint(0, 4096, (1, 64))
    dmap = json.load(open(os.path.join(args.work, "map.json")))
    if args.child == "torchdist":
        from torchdist.inference import init_empty, load_and_dispatch

        model = init_empty(lambda: GPT(args.dim, args.layers))
        base = _rss_mib()
        _reset_peak()
        t0 = time.perf_counter()
        model = load_and_dispatch(model, os.path.join(args.work, "weights"), dmap)
    else:
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch

        with init_empty_weights():
            model = GPT(args.dim, args.layers)
        base = _rss_mib()
        _reset_peak()
        t0 = time.perf_counter()
        model = load_checkpoint_and_dispatch(
            model, os.path.join(args.work, "weights"), device_map=dmap,
            offload_folder=os.path.join(args.work, "acc_offload"),
        )  # fmt: skip
    load_s = time.perf_counter() - t0
    times, out = [], None
    with torch.no_grad():
        for _ in range(args.forwards):
            t0 = time.perf_counter()
            out = model(idx)
            times.append(time.perf_counter() - t0)
    torch.save(out, os.path.join(args.work, f"{args.child}.pt"))
    print(json.dumps({"base": base, "peak": _peak_mib(), "load_s": load_s,
                      "forward_s": statistics.median(times)}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--budget-mib", type=int, default=128)
    parser.add_argument("--forwards", type=int, default=3)
    parser.add_argument("--child", default="")
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    if args.child:
        return child(args)
    import torchdist as td
    from torchdist.checkpoint import export_safetensors
    from torchdist.inference import infer_device_map, init_empty

    work = tempfile.mkdtemp(prefix="td-inference-")
    try:
        torch.manual_seed(0)
        model = GPT(args.dim, args.layers)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        export_safetensors(model, os.path.join(work, "weights"), td.Topology.single(),
                           max_shard_bytes=200 * 2**20)  # fmt: skip
        torch.manual_seed(0)
        with torch.no_grad():
            want = model(torch.randint(0, 4096, (1, 64)))
        del model
        budget = args.budget_mib * 2**20
        dmap = infer_device_map(init_empty(lambda: GPT(args.dim, args.layers)),
                                max_memory={"cpu": budget, "disk": "1TiB"})  # fmt: skip
        print(dmap)
        with open(os.path.join(work, "map.json"), "w") as f:
            json.dump(dict(dmap), f)
        print(f"weights {weights / 2**20:.0f} MiB = {weights / budget:.1f}x the CPU budget "
              f"{args.budget_mib} MiB; constant allowed {CONSTANT_MIB} MiB")  # fmt: skip
        print(
            f"{'library':<11}{'load s':>8}{'s/forward':>11}{'base MiB':>10}{'peak MiB':>10}"
            f"{'peak-base':>11}  within budget+constant  max|diff|"
        )
        for lib in ("torchdist", "accelerate"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                lib,
                "--work",
                work,
                "--dim",
                str(args.dim),
                "--layers",
                str(args.layers),
                "--forwards",
                str(args.forwards),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{lib:<11} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            diff = (torch.load(os.path.join(work, f"{lib}.pt")) - want).abs().max().item()
            extra = r["peak"] - r["base"]
            ok = extra <= args.budget_mib + CONSTANT_MIB
            print(
                f"{lib:<11}{r['load_s']:>8.2f}{r['forward_s']:>11.3f}{r['base']:>10.0f}"
                f"{r['peak']:>10.0f}{extra:>11.0f}  {'yes' if ok else 'NO':<22}  {diff:.1e}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
