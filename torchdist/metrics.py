"""Metrics: `MetricsLogger(topo, dir)` (reduced across ranks when logged, written by rank 0) and
`gather_for_metrics` (every evaluation sample exactly once, across the data-parallel ranks).

Rank 0 appends one JSON object per logged step to ``dir/metrics.jsonl`` and writes TensorBoard
scalar events to ``dir``: with ``tensorboard=None`` (the default) when the ``tensorboard`` package
is installed, with ``True`` always (every rank raises a clear ImportError at construction when it
is missing), with ``False`` never. Keys of nested metrics are joined with ``/``, which TensorBoard
shows as groups. Metrics pytrees are reduced (mean over the ``"dp"`` axis by default) only on
steps that are logged, never every step, so logging every ``every`` steps costs one small
collective per ``every`` steps.

Trackers beside TensorBoard, each imported only when asked for, on rank 0 only:

- ``mlflow=True``: an MLflow run in the local file store ``dir/mlruns`` (MLflow 3 asks for
  ``MLFLOW_ALLOW_FILE_STORE=true`` to use it), or ``mlflow="sqlite:///runs/mlflow.db"`` (any
  tracking URI). View with ``mlflow ui --backend-store-uri <uri>``.
- ``wandb=True``: a Weights & Biases run in offline mode under ``dir/wandb`` (nothing leaves the
  machine; ``wandb sync dir/wandb/offline-run-*`` uploads it later); ``wandb="online"`` logs live.

A logger made again on the same ``dir`` (a resumed run) appends to ``metrics.jsonl`` and
continues the same MLflow / W&B run (their ids are kept in ``dir``), so a plot of the file
(``torchdist plot``) shows the whole run.

Example::

    logger = td.MetricsLogger(topo, "runs/exp1", every=10)
    for batch in loader:
        state, metrics = step(state, batch)
        logger.log(state.step, metrics)     # collective only when state.step % 10 == 0
    logger.close()
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any

import optree
import torch

from torchdist.collectives import Axis, Over, all_reduce, gather
from torchdist.errors import CollectiveError
from torchdist.topology import Topology

__all__ = ["MetricsLogger", "gather_for_metrics"]


class MetricsLogger:
    """See the module docstring. Every rank must call ``log`` with the same steps."""

    def __init__(
        self,
        topo: Topology,
        directory: str,
        *,
        every: int = 1,
        axis: Axis = "dp",
        op: str = "mean",
        tensorboard: bool | None = None,
        mlflow: bool | str = False,
        wandb: bool | str = False,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.topo, self.directory, self.every, self.axis, self.op = topo, directory, every, axis, op
        self._writer = None
        self._file = None
        self._trackers: list[Any] = []
        for name, wanted in (("mlflow", mlflow), ("wandb", wandb)):
            if wanted and importlib.util.find_spec(name) is None:
                raise ImportError(
                    f"MetricsLogger({name}=...) needs the {name} package: pip install "
                    f"{'mlflow-skinny' if name == 'mlflow' else name} (it is in torchdist[dev])"
                )
        if tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ImportError(
                "MetricsLogger(tensorboard=True) needs the tensorboard package: pip install "
                "tensorboard (or pass tensorboard=None to write events only where it is installed; "
                "metrics.jsonl is written either way)"
            )
        if topo.rank == 0:
            os.makedirs(directory, exist_ok=True)
            self._file = open(os.path.join(directory, "metrics.jsonl"), "a")
            if tensorboard or (tensorboard is None and importlib.util.find_spec("tensorboard")):
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(directory)
            from torchdist import _trackers

            if mlflow:
                uri = mlflow if isinstance(mlflow, str) else None
                self._trackers.append(_trackers.MLflow(directory, uri, run_name, config))
            if wandb:
                mode = wandb if isinstance(wandb, str) else "offline"
                self._trackers.append(_trackers.WandB(directory, mode, run_name, config))

    def log(self, step: int, metrics: Any) -> dict[str, float] | None:
        """Reduce and write ``metrics`` if ``step`` is a logging step; return what was written
        (on rank 0; None elsewhere and on other steps). Communicates: one all-reduce per dtype
        over ``axis`` on logging steps.
        """
        if step % self.every:
            return None
        floats = {
            key: value.detach().float().reshape(())
            for key, value in _flat(metrics).items()
            if isinstance(value, torch.Tensor) and value.numel() == 1
        }
        reduced = all_reduce(floats, self.topo, op=self.op, axis=self.axis) if floats else {}
        if self.topo.rank != 0:
            return None
        row = {k: float(v) for k, v in reduced.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **row}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in row.items():
                self._writer.add_scalar(key, value, step)
        for tracker in self._trackers:
            tracker.log(row, step)
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def _flat(metrics: Any) -> dict[str, Any]:
    paths, leaves, _ = optree.tree_flatten_with_path(metrics)
    return {"/".join(map(str, path)): leaf for path, leaf in zip(paths, leaves)}


def gather_for_metrics(
    tree: Any,
    over: Over,
    *,
    dataset_len: int | None = None,
    samples_seen: int = 0,
    loader: Any = None,
    axis: Axis = "dp",
    check: bool | None = None,
) -> Any:
    """``gather`` over the data-parallel ranks, minus the samples that even batches repeated.

    ``shard_loader(even_batches=True)`` pads the last global batch by repeating samples, at its
    end. Given the ``dataset_len`` and how many samples of this epoch were gathered before this
    batch (``samples_seen``), the rows past ``dataset_len`` are dropped, so every sample is
    counted exactly once. Over a ``Topology`` the default axis is ``"dp"``: ranks that differ
    only in ``tp``/``cp``/``pp`` hold the same samples and are not gathered twice. With
    ``loader=`` (any ``td.data.shard_loader``) the rows kept are the real samples of the global
    batch it yielded last (``loader.batch_real``): no bookkeeping needed.

    Communicates: as ``gather``.

    Example::

        for x, y in loader:
            preds = td.gather_for_metrics(model(x).argmax(-1), topo, loader=loader)
    """
    if not isinstance(over, Topology):
        axis = None if axis == "dp" else axis
    if loader is not None and dataset_len is not None:
        raise CollectiveError("gather_for_metrics: pass loader= or dataset_len=, not both.")
    gathered = gather(tree, over, axis=axis, check=check)
    if loader is not None:
        keep = int(loader.batch_real)
    elif dataset_len is None:
        return gathered
    else:
        keep = max(dataset_len - samples_seen, 0)
    leaves, treedef = optree.tree_flatten(gathered)
    lengths = {leaf.shape[0] for leaf in leaves}
    if len(lengths) > 1:
        raise CollectiveError(
            f"gather_for_metrics needs leaves with one batch dimension, found lengths {lengths}."
        )
    return optree.tree_unflatten(treedef, [leaf[:keep] for leaf in leaves])
