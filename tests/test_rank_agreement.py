"""Utilities where every rank must agree (issue 15): the cross-rank flags `any_rank` / `all_ranks`
(early stopping without a hang) and `find_executable_batch_size` (retry smaller on
out-of-memory, every rank on the same size). In-process worlds: real gloo groups, no process."""

from __future__ import annotations

import pytest
import torch

import torchdist as td
from torchdist import ConfigError, StepError, Topology


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


def _overcommit_guesses() -> bool:
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def test_any_rank_stops_every_rank_at_the_same_step():
    def fn(topo):
        seen = []
        for step in range(100):
            seen.append(step)
            if td.any_rank(topo.rank == 2 and step == 5, topo):  # one rank wants to stop
                break
        every = td.all_ranks(topo.rank != 1, topo), td.all_ranks(True, topo)
        some = td.any_rank(torch.tensor(False), topo)
        return seen[-1], every, some

    for last, every, some in td.in_process(fn, 3, timeout=30):
        assert last == 5 and every == (False, True) and some is False
    assert td.any_rank(True, Topology.single()) and not td.all_ranks(False, Topology.single())


@pytest.mark.skipif(not _overcommit_guesses(), reason="needs vm.overcommit_memory=0 (Linux)")
def test_find_executable_batch_size_agrees_on_one_size_after_real_out_of_memory():
    """Rank 1 has 'less memory' (a larger allocation per example): a real CPU allocation larger
    than RAM fails (DefaultCPUAllocator) on it at sizes where rank 0 still fits. Rank 0's own
    retries alone would stop at 16; agreeing, both take 2."""
    total = _mem_total()

    def fn(topo):
        per_example = total // 3 if topo.rank == 1 else total // 24
        sizes = []

        def trial(batch_size):
            sizes.append(batch_size)
            block = torch.empty(batch_size * per_example, dtype=torch.uint8)  # untouched pages
            return batch_size * 10 + (block.numel() > 0)

        return td.find_executable_batch_size(trial, topo, start=32), sizes

    for (size, result), sizes in td.in_process(fn, 2, timeout=60):
        assert (size, result, sizes) == (2, 21, [32, 16, 8, 4, 2])


def test_find_executable_batch_size_raises_together():
    def fn(topo, kind):
        def trial(batch_size):
            if kind == "other" and topo.rank == 0 and batch_size == 4:
                raise KeyError("a bug, not memory")
            if kind == "always" or batch_size > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return batch_size

        try:
            return td.find_executable_batch_size(trial, topo, start=16, min_size=2)
        except (KeyError, StepError) as exc:
            return type(exc).__name__, str(exc)

    assert td.in_process(fn, 2, "ok", timeout=30) == [(4, 4), (4, 4)]
    (kind0, _), (kind1, text1) = td.in_process(fn, 2, "other", timeout=30)
    assert kind0 == "KeyError" and kind1 == "StepError"
    assert "raised an error other than out-of-memory on another rank" in text1
    for kind, text in td.in_process(fn, 2, "always", timeout=30):
        assert kind == "StepError" and "every batch size tried ([16, 8, 4, 2])" in text
    for bad in ({"start": 0}, {"start": 8, "factor": 1.0}, {"start": 8, "min_size": 9}):
        with pytest.raises(ConfigError):
            td.find_executable_batch_size(lambda b: b, Topology.single(), **bad)


@pytest.mark.parametrize("how", ["sync_grads", "replicate"])
def test_uneven_inputs_stop_every_rank_at_the_shortest_without_a_hang(how):
    """Rank 0 has 5 batches, rank 1 has 3: both train 3 steps and end with the same weights
    (without stop_at_shortest, rank 0 waits in its 4th gradient all-reduce until the timeout)."""
    from torchdist.sharding import replicate
    from torchdist.transforms import compose, optimize, sync_grads, value_and_grad

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(5)]
    init = torch.nn.Linear(3, 1).state_dict()

    def loss_fn(model, batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    def fn(topo):
        model = torch.nn.Linear(3, 1)
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if how == "replicate":
            model = replicate(model, topo)
            step = compose(optimize(opt))(value_and_grad(loss_fn))
        else:
            step = compose(optimize(opt), sync_grads(topo))(value_and_grad(loss_fn))
        state = step.init(td.TrainState(model=model, optimizer=opt))
        mine = data if topo.rank == 0 else data[:3]
        for batch in td.stop_at_shortest(mine, topo):
            state, _ = step(state, batch)
        return state.step, [p.detach().clone() for p in model.parameters()]

    (steps0, weights0), (steps1, weights1) = td.in_process(fn, 2, timeout=30)
    assert steps0 == steps1 == 3
    assert all(torch.equal(a, b) for a, b in zip(weights0, weights1))
    assert list(td.stop_at_shortest(iter([1, 2]), Topology.single())) == [1, 2]


def _uneven(n0: int, n1: int, seed: int):
    """Rank 0's ``n0`` and rank 1's ``n1`` batches of a 3 -> 1 regression, and one initial
    ``Linear``'s weights (built here: in-process ranks are threads sharing torch's RNG)."""
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g))
               for _ in range(n0 + n1)]  # fmt: skip
    return {0: batches[:n0], 1: batches[n0:]}, torch.nn.Linear(3, 1).state_dict()


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def test_join_lets_a_replicated_model_train_on_uneven_inputs_without_dropping_any():
    """Rank 0 has 5 batches, rank 1 has 3. Inside td.join, rank 1 shadows rank 0's last two
    gradient all-reduces (a zero gradient; divided by the initial world size, as torch does):
    both end with the weights of that update rule computed by hand, and nothing hangs."""
    from torchdist.sharding import replicate

    (mine, init), lr, loss = _uneven(5, 3, seed=0), 0.1, _mse

    def fn(topo):
        model = torch.nn.Linear(3, 1)
        model.load_state_dict(init)
        model = replicate(model, topo)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        steps = 0
        with td.join(model):
            for batch in mine[topo.rank]:
                opt.zero_grad()
                loss(model, batch).backward()
                opt.step()
                steps += 1
        return steps, [p.detach().clone() for p in model.parameters()]

    (steps0, weights0), (steps1, weights1) = td.in_process(fn, 2, timeout=30)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(init)
    for i in range(5):
        grads = []
        for batch in [mine[0][i]] + ([mine[1][i]] if i < 3 else []):
            reference.zero_grad()
            loss(reference, batch).backward()
            grads.append([p.grad.clone() for p in reference.parameters()])
        with torch.no_grad():
            for j, p in enumerate(reference.parameters()):
                p -= lr * sum(gr[j] for gr in grads) / 2
    assert (steps0, steps1) == (5, 3)
    for a, b, want in zip(weights0, weights1, reference.parameters()):
        assert torch.equal(a, b) and torch.allclose(a, want, atol=1e-6)
    with pytest.raises(td.CompositionError, match=r"td.stop_at_shortest"):
        with td.join(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("divide_by_initial_world_size", [True, False])
def test_join_lets_sync_grads_train_on_uneven_inputs_without_dropping_any(
    divide_by_initial_world_size,
):
    """The same under ``sync_grads`` (``td.join(state)``), through the composed step, with
    ``accumulate(2)``: rank 0 has 10 batches (5 updates), rank 1 has 6 (3). Rank 1 shadows rank
    0's last two updates' bucketed all-reduces (and none on micro-steps); the divisor is the
    initial world size or the ranks still training; at the end both hold rank 0's weights."""
    from torchdist.transforms import accumulate, compose, optimize, sync_grads, value_and_grad

    (mine, init), lr, loss = _uneven(10, 6, seed=1), 0.1, _mse

    def fn(topo):
        model = torch.nn.Linear(3, 1)
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        step = compose(optimize(opt), sync_grads(topo, bucket_mb=1e-6), accumulate(2))(
            value_and_grad(loss)
        )
        state = step.init(td.TrainState(model, opt))
        assert state.transforms["sync_grads"].buckets == 2  # weight and bias: two buckets
        updates = 0
        with td.join(state, divide_by_initial_world_size=divide_by_initial_world_size):
            for batch in mine[topo.rank]:
                state, metrics = step(state, batch)
                updates += int(metrics["update"])
        return updates, [p.detach().clone() for p in model.parameters()]

    (updates0, weights0), (updates1, weights1) = td.in_process(fn, 2, timeout=60)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(init)
    for u in range(5):
        active = [0, 1] if u < 3 else [0]
        total = None
        for rank in active:
            reference.zero_grad()
            for batch in mine[rank][2 * u : 2 * u + 2]:
                (loss(reference, batch) / 2).backward()
            grads = [p.grad.clone() for p in reference.parameters()]
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        divisor = 2 if divide_by_initial_world_size else len(active)
        with torch.no_grad():
            for p, grad in zip(reference.parameters(), total):
                p -= lr * grad / divisor
    assert (updates0, updates1) == (5, 3)
    for a, b, want in zip(weights0, weights1, reference.parameters()):
        assert torch.equal(a, b) and torch.allclose(a, want, atol=1e-6)
