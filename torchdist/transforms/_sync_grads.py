"""`sync_grads(topo)`: data-parallel gradient averaging for a plain model, the way DDP does it.

Parameters are grouped into buckets of about ``bucket_mb`` MB (in reverse registration order,
which approximates the order the backward produces gradients, as DDP's first bucketing does).
A post-accumulate-grad hook on every parameter marks it ready; when a bucket is complete its
gradients are packed into one flat buffer, pre-divided by the group size and all-reduced
**asynchronously**, so communication overlaps the rest of the backward. Buckets launch strictly
in order (every rank issues the same collectives in the same order, even when a parameter got no
gradient on some rank: it contributes zeros at the end of the backward). Before the step returns
every bucket is waited on and each ``param.grad`` becomes a view of its bucket (no copy back).

On a model that already averages its gradients (``shard``, ``replicate``, DDP, FSDP2, a
DeepSpeed engine) or a single data-parallel rank, ``sync_grads`` steps aside: it logs why once
and records it in its state, ``state.transforms["sync_grads"].steps_aside``, when the step is
bound to the state (``step.init``). It never averages twice.

Hooks are registered on the model's parameters by ``init`` and act only inside this step
function (and not on micro-steps that ``accumulate`` pauses). Tensor-parallel parameters
(DTensors on a mesh without the data-parallel axes) are averaged through their local tensors.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from torchdist._axes import check_axes_used
from torchdist._compat import foreach_copy_
from torchdist.collectives import Axis, resolve_group
from torchdist.errors import CompositionError, ConfigError
from torchdist.marks import data_parallel_owner
from torchdist.state import TrainState
from torchdist.topology import Topology
from torchdist.transforms._composition import Context, Layer, Phase, StepTransform

__all__ = ["sync_grads", "GradSync", "SyncGradsState"]

log = logging.getLogger("torchdist.transforms")


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    is_dtensor: list[bool]
    numel: int
    dtype: torch.dtype
    device: torch.device
    buffer: torch.Tensor = field(init=False)
    views: list[torch.Tensor] = field(init=False)  # each parameter's slice, shaped like it
    ready: set[int] = field(default_factory=set)
    work: Any = None

    def allocate(self, local_shapes: list[torch.Size]) -> None:
        self.buffer = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self.views, offset = [], 0
        for shape in local_shapes:
            numel = shape.numel()
            self.views.append(self.buffer[offset : offset + numel].view(shape))
            offset += numel


class GradSync:
    """Bucketed, overlapped gradient averaging of one model over one process group.

    The hooks it registers hold it only weakly; when it is garbage (no ``TrainState`` holds it
    any more) they are removed, so rebuilding a step over the same model does not pile up hooks.
    """

    def __init__(
        self, model: torch.nn.Module, group: Any, bucket_bytes: int, first_bucket_bytes: int
    ) -> None:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        self.group = group
        self.model = weakref.ref(model)  # to refuse a TrainState whose model was swapped
        self.size = dist.get_world_size(group)
        params = [p for p in model.parameters() if p.requires_grad]
        locals_ = {id(p): p.to_local() if isinstance(p, DTensor) else p for p in params}
        self.buckets = _bucket(list(reversed(params)), locals_, bucket_bytes, first_bucket_bytes)
        self._where = {id(p): (b, i) for b, bucket in enumerate(self.buckets)
                       for i, p in enumerate(bucket.params)}  # fmt: skip
        self._active = False
        self._paused = False
        self.was_paused = False
        self._next = 0
        # Inside td.join(state): a callable that tells torch's Join this rank still trains (one
        # all-reduce before the step's first bucket), and whether to average over active ranks.
        self.join_notify: Any = None
        self.divide_by_active = False
        self._join_work: Any = None
        me = weakref.ref(self)

        def on_grad(param: torch.Tensor) -> None:
            sync = me()
            if sync is not None:
                sync._on_grad(param)

        handles = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
        weakref.finalize(self, _remove_all, handles)

    # ------------------------------------------------------------------ lifecycle of one step
    def begin(self) -> None:
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.work = None
        self._next = 0
        self._active = True
        self.was_paused = False
        self._join_work = None

    def finish(self) -> None:
        """Launch what the backward did not, wait for everything, install the averaged grads."""
        try:
            while self._next < len(self.buckets):
                self._launch(self.buckets[self._next])
                self._next += 1
            scale = None
            if self._join_work:  # inside td.join: how many ranks still train this step
                self._join_work.wait()
                if self.divide_by_active:
                    scale = self.size / self._join_work.result()[0].item()
            for bucket in self.buckets:
                bucket.work.wait()
                if scale is not None and scale != 1.0:
                    bucket.buffer.mul_(scale)
                self._install(bucket)
        finally:
            self._active = False

    # ------------------------------------------------------------------ uneven inputs (join)
    def shadow(self) -> None:
        """On a rank that ran out of batches: the all-reduces of one step of the others, with
        zeros, bucket by bucket, in their order (torch ``Join``'s main hook)."""
        import torch.distributed as dist

        for bucket in self.buckets:
            bucket.buffer.zero_()
            dist.all_reduce(bucket.buffer, group=self.group)

    def sync_parameters_from_last_joiner(self, is_last_joiner: bool) -> None:
        """After a join: every rank takes the parameters of a rank that trained to the end."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        me = torch.tensor(dist.get_rank() if is_last_joiner else -1, dtype=torch.int64,
                          device=self.buckets[0].device if self.buckets else "cpu")  # fmt: skip
        dist.all_reduce(me, op=dist.ReduceOp.MAX, group=self.group)
        model = self.model()
        if model is None:
            return
        with torch.no_grad():
            for param in model.parameters():
                local = param.to_local() if isinstance(param, DTensor) else param
                dist.broadcast(local.data, src=int(me.item()), group=self.group)

    def abort(self) -> None:
        self._active = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No communication from the hooks in the body (an accumulation micro-step)."""
        self._paused = True
        self.was_paused = True
        try:
            yield
        finally:
            self._paused = False

    # ------------------------------------------------------------------ internals
    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._active or self._paused:
            return
        b, i = self._where[id(param)]
        self.buckets[b].ready.add(i)
        while self._next < len(self.buckets):
            head = self.buckets[self._next]
            if len(head.ready) != len(head.params):
                break
            self._launch(head)
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        import torch.distributed as dist

        if self.join_notify is not None and self._join_work is None:
            self._join_work = self.join_notify() or False  # before the step's first bucket

        sources, targets = [], []
        with torch.no_grad():
            for param, is_dtensor, view in zip(bucket.params, bucket.is_dtensor, bucket.views):
                grad = param.grad
                if grad is None:
                    view.zero_()
                    continue
                grad = grad.to_local() if is_dtensor else grad
                if grad.data_ptr() != view.data_ptr():  # not already installed as the view
                    sources.append(grad)
                    targets.append(view)
            if sources:
                foreach_copy_(targets, sources)
            bucket.buffer.div_(self.size)
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def _install(self, bucket: _Bucket) -> None:
        with torch.no_grad():
            for param, is_dtensor, view in zip(bucket.params, bucket.is_dtensor, bucket.views):
                if not is_dtensor:
                    param.grad = view  # the gradient is the bucket's slice: no copy back
                    continue
                if param.grad is None:  # tensor-parallel: average the local shard
                    param.grad = torch.zeros_like(param)
                param.grad.to_local().copy_(view)


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


def _bucket(
    params: list[torch.nn.Parameter],
    locals_: dict[int, torch.Tensor],
    bucket_bytes: int,
    first_bucket_bytes: int,
) -> list[_Bucket]:
    """Greedy buckets in backward order; the first is small so communication starts early."""
    from torch.distributed.tensor import DTensor

    buckets: list[_Bucket] = []
    open_buckets: dict[tuple, _Bucket] = {}
    shapes: dict[int, list[torch.Size]] = {}
    for param in params:
        local = locals_[id(param)]
        key = (local.dtype, local.device)
        bucket = open_buckets.get(key)
        cap = first_bucket_bytes if bucket is not None and bucket is buckets[0] else bucket_bytes
        if bucket is None or (bucket.numel and (bucket.numel + local.numel()) *
                              local.element_size() > cap):  # fmt: skip
            bucket = _Bucket([], [], 0, local.dtype, local.device)
            buckets.append(bucket)
            open_buckets[key] = bucket
            shapes[id(bucket)] = []
        bucket.params.append(param)
        bucket.is_dtensor.append(isinstance(param, DTensor))
        bucket.numel += local.numel()
        shapes[id(bucket)].append(local.shape)
    for bucket in buckets:
        bucket.allocate(shapes[id(bucket)])
    return buckets


@dataclass(frozen=True)
class SyncGradsState:
    """What ``sync_grads`` decided for a model: the axis, why it steps aside (or None), and the
    bucketed engine that averages when it does not. Nothing here is checkpointed: it is derived
    from the model and the topology again on resume."""

    axis: Axis
    steps_aside: str | None
    buckets: int = 0
    engine: GradSync | None = field(default=None, repr=False, compare=False)

    def report(self) -> dict[str, Any]:
        return {"steps_aside": self.steps_aside} if self.steps_aside else {"buckets": self.buckets}


def sync_grads(
    topo: Topology, *, bucket_mb: float = 25.0, first_bucket_mb: float = 1.0, axis: Axis = "dp"
) -> StepTransform:
    """Average gradients over the data-parallel ranks of ``topo`` (see the module docstring).

    Communicates: one asynchronous ``all_reduce`` per bucket over the ``axis`` group (default
    ``"dp"`` = ``dp_replicate x dp_shard``), launched from gradient hooks during the backward,
    in the gradients' dtype; all waited on before the step returns. The first bucket (the last
    layers' gradients, ready first) holds at most ``first_bucket_mb``, as DDP's does, so the
    first all-reduce starts early in the backward. Its decision for a model (``steps_aside``,
    ``buckets``) is ``state.transforms["sync_grads"]`` once ``step.init(state)`` ran.

    Example::

        step = compose(optimize(opt), clip_grads(1.0), sync_grads(topo))(value_and_grad(loss_fn))
        state = step.init(td.TrainState(model, opt))
        state.transforms["sync_grads"].steps_aside      # None, or why it does nothing
    """
    if not bucket_mb > 0 or not first_bucket_mb > 0:
        raise ConfigError(
            f"bucket_mb and first_bucket_mb must be positive, got {bucket_mb} and "
            f"{first_bucket_mb}."
        )
    bucket_bytes = int(bucket_mb * 2**20)
    first_bucket_bytes = min(int(first_bucket_mb * 2**20), bucket_bytes)

    def init(state: TrainState) -> SyncGradsState:
        if axis == "dp":  # a tp/pp/cp axis > 1 that nothing uses: ranks would repeat work
            # The step transforms inside it (bound first) count: context_parallel uses cp.
            inner = ("sync_grads", *state.transforms)
            check_axes_used(topo, state.model, what="sync_grads(topo)", uses=inner)
        reason = data_parallel_owner(state.model)
        if reason is None and topo.size(axis) == 1:
            reason = f"the {axis!r} axis has one rank: there is nothing to average"
        if reason is not None:
            log.info("sync_grads steps aside: %s.", reason)
            return SyncGradsState(axis, reason)
        group = resolve_group(topo, axis)
        engine = GradSync(state.model, group, bucket_bytes, first_bucket_bytes)
        return SyncGradsState(axis, None, len(engine.buckets), engine)

    def wrap(inner: Layer, inner_names: tuple[str, ...]) -> Layer:
        def layer(state: TrainState, batch: Any, ctx: Context):
            sync = state.transforms["sync_grads"].engine
            if sync is None:
                return inner(state, batch, ctx)
            if sync.model() is not state.model:
                raise CompositionError(
                    "TrainState.model is not the model this step's sync_grads was bound to "
                    "(its gradient hooks are on the other one). After replacing the model, "
                    "bind again: step.init(state.replace(transforms={}))."
                )
            sync.begin()
            try:
                state, metrics, outcome = inner(state, batch, ctx.replace(grad_sync=sync))
                if sync.was_paused:  # an accumulation micro-step: nothing was launched
                    sync.abort()
                else:
                    sync.finish()
            except BaseException:
                sync.abort()
                raise
            return state, metrics, outcome

        return layer

    info = {"axis": axis, "bucket_mb": bucket_mb, "first_bucket_mb": first_bucket_mb}
    return StepTransform("sync_grads", Phase.SYNC, wrap, init, info=info)
