"""`progress(iterable, topo)`: a progress bar on rank 0 only, with steps/s and tokens/s.

A live tqdm bar where someone watches (``file`` is a terminal, or a notebook kernel runs) and
tqdm is installed; plain lines, one every ``every`` steps, everywhere else: in a log file, a CI
log, and under torchrun (``topo.agent_store``), where rank 0's carriage returns would garble the
other ranks' lines. Other ranks are silent. ``initial`` continues the count after a resume:
``progress(range(state.step, steps), topo, initial=state.step)`` shows ``101/300``, not ``1/200``.
Metrics handed to ``log`` are kept as tensors and turned into numbers only when displayed, so
the hot path never syncs with the device.

Example::

    bar = td.progress(range(state.step, steps), topo, initial=state.step,
                      tokens_per_step=batch * seq)
    for i in bar:
        state, metrics = step(state, next(batches))
        bar.log(loss=metrics["loss"])
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from torchdist.topology import Topology

__all__ = ["progress", "Progress"]


class Progress:
    """Iterator wrapper returned by ``progress``; see the module docstring."""

    def __init__(
        self,
        iterable: Iterable[Any],
        topo: Topology,
        *,
        total: int | None = None,
        initial: int = 0,
        tokens_per_step: int | None = None,
        every: int = 10,
        desc: str = "train",
        file: TextIO | None = None,
        use_tqdm: bool | None = None,
    ) -> None:
        self.iterable = iterable
        self.show = topo.rank == 0
        remaining = _len(iterable)
        self.initial = initial
        self.total = total if total is not None else (
            None if remaining is None else initial + remaining
        )
        self.tokens_per_step = tokens_per_step
        self.every = max(1, every)
        self.desc = desc
        self.file = file or sys.stderr
        self.metrics: dict[str, Any] = {}
        self._bar = None
        if use_tqdm is None:
            use_tqdm = not topo.agent_store and _watched(self.file)
        if self.show and use_tqdm:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, initial=initial, desc=desc, file=self.file,
                                 dynamic_ncols=True)  # fmt: skip

    def log(self, **metrics: Any) -> None:
        """Values to show next to the rate (tensors are read only when displayed)."""
        self.metrics.update(metrics)

    def __iter__(self) -> Iterator[Any]:
        last, last_count = time.perf_counter(), 0
        for count, item in enumerate(self.iterable, 1):
            yield item
            step = self.initial + count
            if not self.show or (step % self.every and step != self.total):
                continue
            now = time.perf_counter()
            rate = (count - last_count) / max(now - last, 1e-9)
            last, last_count = now, count
            self._display(step, rate)
        if self._bar is not None:
            self._bar.close()

    def _display(self, count: int, steps_per_s: float) -> None:
        parts = [f"{steps_per_s:.2f} steps/s"]
        if self.tokens_per_step:
            parts.append(f"{steps_per_s * self.tokens_per_step:,.0f} tokens/s")
        parts += [f"{k} {_number(v):.4g}" for k, v in self.metrics.items()]
        if self._bar is not None:
            self._bar.n = count
            self._bar.set_postfix_str("  ".join(parts), refresh=True)
            return
        of = f"/{self.total}" if self.total else ""
        print(f"{self.desc} {count}{of}  " + "  ".join(parts), file=self.file, flush=True)


def progress(iterable: Iterable[Any], topo: Topology, **kwargs: Any) -> Progress:
    """Wrap ``iterable`` in a progress display shown on rank 0 only. Communicates nothing.

    Keywords: ``total``, ``initial`` (steps done before a resume), ``tokens_per_step`` (adds
    tokens/s), ``every`` (display interval), ``desc``, ``file``, ``use_tqdm`` (None: a bar in a
    terminal or notebook, never under torchrun).
    """
    return Progress(iterable, topo, **kwargs)


def _watched(file: Any) -> bool:
    """Someone watches ``file`` live: a terminal, or a notebook kernel's output stream."""
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return True
    return "ipykernel" in sys.modules and file in (sys.stdout, sys.stderr)


def _len(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _number(value: Any) -> float:
    item = getattr(value, "item", None)
    return float(item() if item is not None else value)
