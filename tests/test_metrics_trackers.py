"""MetricsLogger's MLflow (local file store) and W&B (offline) backends, read back from what the
real packages wrote; and the loss-curve plot of its JSONL across a resume."""

from __future__ import annotations

import glob
import json
import struct

import pytest
import torch

import torchdist as td


def _log_two_ranks(tmp_path, **backend):
    def run(topo):
        logger = td.MetricsLogger(topo, str(tmp_path), every=2, tensorboard=False, **backend)
        for step in range(4):
            logger.log(step, {"loss": torch.tensor(float(topo.rank + step)),
                              "grad": {"norm": torch.tensor(2.0)}})  # fmt: skip
        logger.close()

    td.in_process(run, 2)


def test_mlflow_file_store_holds_the_reduced_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (mlflow-skinny is in .[dev])")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the opt-in
    _log_two_ranks(tmp_path, mlflow=True, run_name="exp1")
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (2, 2.5)]
    assert [m.value for m in client.get_metric_history(run_id, "grad/norm")] == [2.0, 2.0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "exp1"

    _log_two_ranks(tmp_path, mlflow=True)  # a resumed run continues the same MLflow run
    assert (tmp_path / "mlflow_run_id").read_text().strip() == run_id
    assert len(client.get_metric_history(run_id, "loss")) == 4


def test_mlflow_file_store_refused_without_the_opt_in_says_how(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (mlflow-skinny is in .[dev])")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    try:
        logger = td.MetricsLogger(td.Topology.single(), str(tmp_path), mlflow=True)
    except RuntimeError as exc:
        assert "MLFLOW_ALLOW_FILE_STORE=true" in str(exc) and "sqlite" in str(exc)
    else:  # an MLflow that still allows the file store by default
        logger.close()


def _wandb_history(path: str) -> list[dict[str, float]]:
    """History rows of an offline ``.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    pos, block, chunk, rows = 7, 32768, b"", []  # 7: the ":W&B" header, magic, version
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
                rows.append({k: json.loads(v) for k, v in items.items() if not k.startswith("_")}
                            | {"step": record.history.step.num})  # fmt: skip
    return rows


def test_wandb_offline_run_holds_the_reduced_metrics(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (it is in .[dev])")
    _log_two_ranks(tmp_path, wandb=True, config={"lr": 0.1})
    [path] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = _wandb_history(path)
    assert [(r["step"], r["loss"], r["grad/norm"]) for r in rows] == [(0, 0.5, 2.0), (2, 2.5, 2.0)]
    assert (tmp_path / "wandb_run_id").read_text().strip() in path


def test_a_missing_tracker_package_fails_at_construction(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        td.MetricsLogger(td.Topology(world_size=2, rank=1), str(tmp_path), wandb=True)


def test_plot_of_a_resumed_run_draws_the_whole_run(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (it is in .[dev])")
    from torchdist._plot import read_metrics, smooth

    jsonl = tmp_path / "metrics.jsonl"
    for steps in (range(0, 12, 2), range(6, 20, 2)):  # crashed after 10, resumed from step 6
        logger = td.MetricsLogger(td.Topology.single(), str(tmp_path), tensorboard=False)
        for step in steps:
            logger.log(step, {"loss": torch.tensor(10.0 / (step + 1))})
        logger.close()
    rows, restarts = read_metrics(jsonl)
    assert [r["step"] for r in rows] == list(range(0, 20, 2)) and restarts == [6]
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased
    out = tmp_path / "plots" / "loss.png"
    assert td.plot_metrics(jsonl, out) == ["loss"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="the metrics it holds are \\['loss'\\]"):
        td.plot_metrics(jsonl, out, keys=["accuracy"])
