"""Checkpoint save/load time of torchdist against raw DCP and torch.save; export peak memory.

For a model of ``--params-m`` million parameters (a stack of 2048x2048 ``Linear`` layers; 100 M
by default) with Adam state (so 3x the parameter bytes are saved), on 1 and 2 ranks
(``td.spawn``, ``debug="OFF"``; 2 ranks shard the model with ``shard``, FSDP2):

* ``torchdist``: ``checkpoint.save`` / ``checkpoint.load`` (DCP + per-rank extras + marker +
  atomic rename; on load the key/shape/size checks).
* ``raw DCP``: ``get_state_dict`` -> ``dcp.save(checkpoint_id=...)``, and ``get_state_dict`` ->
  ``dcp.load`` -> ``set_state_dict``: the floor torchdist builds on. Goal: within 10 %.
* ``torch.save``: each rank ``torch.save``s its local tensors to one file (fsynced, as DCP
  fsyncs), and loads them back with ``torch.load(weights_only=True)`` and copies: no resharding.

The three alternate within each repetition (the order rotates), each writes to a fresh
directory that is deleted afterwards (untimed), and every timing spans a barrier before and
after, so it is the slowest rank's. Reported: the median seconds, MB/s (bytes on disk / time)
and the ratio to raw DCP. Loads read files just written, usually from the page cache, for all
three alike.

Then the peak memory (RSS above the process's RSS before the call, sampled every 2 ms) of
``export_safetensors`` on rank 0, against the model's size and its largest parameter, and of the
naive export (full state dict gathered, then ``safetensors.torch.save_file``) for comparison.

Not a test: it prints and never asserts.

    python benchmarks/checkpoint.py                 # 100 M parameters, 5 repetitions, 1 and 2 ranks
    python benchmarks/checkpoint.py --params-m 25 --reps 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time

import torch
import torch.nn as nn

import torchdist as td

WIDTH = 2048
METHODS = ("torchdist", "raw DCP", "torch.save")


def build_state(topo: td.Topology, params_m: float) -> td.TrainState:
    from torchdist.sharding import shard

    torch.manual_seed(0)
    layers = max(1, round(params_m * 1e6 / (WIDTH * WIDTH + WIDTH)))
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    if topo.world_size > 1:
        model = shard(model, topo)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # Adam state exists: exp_avg, exp_avg_sq, step
    opt.zero_grad(set_to_none=True)
    return td.TrainState(model=model, optimizer=opt, step=1)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# --------------------------------------------------------------------------- the three methods
def save_torchdist(state, topo, path):
    from torchdist import checkpoint

    checkpoint.save(path, state, topo)


def load_torchdist(state, topo, path):
    from torchdist import checkpoint

    checkpoint.load(path, state, topo)


def save_dcp(state, topo, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_dcp(state, topo, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(state.model, state.optimizer, model_state_dict=sd["model"],
                   optim_state_dict=sd["optim"])  # fmt: skip


def _torch_payload(state):
    model = {k: _local(v) for k, v in state.model.state_dict().items()}
    optim = {
        i: {k: _local(v) for k, v in s.items()}
        for i, s in enumerate(state.optimizer.state[p] for p in state.model.parameters())
    }
    return {"model": model, "optim": optim}


def save_torch(state, topo, path):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"rank{topo.rank}.pt"), "wb") as f:
        torch.save(_torch_payload(state), f)
        f.flush()
        os.fsync(f.fileno())


def load_torch(state, topo, path):
    loaded = torch.load(os.path.join(path, f"rank{topo.rank}.pt"), weights_only=True)
    target = _torch_payload(state)
    with torch.no_grad():
        for k, v in target["model"].items():
            v.copy_(loaded["model"][k])
        for i, s in target["optim"].items():
            for k, v in s.items():
                v.copy_(loaded["optim"][i][k])


OPS = {
    "torchdist": (save_torchdist, load_torchdist),
    "raw DCP": (save_dcp, load_dcp),
    "torch.save": (save_torch, load_torch),
}


# --------------------------------------------------------------------------- timing on each rank
def _timed(fn, topo) -> float:
    td.barrier(topo)
    start = time.perf_counter()
    fn()
    td.barrier(topo)
    return time.perf_counter() - start


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def bench_world(topo, params_m, reps, root):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // topo.world_size))
    state = build_state(topo, params_m)
    times = {(m, op): [] for m in METHODS for op in ("save", "load")}
    sizes = {}
    for rep in range(reps + 1):  # the first repetition warms up and is not counted
        order = METHODS[rep % 3 :] + METHODS[: rep % 3]
        for method in order:
            save, load = OPS[method]
            path = os.path.join(root, f"{method.replace(' ', '_').replace('.', '_')}_{rep}")
            t_save = _timed(lambda save=save, path=path: save(state, topo, path), topo)
            t_load = _timed(lambda load=load, path=path: load(state, topo, path), topo)
            if topo.rank == 0:
                sizes[method] = _du(path)
                shutil.rmtree(path, ignore_errors=True)
            td.barrier(topo)
            if rep:
                times[(method, "save")].append(t_save)
                times[(method, "load")].append(t_load)
    return times, sizes


# --------------------------------------------------------------------------- export memory
def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakRss:
    def __init__(self) -> None:
        self.peak = self.base = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def export_memory(topo, params_m, root):
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from torchdist.checkpoint import export_safetensors

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // topo.world_size))
    state = build_state(topo, params_m)
    model = state.model
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    with _PeakRss() as ours:
        export_safetensors(model, os.path.join(root, "ours"), topo, max_shard_bytes=2 * 10**9)
    td.barrier(topo)
    with _PeakRss() as naive:
        options = StateDictOptions(full_state_dict=True, cpu_offload=topo.world_size > 1)
        full = get_model_state_dict(model, options=options)
        if topo.rank == 0:
            os.makedirs(os.path.join(root, "naive"), exist_ok=True)
            save_file(full, os.path.join(root, "naive", "model.safetensors"))
        del full
    td.barrier(topo)
    return {
        "model_mb": full_bytes / 2**20,
        "largest_param_mb": largest / 2**20,
        "ours_peak_mb": (ours.peak - ours.base) / 2**20,
        "naive_peak_mb": (naive.peak - naive.base) / 2**20,
    }


# --------------------------------------------------------------------------- report
def report(world, times, sizes) -> None:
    print(f"\n== {world} rank(s): median of {len(times[('raw DCP', 'save')])} interleaved runs ==")
    print(f"{'method':<12}{'op':<6}{'median s':>10}{'min s':>9}{'MB/s':>9}{'vs raw DCP':>12}")
    for op in ("save", "load"):
        base = statistics.median(times[("raw DCP", op)])
        for method in METHODS:
            values = times[(method, op)]
            median = statistics.median(values)
            mbps = sizes[method] / 2**20 / median
            print(f"{method:<12}{op:<6}{median:>10.3f}{min(values):>9.3f}{mbps:>9.0f}"
                  f"{median / base:>11.2f}x")  # fmt: skip
    print("on disk: " + ", ".join(f"{m} {sizes[m] / 2**20:.0f} MB" for m in METHODS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=float, default=100.0, help="millions of parameters")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="torchdist-bench-ckpt-", dir=args.dir)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.params_m:g} M parameters "
          f"+ Adam state, writing under {root}")  # fmt: skip
    try:
        for world in args.worlds:
            times, sizes = td.spawn(bench_world, world, args.params_m, args.reps, root,
                                    timeout=3600, debug="OFF")[0]  # fmt: skip
            report(world, times, sizes)
        for world in args.worlds:
            mem = td.spawn(export_memory, world, args.params_m, root, timeout=3600, debug="OFF")[0]
            print(f"\nexport_safetensors on {world} rank(s), rank 0 RSS above its start: "
                  f"{mem['ours_peak_mb']:.0f} MB (model {mem['model_mb']:.0f} MB, largest "
                  f"parameter {mem['largest_param_mb']:.0f} MB); naive full state dict + "
                  f"save_file: {mem['naive_peak_mb']:.0f} MB")  # fmt: skip
            shutil.rmtree(os.path.join(root, "ours"), ignore_errors=True)
            shutil.rmtree(os.path.join(root, "naive"), ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
