"""MLflow and Weights & Biases backends of ``MetricsLogger`` (rank 0 only, imported lazily).

Each keeps its run id in the log directory (``mlflow_run_id``, ``wandb_run_id``) so a logger
made again on the same directory, after a resume, continues the same run instead of starting a
second one. Communicates nothing.
"""

from __future__ import annotations

import os
import time

__all__ = ["MLflow", "WandB"]


def _saved_id(directory: str, name: str) -> str | None:
    path = os.path.join(directory, name)
    if os.path.exists(path):
        with open(path) as handle:
            return handle.read().strip() or None
    return None


def _save_id(directory: str, name: str, run_id: str) -> None:
    with open(os.path.join(directory, name), "w") as handle:
        handle.write(run_id + "\n")


class MLflow:
    """One MLflow run through ``MlflowClient`` (no active-run global), file store by default."""

    def __init__(
        self, directory: str, uri: str | None, run_name: str | None, config: dict | None
    ) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = uri or "file:" + os.path.join(os.path.abspath(directory), "mlruns")
        try:
            self.client = MlflowClient(tracking_uri=uri)
        except MlflowException as exc:
            if "MLFLOW_ALLOW_FILE_STORE" not in str(exc):
                raise
            raise RuntimeError(
                f"MetricsLogger(mlflow=True): MLflow refuses its local file store {uri} unless "
                "MLFLOW_ALLOW_FILE_STORE=true is set; set it, or pass a tracking URI such as "
                "mlflow='sqlite:///runs/mlflow.db' (needs sqlalchemy)."
            ) from None
        self.run_id = _saved_id(directory, "mlflow_run_id")
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
            except MlflowException:  # the store was deleted or moved: start afresh
                self.run_id = None
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name("torchdist")
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment("torchdist")
            )
            run = self.client.create_run(experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            _save_id(directory, "mlflow_run_id", self.run_id)
            for key, value in (config or {}).items():
                self.client.log_param(self.run_id, key, value)

    def log(self, row: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in row.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    """One W&B run, offline unless ``mode="online"``; files under ``directory/wandb``."""

    def __init__(
        self, directory: str, mode: str, run_name: str | None, config: dict | None
    ) -> None:
        import wandb

        if mode not in ("offline", "online", "disabled"):
            raise ValueError(
                f"MetricsLogger(wandb={mode!r}): expected True (offline), 'offline', 'online' "
                "or 'disabled'."
            )
        saved = _saved_id(directory, "wandb_run_id")
        self.run = wandb.init(
            mode=mode,
            dir=directory,
            project="torchdist",
            name=run_name,
            config=config,
            id=saved,
            resume="allow" if saved else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        if saved is None:
            _save_id(directory, "wandb_run_id", self.run.id)

    def log(self, row: dict[str, float], step: int) -> None:
        self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()
