"""A small training script that resumes from its newest checkpoint (tests/test_faults.py).

Run under ``torchdist launch`` (``python _fault_train.py OUT --root CKPT --steps N --kill-at K``),
or imported: ``train(topo, root, steps)`` is the same loop, used in-process as the reference of
an uninterrupted run. Every step's global batch comes from a generator seeded by the step, so a
run that restarts from a checkpoint sees the same data as one that never stopped; SGD with
momentum, so the optimizer's state must come back from the checkpoint too.

``--kill-at K``: on the first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), rank 1 sends
itself ``SIGKILL`` after step K. ``--scenarios a,b,c``: instead of training, one fault under
torchrun per attempt (attempt i runs the i-th; with ``--max-restarts 2`` one job runs all
three): ``sleep``: rank 1 stops in a sleep; ``save0``: only rank 0 calls ``checkpoint.save``;
``dtype``: ranks all-reduce tensors of different dtypes. ``torchdist.checkpoint`` is imported
only when used (it costs a second and a half of CPU per rank).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import signal
import time

import torch

import torchdist as td

GLOBAL_BATCH = 8
SAVE_EVERY = 3


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: the same wherever and whenever it is computed."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 4, generator=g)
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return x, x @ w + 0.1 * torch.randn(GLOBAL_BATCH, 1, generator=g)


def build() -> torch.nn.Module:
    """The model, initialised from its own generator (threads of in_process share the global)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def train(topo: td.Topology, root: str | None, steps: int, kill_at: int = -1):
    """Train to ``steps``, resuming from ``root``'s newest checkpoint; return (weights, resumed
    step). Saves every ``SAVE_EVERY`` steps when ``root`` is given."""
    if root:
        from torchdist import checkpoint
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = td.TrainState(model=model, optimizer=opt)
    if root and any(pathlib.Path(root).glob(f"step_*/{checkpoint.MARKER}")):
        state = checkpoint.load(root, state, topo)
    resumed = state.step
    share = GLOBAL_BATCH // topo.world_size
    while state.step < steps:
        x, y = (t[topo.rank * share : (topo.rank + 1) * share] for t in batch(state.step))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = td.all_reduce([p.grad for p in model.parameters()], topo, op="mean")
        for p, g in zip(model.parameters(), grads):
            p.grad.copy_(g)
        opt.step()
        state = dataclasses.replace(state, step=state.step + 1)
        if root and state.step % SAVE_EVERY == 0:
            checkpoint.save(root, state, topo, keep=2)
        if state.step == kill_at and topo.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a real, uncatchable death mid-training
    return {n: p.detach().clone() for n, p in model.named_parameters()}, resumed


def stuck_forever() -> None:
    """Where the stuck rank sits; its name must show up in the job's log."""
    time.sleep(600)


def scenario(topo: td.Topology, kind: str, root: str) -> None:
    """One fault: the job must end with a torchdist error (and the stuck rank's stack)."""
    td.barrier(topo)  # every rank is up: the timeout now measures the fault alone
    if kind == "sleep":
        if topo.rank == 1:
            stuck_forever()
        td.all_reduce(torch.ones(1), topo)
    elif kind == "save0":
        from torchdist import checkpoint

        if topo.rank == 0:  # the Accelerate habit
            checkpoint.save(root, td.TrainState(model=build(), step=1), topo)
        for _ in range(3):
            td.all_reduce(torch.ones(2), topo)
        stuck_forever()
    elif kind == "dtype":
        dtype = torch.float32 if topo.rank == 0 else torch.int64
        td.all_reduce(torch.ones(4, dtype=dtype), topo)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--root", default="")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--scenarios", default="")
    args = parser.parse_args()
    topo = td.Topology.from_env(device="cpu")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    with td.distributed(topo) as live:
        if args.scenarios:
            kind = args.scenarios.split(",")[attempt]
            if live.rank == 0:
                print(f"[scenario] attempt {attempt}: {kind}", flush=True)
            scenario(live, kind, f"{args.root}_{kind}")
            return
        weights, resumed = train(live, args.root, args.steps, args.kill_at if attempt == 0 else -1)
        if live.rank == 0:
            torch.save({"weights": weights, "resumed": resumed, "attempt": attempt,
                        "world": live.world_size}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
