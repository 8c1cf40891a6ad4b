"""`context_parallel(topo)`: shard each sequence over the cp ranks; ring attention on SDPA.

Every cp rank receives the same batch (cp ranks share a data-parallel coordinate). Inside the
step each rank keeps its part of every sequence: torch's
``torch.distributed.tensor.experimental.context_parallel`` cuts the sequence dimension into
``2 x cp`` chunks and gives rank ``r`` chunks ``r`` and ``2 cp - 1 - r`` (its head-tail load
balancing, so causal attention costs every rank the same), and, for the forward and backward
inside it, replaces ``F.scaled_dot_product_attention`` with ring attention over the cp mesh
(keys and values pass around the ring).

* **Positions**: a rank's tokens are not ``0..T/cp - 1``, so the transform hands the inner step
  their global positions, sharded the same way: a dict batch gets ``"position_ids"`` (Hugging
  Face's name), a tuple/list batch gets them appended (``(x, y) -> (x, y, positions)``). A model
  must use them (``model(x, positions)``) instead of ``arange(x.shape[1])``.
* **Loss**: ``loss_fn`` sees this rank's tokens, so its mean is over them; with equal shares
  the whole sequence's loss is the mean over the cp ranks, and that is what is reported. The
  gradients are averaged over the cp mesh after the inner backward, so every cp rank holds the
  gradient of the whole sequence's loss (local shards of DTensor gradients are averaged as
  they are: cp peers shard alike).

**CPU**: torch 2.13 cannot run ring attention on CPU. On CPU, SDPA dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``; torch's CP dispatcher
(``_context_parallel/_attention.py``: ``_sdpa_handler`` and its ``custom_ops``) handles only the
CUDA kernels ``_scaled_dot_product_flash_attention``, ``_efficient_attention`` and
``_cudnn_attention``, and DTensor has no sharding strategy for the CPU kernel, so it raises
``NotImplementedError: Operator aten._scaled_dot_product_flash_attention_for_cpu.default does not
have a sharding strategy registered``. The transform turns that into a ``StepError`` saying so.
Everything else (sharding, positions, loss and gradient averaging) runs on CPU for models
without attention; the attention numerics are tested on GPUs (tests/test_pipeline_cp.py).

torch's ``context_parallel`` patches ``F.scaled_dot_product_attention`` for the whole process,
so context-parallel ranks must be processes (``spawn``, ``torchdist launch``), not the threads
of ``in_process``, once attention runs.

Communicates: inside the forward and backward, ring attention's all-to-alls / all-gathers of
keys and values over the cp mesh (torch's); after the backward one all-reduce (sum, then
divided) per gradient and one of the loss, over the cp mesh. Nothing when cp is 1.

Example::

    step = compose(optimize(opt), clip_grads(1.0), context_parallel(topo))(
        value_and_grad(lambda model, b: F.cross_entropy(
            model(b[0], b[2]).flatten(0, 1), b[1].flatten())))    # b[2]: the positions
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from torchdist._compat import foreach_copy_
from torchdist.errors import ConfigError, StepError, TopologyError
from torchdist.state import TrainState
from torchdist.topology import Topology
from torchdist.transforms._composition import Context, Layer, Phase, StepTransform

__all__ = ["context_parallel", "shard_sequences"]

_CPU_REASON = (
    "torch 2.13 has no ring attention on CPU: SDPA runs "
    "aten._scaled_dot_product_flash_attention_for_cpu there, which torch's context-parallel "
    "dispatcher (torch/distributed/tensor/experimental/_context_parallel/_attention.py, "
    "_sdpa_handler) does not handle and DTensor has no sharding strategy for. Run context "
    "parallelism on CUDA devices, or with cp=1 on CPU."
)


def _sequence_leaves(batch: Any, seq_dim: int) -> tuple[list[int], int]:
    """Indices (in the flattened batch) of the tensors cut along ``seq_dim``, and its length:
    every tensor with that dimension whose length is the first such tensor's."""
    import optree

    leaves = optree.tree_leaves(batch, none_is_leaf=False)
    length, chosen = None, []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > seq_dim:
            if length is None:
                length = leaf.shape[seq_dim]
            if leaf.shape[seq_dim] == length:
                chosen.append(i)
    if length is None:
        raise StepError(
            f"context_parallel: the batch holds no tensor with a sequence dimension {seq_dim}; "
            "pass seq_dim= the dimension of the tokens."
        )
    return chosen, length


@contextlib.contextmanager
def shard_sequences(batch: Any, mesh: Any, *, seq_dim: int = 1) -> Iterator[Any]:
    """Inside: this rank's share of every sequence in ``batch`` plus the global positions of its
    tokens, with torch's ``context_parallel`` (ring-attention SDPA over ``mesh``) entered.

    Checks that the sequence length divides into ``2 x cp`` chunks (``StepError`` otherwise).
    Communicates nothing itself (every rank holds the whole batch and keeps a slice).
    """
    import optree
    from torch.distributed.tensor.experimental import context_parallel as torch_cp

    cp = mesh.size()
    chosen, length = _sequence_leaves(batch, seq_dim)
    if length % (2 * cp):
        raise StepError(
            f"context_parallel: a sequence of {length} tokens cannot be cut into 2 x cp = "
            f"{2 * cp} equal chunks (torch's load balancing gives each cp rank a head and a "
            f"tail chunk); use a sequence length that is a multiple of {2 * cp}."
        )
    leaves, treedef = optree.tree_flatten(batch, none_is_leaf=False)
    first = leaves[chosen[0]]
    positions = torch.arange(length, device=first.device).expand(*first.shape[:seq_dim], length)
    buffers = [leaves[i].clone() for i in chosen] + [positions.clone()]
    with torch_cp(mesh, buffers=buffers, buffer_seq_dims=[seq_dim] * len(buffers),
                  no_restore_buffers=set(buffers)):  # fmt: skip
        for i, buffer in zip(chosen, buffers, strict=False):
            leaves[i] = buffer
        local = optree.tree_unflatten(treedef, leaves)
        if isinstance(local, dict):
            local = {**local, "position_ids": buffers[-1]}
        elif isinstance(local, (tuple, list)):
            local = type(local)([*local, buffers[-1]])
        else:
            local = (local, buffers[-1])
        yield local


def _average_grads(model: torch.nn.Module, group: Any, size: int) -> None:
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in local:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():  # one flat all-reduce per dtype
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        parts = flat.split([g.numel() for g in same])
        foreach_copy_(same, [v.view_as(g) for v, g in zip(parts, same, strict=True)])


def context_parallel(topo: Topology, *, seq_dim: int = 1) -> StepTransform:
    """Shard the batch's sequences over ``topo``'s cp axis and run SDPA as ring attention.

    See the module docstring for positions, the loss and what runs on CPU. ``seq_dim``: the
    sequence dimension of the batch's token tensors (1 for ``(batch, seq)``). A no-op when cp is 1.

    Communicates: ring attention over the cp mesh in forward and backward; one all-reduce
    (sum) per gradient dtype and one of the loss over the cp mesh after the backward.

    Example::

        step = compose(optimize(opt), context_parallel(topo))(value_and_grad(loss_fn))
    """
    if not isinstance(seq_dim, int) or seq_dim < 0:
        raise ConfigError(f"context_parallel(seq_dim=) needs an int >= 0, got {seq_dim!r}.")

    def wrap(inner: Layer, inner_names: tuple[str, ...]) -> Layer:
        def layer(state: TrainState, batch: Any, ctx: Context):
            if topo.cp == 1:
                return inner(state, batch, ctx)
            if not topo.is_live:
                raise TopologyError(
                    "context_parallel needs the live topology (`with td.distributed(topo) as "
                    "topo:`) to reach its cp mesh."
                )
            import torch.distributed as dist

            mesh = topo.submesh("cp")
            try:
                with shard_sequences(batch, mesh, seq_dim=seq_dim) as local:
                    state, metrics, outcome = inner(state, local, ctx)
            except NotImplementedError as exc:
                if "_for_cpu" in str(exc):
                    raise StepError(f"context_parallel: {_CPU_REASON} ({exc})") from exc
                raise
            group, size = mesh.get_group(), mesh.size()
            _average_grads(state.model, group, size)
            loss = metrics["loss"].detach().clone().float()
            dist.all_reduce(loss, group=group)
            return state, {**metrics, "loss": loss / size}, outcome

        return layer

    return StepTransform("context_parallel", Phase.FORWARD, wrap, info={"seq_dim": seq_dim})
