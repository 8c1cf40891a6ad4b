"""Non-persistent buffers across ``materialize``: keep them, or re-initialise them, or fail.

``to_empty`` gives every tensor fresh, uninitialised storage, and a non-persistent buffer (HF's
rotary ``inv_freq``, a causal mask) is in no state dict, so loading weights never fixes it: the
model runs on garbage and nothing says so. ``materialize`` therefore, for each such buffer:

1. copies the value the caller passed (``buffers=``, e.g. from a model built off the meta device);
2. else restores the value it had before ``to_empty`` when it was already real (not meta);
3. else runs the owning module's own initialiser: ``reset_buffers()``, else ``reset_parameters()``
   (torch's convention), else the ``_init_weights(module)`` of the Hugging Face model that
   contains it (transformers 5.x recomputes rotary frequencies there);
4. and checks the result: a floating buffer is filled with NaN before step 3, so one that no
   initialiser wrote is found and named in a ``ShardingError``; an integer or bool buffer whose
   module has no initialiser is an error too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn

from torchdist.errors import ShardingError

__all__ = ["snapshot_non_persistent", "restore_non_persistent"]


def _non_persistent(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    for prefix, module in model.named_modules():
        for local in sorted(module._non_persistent_buffers_set):
            if module._buffers.get(local) is not None:
                yield (f"{prefix}.{local}" if prefix else local), module, local


def snapshot_non_persistent(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the non-persistent buffers that already hold values (not on the meta device)."""
    return {
        name: module._buffers[local].detach().clone()
        for name, module, local in _non_persistent(model)
        if not module._buffers[local].is_meta
    }


def _hf_root(model: nn.Module):
    for module in model.modules():
        if callable(getattr(module, "_init_weights", None)) and hasattr(module, "config"):
            return module
    return None


def _initialisers(model: nn.Module, owner: nn.Module) -> list[tuple[str, object]]:
    found = [
        (f"{type(owner).__name__}.{hook}()", getattr(owner, hook))
        for hook in ("reset_buffers", "reset_parameters")
        if callable(getattr(owner, hook, None))
    ]
    root = _hf_root(model)
    if root is not None:
        found.append((f"{type(root).__name__}._init_weights", lambda: root._init_weights(owner)))
    return found


def _unset(module: nn.Module, local: str) -> bool:
    buf = module._buffers.get(local)
    if buf is None:
        return True
    return (buf.is_floating_point() or buf.is_complex()) and bool(torch.isnan(buf).any())


@torch.no_grad()
def restore_non_persistent(
    model: nn.Module,
    saved: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Give every non-persistent buffer of ``model`` (just ``to_empty``-ed) a real value."""
    given = dict(given or {})
    entries = list(_non_persistent(model))
    unknown = sorted(set(given) - {name for name, _, _ in entries})
    if unknown:
        raise ShardingError(
            f"materialize: buffers= names {unknown}, which are not non-persistent buffers of "
            f"{type(model).__name__}; expected some of {[n for n, _, _ in entries][:8]}. Pass "
            "values only for buffers missing from the state dict (persistent=False)."
        )
    pending: dict[int, tuple[nn.Module, list[tuple[str, str]]]] = {}
    for name, module, local in entries:
        value = given.get(name, saved.get(name))
        buf = module._buffers[local]
        if value is not None:
            buf.copy_(value.to(device=buf.device, dtype=buf.dtype))
            continue
        if buf.is_floating_point() or buf.is_complex():
            buf.fill_(float("nan"))
        pending.setdefault(id(module), (module, []))[1].append((name, local))
    failed: list[str] = []
    for module, names in pending.values():
        initialisers = _initialisers(model, module)
        for label, init in initialisers:
            try:
                init()
            except Exception as exc:  # noqa: BLE001 - reported with the buffer it was for
                raise ShardingError(
                    f"materialize: {label} failed while re-initialising the non-persistent "
                    f"buffers {[n for n, _ in names]}: {exc}. Pass their values with "
                    "materialize(..., buffers={name: tensor}) (e.g. from a model built on CPU)."
                ) from exc
            if not any(_unset(module, local) for _, local in names):
                break
        for name, local in names:
            if not initialisers or _unset(module, local):
                failed.append(f"{name} ({type(module).__name__})")
    if failed:
        raise ShardingError(
            f"materialize: non-persistent buffers {failed} are in no state dict and nothing "
            "re-initialised them after to_empty (no buffers= value, no real value before, and "
            "their module's reset_buffers()/reset_parameters()/HF _init_weights did not set "
            "them); the model would run on uninitialised memory. Pass "
            "materialize(..., buffers={name: tensor}) with values from a model built off the "
            "meta device, or give the module a reset_buffers() that recomputes them."
        )
