"""progress() shows on rank 0 only; MetricsLogger reduces when it logs and writes on rank 0."""

from __future__ import annotations

import json

import pytest
import torch

import torchdist as td


@pytest.mark.multiprocess
def test_progress_prints_only_on_rank_zero(capfd):
    def run(topo):
        bar = td.progress(range(6), topo, every=3, tokens_per_step=10, desc=f"rank{topo.rank}",
                          use_tqdm=False)  # fmt: skip
        for _ in bar:
            bar.log(loss=torch.tensor(1.5))
        return topo.rank

    assert td.spawn(run, 2) == [0, 1]  # real processes share this test's stdout/stderr fds
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rank")]
    assert lines and all(line.startswith("rank0 ") for line in lines)
    assert len(lines) == 2 and "tokens/s" in lines[0] and "loss 1.5" in lines[0]


def test_metrics_logger_reduces_only_on_logged_steps(tmp_path):
    def run(topo):
        logger = td.MetricsLogger(topo, str(tmp_path), every=2)
        written = [logger.log(step, {"loss": torch.tensor(float(topo.rank + step))})
                   for step in range(4)]  # fmt: skip
        logger.close()
        return written

    results = td.in_process(run, 2)
    assert results[0] == [{"loss": 0.5}, None, {"loss": 2.5}, None]
    assert results[1] == [None] * 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 0.5), (2, 2.5)]
