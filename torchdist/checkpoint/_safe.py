"""Reading DCP checkpoints without unpickling arbitrary objects.

A DCP checkpoint holds two kinds of pickled data:

* ``.metadata``, written by rank 0 with ``pickle.dump``: the index of every tensor (its global
  shape, dtype, and where each chunk lives in which file). ``FileSystemReader.read_metadata``
  reads it with a plain ``pickle.load``, which runs whatever a crafted file asks for. We read it
  with an ``Unpickler`` that resolves only the classes DCP's metadata is made of (the dataclasses
  of ``torch.distributed.checkpoint.metadata``, ``_StorageInfo``, ``torch.Size``, dtypes,
  ``pathlib`` paths) and refuses anything else.
* non-tensor values (the optimizer's hyperparameters), which ``DefaultLoadPlanner`` loads with
  ``torch.load(weights_only=False)``. Ours loads them with ``weights_only=True``. Tensors are
  already read with ``weights_only=True`` by DCP itself.

This closes the code-execution path, not every risk: a crafted ``.metadata`` can still describe
huge shapes (memory exhaustion) or point reads at the wrong bytes (garbage weights, or a read
error). Load checkpoints you or your pipeline wrote; for anything else, verify a checksum of the
directory against its publisher's before loading.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, Metadata

from torchdist._compat import dcp_metadata_path
from torchdist.errors import CheckpointError

__all__ = ["SafeFileSystemReader", "SafeLoadPlanner", "read_metadata"]

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _METADATA_MODULE and not name.startswith("__"):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the checkpoint metadata asks for {module}.{name}, which is not part of DCP's "
            "metadata; refusing to unpickle it"
        )


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` resolves only DCP metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = dcp_metadata_path(self, kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(
                f"the metadata file holds a {type(metadata).__name__}, not a DCP Metadata"
            )
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` loading non-tensor values with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:  # noqa: ANN001 - DCP's signature
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            _set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _set_element(root: Any, path: tuple, value: Any) -> None:
    """``root[p0][p1]...[pn] = value`` along a DCP object path (dict keys and list indices).

    Our own copy of DCP's private ``_traverse.set_element``: the containers already exist here,
    since a load fills the state dict the model and optimizer produced.
    """
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


def read_metadata(path: str) -> Metadata:
    """The DCP metadata of checkpoint directory ``path``, read safely (``CheckpointError``)."""
    try:
        return SafeFileSystemReader(path).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} has no DCP metadata file (.metadata); it is incomplete. Load an "
            "earlier checkpoint."
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupted file
        raise CheckpointError(
            f"the DCP metadata of checkpoint {path} (.metadata) is corrupted or not DCP "
            f"metadata: {type(exc).__name__}: {exc}. Load an earlier checkpoint, or copy this one "
            "again from its source."
        ) from None
