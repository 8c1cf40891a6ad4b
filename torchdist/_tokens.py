"""Token-normalised losses for padded causal-LM batches: the mean over every real token.

A per-rank ``cross_entropy(..., reduction="mean")`` averages over that rank's real tokens; with
uneven padding the average of those means (what gradient averaging over ``dp`` computes) is not
the mean over the global batch. ``count_tokens`` all-reduces the real-token count; and
``token_mean_loss`` returns ``sum of this rank's token losses * mean_over / count``, where
``mean_over`` is the number of contributions that get averaged downstream: ``dp`` ranks (by
``sync_grads``/``replicate``/``shard``) times ``k`` accumulation calls (``accumulate(k)``
multiplies each call's loss by ``1/k``). The update then equals single-process training on the
whole global batch (and window). See ``docs/data.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from torchdist.topology import Topology

__all__ = ["count_tokens", "token_mean_loss", "with_window_tokens"]


def _targets(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    return labels[..., 1:] if shift else labels


def count_tokens(
    labels: Any,
    topo: Topology,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    axis: str = "dp",
) -> torch.Tensor:
    """Real (non-``ignore_index``) target tokens in ``labels``, summed over the ``axis`` ranks.

    ``labels`` is a tensor, a batch dict with ``"labels"``, or a sequence of either (the
    micro-batches of one accumulation window). ``shift=True`` counts ``labels[..., 1:]``, the
    targets of a causal LM. Communicates: one int64 ``all_reduce`` (sum) over ``axis``.

    Example::

        n = count_tokens(batch["labels"], topo)         # the same int64 scalar on every dp rank
    """
    from torchdist.collectives import all_reduce

    items = (
        labels
        if isinstance(labels, Sequence) and not isinstance(labels, torch.Tensor)
        else [labels]
    )
    local = torch.zeros((), dtype=torch.int64)
    for item in items:
        tensor = item["labels"] if isinstance(item, Mapping) else item
        local += (_targets(tensor, shift) != ignore_index).sum().cpu()
    if topo.world_size == 1 and not topo.is_live:
        return local
    return all_reduce(local, topo, op="sum", axis=axis)


def token_mean_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_tokens: torch.Tensor | int,
    *,
    topo: Topology | None = None,
    mean_over: int | None = None,
    ignore_index: int = -100,
    shift: bool = True,
) -> torch.Tensor:
    """This rank's share of the cross-entropy mean over ``num_tokens`` real tokens of all ranks.

    Returns ``sum(token losses) * mean_over / num_tokens``; ``mean_over`` defaults to
    ``topo.size("dp")`` (no accumulation). Under ``accumulate(k)`` pass the window's count
    (``count_tokens`` of its ``k`` micro-batches) and ``mean_over=dp * k``. The value is not the
    global mean on one rank; its mean over ranks (and calls) is. Communicates nothing.

    Example::

        def loss_fn(model, batch):
            n = td.data.count_tokens(batch["labels"], topo)
            logits = model(batch["input_ids"]).logits
            return td.data.token_mean_loss(logits, batch["labels"], n, topo=topo)
    """
    if mean_over is None:
        mean_over = topo.size("dp") if topo is not None else 1
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        reduction="sum",
    )
    count = torch.as_tensor(num_tokens, device=total.device).clamp_min(1)
    return total * mean_over / count


def with_window_tokens(
    batches: Iterable[dict[str, Any]],
    topo: Topology,
    k: int,
    *,
    ignore_index: int = -100,
    shift: bool = True,
) -> Iterator[dict[str, Any]]:
    """Each batch dict with ``"num_tokens"``: the real targets of its ``k``-batch window, all ranks.

    For ``accumulate(k)`` across calls: reads ``k`` batches ahead, counts their ``"labels"``
    (``count_tokens``) and yields them one by one. A last, shorter window is counted as it is.
    The loader's position then runs up to ``k - 1`` batches ahead of the step: checkpoint at
    window ends. Communicates: one ``all_reduce`` per window (over ``"dp"``).

    Example::

        for batch in with_window_tokens(loader, topo, k):
            state, metrics = step(state, batch)
        # loss_fn: token_mean_loss(logits, labels, batch["num_tokens"], mean_over=dp * k)
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"with_window_tokens: k must be an int >= 1, got {k!r}.")
    it = iter(batches)
    while True:
        window = [b for _, b in zip(range(k), it)]
        if not window:
            return
        n = count_tokens(
            [b["labels"] for b in window], topo, ignore_index=ignore_index, shift=shift
        )
        for batch in window:
            yield {**batch, "num_tokens": n}
