"""examples/train_gpt.py --parallel pp on 2 real ranks ends where --parallel sync ends.

Two launches of ``torchdist launch -n 2`` (real processes, gloo): the costly part of the pipeline
tests, so one test, few steps. Same seed, same global batches: the pipelined run (one stage per
rank, 2 micro-batches, AdamW, clipping, a schedule of the learning rate) must report the same
losses and gradient norms as data-parallel training, to float32 round-off.
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
    """The example and its corpus (this repository's torchdist/*.py) copied once, so both runs
    read the same text even while the sources change."""
    root = tmp_path / "snapshot"
    (root / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "train_gpt.py", root / "examples")
    for source in ROOT.glob("torchdist/**/*.py"):
        target = root / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    return root / "examples" / "train_gpt.py"


def _train(tmp_path: pathlib.Path, script: pathlib.Path, parallel: str) -> list[dict]:
    run_dir = tmp_path / parallel
    out = subprocess.run(
        [sys.executable, "-m", "torchdist.cli", "launch", "-n", "2",
         str(script), "--parallel", parallel, "--steps", "4",
         "--log-every", "1", "--layers", "2", "--dim", "32", "--seq", "32", "--batch", "8",
         "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"training: {parallel if parallel != 'sync' else 'sync_grads'}" in out.stdout
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_pipelined_example_reaches_the_loss_of_data_parallel_training(tmp_path):
    script = _snapshot(tmp_path)  # run from tmp_path: its torchdist/ is not on sys.path
    pipelined, synced = _train(tmp_path, script, "pp"), _train(tmp_path, script, "sync")
    assert [r["step"] for r in pipelined] == [r["step"] for r in synced] == [1, 2, 3, 4]
    for a, b in zip(pipelined, synced, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    assert pipelined[-1]["loss"] < pipelined[0]["loss"]  # and it trains
