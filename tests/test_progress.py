"""progress() shows on rank 0 only; MetricsLogger reduces when it logs and writes on rank 0."""

from __future__ import annotations

import json
import sys

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


def test_metrics_logger_writes_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in .[dev])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(topo):
        logger = td.MetricsLogger(topo, str(tmp_path), every=2, tensorboard=True)
        for step in range(4):
            metrics = {
                "loss": torch.tensor(float(topo.rank + step)),
                "grad": {"norm": torch.tensor(2.0)},
            }
            logger.log(step, metrics)
        logger.close()

    td.in_process(run, 2)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["grad/norm", "loss"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 0.5), (2, 2.5)]
    assert [(e.step, e.value) for e in events.Scalars("grad/norm")] == [(0, 2.0), (2, 2.0)]


def test_metrics_logger_without_tensorboard(tmp_path, monkeypatch):
    """tensorboard=False writes no events; tensorboard=True where the package is missing fails at
    construction on every rank (not later, in a collective that rank 0 never reaches)."""
    logger = td.MetricsLogger(td.Topology.single(), str(tmp_path / "off"), tensorboard=False)
    logger.log(0, {"loss": torch.tensor(1.0)})
    logger.close()
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["metrics.jsonl"]

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what find_spec sees when uninstalled
    for rank in (0, 1):
        topo = td.Topology(world_size=2, rank=rank, local_rank=rank)
        with pytest.raises(ImportError, match="pip install tensorboard"):
            td.MetricsLogger(topo, str(tmp_path / "required"), tensorboard=True)
    default = td.MetricsLogger(td.Topology.single(), str(tmp_path / "default"))
    default.log(0, {"loss": torch.tensor(1.0)})
    default.close()
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == ["metrics.jsonl"]


class _Terminal:
    """A stream that says it is a terminal, and keeps what was written."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_is_a_bar_in_a_terminal_and_plain_lines_in_logs_and_under_torchrun():
    pytest.importorskip("tqdm", reason="tqdm is not installed")
    single = td.Topology.single()
    under_torchrun = td.Topology(world_size=1, agent_store=True)
    cases = ((single, True, True), (single, False, False), (under_torchrun, True, False))
    for topo, tty, bar in cases:
        out = _Terminal(tty)
        shown = td.progress(range(4), topo, every=2, file=out)
        assert (shown._bar is not None) == bar
        list(shown)
        if bar:
            assert "\r" in out.text and "4/4" in out.text
        else:
            assert out.text.splitlines()[0].startswith("train 2/4  ") and "\r" not in out.text


def test_progress_step_numbers_continue_after_a_resume():
    out = _Terminal(False)
    resumed_at = 6
    for _ in td.progress(range(resumed_at, 10), td.Topology.single(), initial=resumed_at,
                         every=2, file=out):  # fmt: skip
        pass
    assert [line.split()[1] for line in out.text.splitlines()] == ["8/10", "10/10"]
