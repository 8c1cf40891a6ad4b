"""`plot_metrics(jsonl, out_png)`: curves of a run from ``MetricsLogger``'s ``metrics.jsonl``.

A resumed run appends to the same file, so the file can hold steps twice: a run that logged up
to step 120, crashed, and resumed from its step-100 checkpoint logs 101..120 again. The rows a
restart replaces are dropped (the newest row of a step wins) and each restart is drawn as a
dashed vertical line, so the plot shows the whole run as training saw it.

Smoothing is TensorBoard's: a debiased exponential moving average (``smoothing=0.6`` weighs
the past 0.6); the raw values stay visible, faint, under the smoothed line. matplotlib is
imported on first use, through its object API (no pyplot global state, no display needed).

Communicates nothing (rank 0 wrote the file; call it anywhere).

Example::

    td.plot_metrics("runs/exp1/metrics.jsonl", "runs/exp1/loss.png", keys=("loss",))
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

__all__ = ["plot_metrics", "read_metrics", "smooth"]


def read_metrics(jsonl: str | os.PathLike[str]) -> tuple[list[dict[str, float]], list[int]]:
    """The rows of a ``metrics.jsonl`` in step order with restarts resolved, and the steps at
    which a restart began. Raises ``ValueError`` on a line that is not a JSON object."""
    rows: list[dict[str, float]] = []
    restarts: list[int] = []
    with open(jsonl) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number > 1 and not line.endswith("\n"):  # a run killed mid-write
                    continue
                raise ValueError(
                    f"{jsonl}:{number} is not JSON ({line[:60]!r}); expected the one-object-"
                    "per-line file MetricsLogger writes."
                ) from None
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{jsonl}:{number} has no 'step'; expected MetricsLogger rows.")
            if rows and row["step"] <= rows[-1]["step"]:  # a resume: it replaces those steps
                restarts.append(row["step"])
                rows = [r for r in rows if r["step"] < row["step"]]
            rows.append(row)
    return rows, restarts


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average; ``weight=0`` returns the values."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {weight}.")
    out, last, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        count += 1
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**count))
    return out


def plot_metrics(
    jsonl: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    *,
    keys: Sequence[str] | None = None,
    smoothing: float = 0.6,
    title: str | None = None,
    log_y: bool = False,
) -> list[str]:
    """Draw one panel per metric key of ``jsonl`` (default: every key but ``time``) against the
    step into ``out_png``; return the keys drawn. Needs matplotlib (``pip install matplotlib``).
    Communicates nothing.

    Example::

        plot_metrics("runs/exp1/metrics.jsonl", "loss.png", keys=["loss", "grad_norm"])
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plot_metrics needs matplotlib: pip install matplotlib (it is in torchdist[dev])"
        ) from None
    rows, restarts = read_metrics(jsonl)
    present = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("step", "time")]
    keys = list(keys) if keys is not None else present
    missing = [k for k in keys if k not in present]
    if not rows or missing or not keys:
        raise ValueError(
            f"{jsonl} has no rows for {missing or keys or 'any metric'}; the metrics it holds "
            f"are {present}. Log them with MetricsLogger.log(step, metrics) first."
        )
    figure = Figure(figsize=(7, 2.6 * len(keys)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        points = [(r["step"], float(r[key])) for r in rows if r.get(key) is not None]
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        ax.plot(steps, values, color="C0", alpha=0.3, linewidth=1, label="raw")
        if smoothing > 0 and len(values) > 2:
            ax.plot(steps, smooth(values, smoothing), color="C0", linewidth=2,
                    label=f"smoothed ({smoothing})")  # fmt: skip
        for step in restarts:
            ax.axvline(step, color="0.5", linestyle="--", linewidth=1)
        ax.set_ylabel(key)
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.minorticks_on()
    axes[0].legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("step" + (f"  (dashed: resumed at {restarts})" if restarts else ""))
    axes[0].set_title(title or os.fspath(jsonl))
    directory = os.path.dirname(os.fspath(out_png))
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    return keys
