"""examples/train_gpt.py --parallel pp on 2 real ranks ends where --parallel sync ends.

One ``torchdist launch -n 2`` (real processes, gloo) runs the example's ``main`` twice, one
world after the other (the costly part is starting the processes, so one job, few steps). Same
seed, same global batches: the pipelined run (one stage per rank, 2 micro-batches, AdamW,
clipping, a schedule of the learning rate) must report the same losses and gradient norms as
data-parallel training, to float32 round-off.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _snapshot(tmp_path: pathlib.Path) -> pathlib.Path:
    """The example beside a fixed corpus (it trains on the ``torchdist/**/*.py`` next to it): the
    repository's own sources change with every edit, and 4 steps on a new text need not lower
    the loss; this text is the same in every run."""
    root = tmp_path / "snapshot"
    (root / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "train_gpt.py", root / "examples")
    (root / "torchdist").mkdir()
    lines = (f"def f{i}(x):\n    return x * {i % 7} + {i % 3}\n" for i in range(2000))
    (root / "torchdist" / "corpus.py").write_text("".join(lines))
    return root / "examples" / "train_gpt.py"


_BOTH = """
import sys
sys.path.insert(0, {examples!r})
import train_gpt
for parallel in ("pp", "sync"):
    train_gpt.main(["--parallel", parallel, "--steps", "4", "--log-every", "1", "--layers", "2",
                    "--dim", "32", "--seq", "32", "--batch", "8", "--run-dir", parallel])
"""


def _train_both(tmp_path: pathlib.Path, script: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """The metrics rows of the pipelined and the data-parallel run, from one 2-rank job."""
    both = tmp_path / "both.py"
    both.write_text(_BOTH.format(examples=str(script.parent)))
    out = subprocess.run(
        [sys.executable, "-m", "torchdist.cli", "launch", "-n", "2", str(both)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "training: pp" in out.stdout and "training: sync_grads" in out.stdout, out.stdout
    return tuple(
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("pp", "sync")
    )


@pytest.mark.timeout(600)
def test_pipelined_example_reaches_the_loss_of_data_parallel_training(tmp_path):
    script = _snapshot(tmp_path)  # run from tmp_path: its torchdist/ is not on sys.path
    pipelined, synced = _train_both(tmp_path, script)
    assert [r["step"] for r in pipelined] == [r["step"] for r in synced] == [1, 2, 3, 4]
    for a, b in zip(pipelined, synced, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    assert pipelined[-1]["loss"] < pipelined[0]["loss"]  # and it trains
