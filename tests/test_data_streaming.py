"""Streams, dispatch, batch samplers and token-normalised losses (issue 12 items 6-7, issue 18.5).

Samples are their own indices, so a batch says exactly which samples it holds. Split-mode
loaders communicate nothing: one loader per rank of a non-live ``Topology`` in this process.
Dispatch, ``gather_for_metrics(loader=)`` and the token-loss parity run in in-process worlds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, TensorDataset

import torchdist as td
from torchdist import CheckpointError, ConfigError, Topology
from torchdist.data import count_tokens, shard_loader, token_mean_loss, with_window_tokens

N, B = 22, 4


class Stream(IterableDataset):
    def __init__(self, n: int = N) -> None:
        self.n = n

    def __iter__(self):
        yield from (torch.tensor(i) for i in range(self.n))


def per_rank(dataset, world: int, **kw) -> list:
    return [shard_loader(dataset, Topology(world_size=world, rank=r), batch_size=B, **kw)
            for r in range(world)]  # fmt: skip


def real_rows(loaders, key=None) -> list[list[int]]:
    """Each global step's samples, in dp order, with the even-batch repeats dropped."""
    iters, out = [iter(x) for x in loaders], []
    while True:
        parts = [next(it, None) for it in iters]
        if all(p is None for p in parts):
            return out
        rows = torch.cat([(p[key] if key else p).reshape(-1) for p in parts if p is not None])
        out.append(rows[: loaders[0].batch_real].tolist())


def flat(steps) -> list[int]:
    return [i for step in steps for i in step]


# --------------------------------------------------------------------------- split streams
def test_torch_iterable_is_split_disjoint_even_and_resumable():
    loaders = per_rank(Stream(), 2)
    sizes = [[len(b) for b in loader] for loader in per_rank(Stream(), 2)]
    assert sizes == [[B, B, B]] * 2  # even: the last global batch (6 real) is padded
    assert flat(real_rows(loaders)) == list(range(N))
    assert loaders[0].dataset_len == N and loaders[0].epoch == 1
    # Resume mid-epoch after one global batch, at world size 2 and at world size 1.
    first = per_rank(Stream(), 2)
    for loader in first:
        next(iter(loader))
    state = first[0].state_dict()
    assert state["cursor"] == 2 * B
    for world in (2, 1):
        again = per_rank(Stream(), world)
        for loader in again:
            loader.load_state_dict(state)
        assert flat(real_rows(again)) == list(range(2 * B, N))


def test_stream_drop_last_and_uneven():
    dropped = per_rank(Stream(), 2, drop_last=True)
    assert flat(real_rows(dropped)) == list(range(16))
    uneven = per_rank(Stream(), 2, even_batches=False)
    assert [[len(b) for b in x] for x in uneven] == [[B, B, B], [B, B, 2]]


def test_hf_map_style_and_streaming_datasets():
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"id": list(range(N))}).with_format("torch")
    assert flat(real_rows(per_rank(table, 2, shuffle=False), "id")) == list(range(N))
    shuffled = flat(real_rows(per_rank(table, 2, seed=1), "id"))
    assert sorted(shuffled) == list(range(N)) and shuffled != list(range(N))

    def rows():
        yield from ({"id": i} for i in range(N))

    streams = [
        datasets.IterableDataset.from_generator(rows).with_format("torch"),
        table.to_iterable_dataset(num_shards=2),
        table.to_iterable_dataset(num_shards=2).shuffle(seed=0, buffer_size=8),
    ]
    for stream in streams:
        got = flat(real_rows(per_rank(stream, 2), "id"))
        assert sorted(got) == list(range(N)), got


def test_a_stream_that_cannot_be_sharded_is_refused():
    gen = (torch.tensor(i) for i in range(N))
    with pytest.raises(ConfigError, match="one-shot iterator.*dispatch=True"):
        shard_loader(gen, Topology.single(), batch_size=B)
    for kw in ({"n": 0}, {"n": 3, "drop_last": True}):
        empty = shard_loader(Stream(kw.pop("n")), Topology.single(), batch_size=B, **kw)
        with pytest.raises(ConfigError, match="yielded no .*global batch"):
            list(empty)
    loader = shard_loader(Stream(), Topology.single(), batch_size=B)
    with pytest.raises(CheckpointError, match="not a stream loader"):
        loader.load_state_dict({"epoch": 0, "cursor": 3})
    with pytest.raises(CheckpointError, match="cursor=-1"):
        loader.load_state_dict({"version": 1, "kind": "stream", "epoch": 0, "cursor": -1})


# --------------------------------------------------------------------------- collectives
def _metrics_and_dispatch(topo):
    out = {}
    for name, loader in (
        ("map", shard_loader(TensorDataset(torch.arange(N)), topo, batch_size=B, seed=2)),
        ("stream", shard_loader(Stream(), topo, batch_size=B)),
    ):
        seen = []
        for batch in loader:
            x = batch[0] if isinstance(batch, list) else batch
            seen += td.gather_for_metrics(x, topo, loader=loader).tolist()
        out[name] = seen
    with pytest.raises(td.CollectiveError, match="not both"):
        td.gather_for_metrics(torch.ones(1), topo, loader=loader, dataset_len=N)
    # dispatch: only dp rank 0 holds the source (a one-shot generator); others pass anything.
    source = (torch.tensor(i) for i in range(N)) if topo.rank == 0 else iter(())
    loader = shard_loader(source, topo, batch_size=B, dispatch=True)
    mine, seen = [], []
    for x in loader:
        mine.append(x.tolist())
        seen += td.gather_for_metrics(x, topo, loader=loader).tolist()
    out["dispatch_mine"], out["dispatch_seen"] = mine, seen
    return out


def test_gather_for_metrics_with_loader_and_dispatch_on_two_ranks():
    r0, r1 = td.in_process(_metrics_and_dispatch, 2)
    for out in (r0, r1):
        assert sorted(out["map"]) == list(range(N)) and len(out["map"]) == N
        assert out["stream"] == list(range(N))
        assert out["dispatch_seen"] == list(range(N))
    assert r0["dispatch_mine"] == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]
    assert r1["dispatch_mine"] == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 0, 1]]


class Broken(IterableDataset):
    def __iter__(self):
        yield {"x": torch.tensor(0)}
        raise OSError("connection reset")


def _dispatch_resume_and_failure(topo):
    rows = lambda loader: [b["x"].tolist() for b in loader]  # noqa: E731
    dicts = [{"x": torch.tensor(i)} for i in range(N)]
    first = shard_loader(dicts, topo, batch_size=B, dispatch=True)
    it = iter(first)
    head = [next(it)["x"].tolist()]
    state = first.state_dict()
    again = shard_loader(dicts, topo, batch_size=B, dispatch=True)
    again.load_state_dict(state)
    out = {"head": head, "state": state, "rest": rows(again), "epoch": again.epoch}
    try:
        rows(shard_loader(Broken(), topo, batch_size=1, dispatch=True))
    except ConfigError as exc:
        out["error"] = str(exc)
    return out


def test_dispatch_resumes_and_a_failing_reader_stops_every_rank():
    for d, out in enumerate(td.in_process(_dispatch_resume_and_failure, 2)):
        assert out["state"]["cursor"] == 2 * B and out["epoch"] == 1
        mine = [list(range(g * 2 * B + d * B, g * 2 * B + (d + 1) * B)) for g in range(2)]
        assert out["head"] == mine[:1] and out["rest"][0] == mine[1]
        assert "connection reset" in out["error"]


def test_hf_stream_resumes_mid_epoch():
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"id": list(range(N))}).with_format("torch")
    make = lambda: per_rank(table.to_iterable_dataset(num_shards=2), 2)  # noqa: E731
    first = make()
    whole = flat(real_rows(make(), "id"))
    for loader in first:
        next(iter(loader))
    resumed = make()
    for loader in resumed:
        loader.load_state_dict(first[0].state_dict())
    assert flat(real_rows(resumed, "id")) == whole[2 * B :]


# --------------------------------------------------------------------------- batch samplers
class Buckets:
    """Length bucketing: indices sorted by a fake length, cut into batches of varying size."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = sorted(range(self.n), key=lambda i: ((i * 7) % self.n, self.epoch))
        sizes, start = [1, 2, 3, 4, 5], 0
        while start < self.n:
            size = sizes[(start + self.epoch) % len(sizes)]
            yield order[start : start + size]
            start += size


def test_batch_sampler_is_sharded_and_resumes():
    ds = TensorDataset(torch.arange(N))
    make = lambda world: [  # noqa: E731
        shard_loader(ds, Topology(world_size=world, rank=r), batch_size=1,
                     batch_sampler=Buckets(N)) for r in range(world)
    ]  # fmt: skip
    batches = list(Buckets(N))
    loaders = make(2)
    got = [[b[0].tolist() for b in loader] for loader in loaders]
    assert got[0] == batches[0::2] and got[1][: len(batches) // 2] == batches[1::2]
    assert sorted({i for part in got for b in part for i in b}) == list(range(N))
    first = make(2)
    for loader in first:
        next(iter(loader))
    state = first[0].state_dict()
    one = make(1)[0]
    one.load_state_dict(state)
    assert [b[0].tolist() for b in one] == batches[2:]


# --------------------------------------------------------------------------- token loss
V, T = 11, 6


def _lm_batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (4, T), generator=g)
    labels = ids.clone()
    for row, pad in enumerate([0, 3, 1, 4]):  # uneven padding: ranks hold 8 vs 4 targets
        if pad:
            labels[row, -pad:] = -100
    return ids, labels


def _lm_shape():
    return torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V))


_LM_INIT = _lm_shape().state_dict()  # built once: in-process ranks are threads sharing the RNG


def _lm():
    model = _lm_shape()
    model.load_state_dict(_LM_INIT)
    return model


def _token_step(topo):
    from torchdist.transforms import compose, optimize, sync_grads, value_and_grad

    ids, labels = _lm_batches()
    d = topo.dp_rank()
    mine = {"input_ids": ids[2 * d : 2 * d + 2], "labels": labels[2 * d : 2 * d + 2]}
    model = _lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def loss_fn(model, batch):
        n = count_tokens(batch["labels"], topo)
        return token_mean_loss(model(batch["input_ids"]), batch["labels"], n, topo=topo)

    step = compose(optimize(opt), sync_grads(topo))(value_and_grad(loss_fn))
    state = td.TrainState(model=model, optimizer=opt)
    for _ in range(2):
        state, _ = step(state, mine)
    return [p.detach().clone() for p in model.parameters()]


def test_token_mean_loss_matches_single_process_with_uneven_padding():
    ids, labels = _lm_batches()
    model = _lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        logits = model(ids)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for params in td.in_process(_token_step, 2):
        for got, want in zip(params, model.parameters(), strict=True):
            torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)
    assert count_tokens([labels[:2], labels[2:]], Topology.single()) == 12  # 7 + 5 targets
    # Without the helper, the mean of per-rank means is not the global mean here.
    model = _lm()
    with torch.no_grad():
        logits = model(ids)[:, :-1]
        flat_targets = [labels[r : r + 2, 1:].reshape(-1) for r in (0, 2)]
        means = [
            F.cross_entropy(logits[r : r + 2].reshape(-1, V), t)
            for r, t in zip((0, 2), flat_targets, strict=True)
        ]
        whole = F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1))
    assert abs(float(sum(means) / 2 - whole)) > 1e-4  # far above the parity tolerance


def _token_accumulate(topo):
    """accumulate(2) across calls: one micro-batch of one row per call, the window's count."""
    from torchdist.transforms import accumulate, compose, optimize, sync_grads, value_and_grad

    ids, labels = _lm_batches()
    d = topo.dp_rank()
    micro = [{"input_ids": ids[2 * d + i : 2 * d + i + 1],
              "labels": labels[2 * d + i : 2 * d + i + 1]} for i in range(2)]  # fmt: skip
    window = count_tokens([m["labels"] for m in micro], topo)  # over the whole window
    batches = list(with_window_tokens(micro, topo, 2))
    assert all(int(b["num_tokens"]) == int(window) == 12 for b in batches)
    model = _lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def loss_fn(model, batch):
        mean_over = topo.size("dp") * 2
        logits = model(batch["input_ids"])
        return token_mean_loss(logits, batch["labels"], batch["num_tokens"], mean_over=mean_over)

    step = compose(optimize(opt), sync_grads(topo), accumulate(2))(value_and_grad(loss_fn))
    state = td.TrainState(model=model, optimizer=opt)
    for batch in batches:
        state, _ = step(state, batch)
    return [p.detach().clone() for p in model.parameters()]


def test_token_mean_loss_under_accumulation_matches_one_global_step():
    ids, labels = _lm_batches()
    model = _lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logits = model(ids)[:, :-1]
    F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1)).backward()
    opt.step()
    for params in td.in_process(_token_accumulate, 2):
        for got, want in zip(params, model.parameters(), strict=True):
            torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)
