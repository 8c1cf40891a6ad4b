"""The Hugging Face safetensors layout on disk: its two file names, and which weight files a
directory lists. Shared by ``checkpoint`` (export / load) and ``inference`` (dispatch), which must
not import each other (the checkpoint package imports DCP). Communicates nothing."""

from __future__ import annotations

import json
import os

from torchdist.errors import CheckpointError

__all__ = ["SINGLE", "INDEX", "listed_files"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def listed_files(root: str) -> list[str] | None:
    """The weight files of directory ``root``, sorted: those its ``model.safetensors.index.json``
    maps to, or ``["model.safetensors"]``; None when it has neither. A corrupted index is a
    ``CheckpointError``.

    Example::

        listed_files("out/")      # ['model-00001-of-00002.safetensors', ...]
    """
    index = os.path.join(root, INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{root}/{INDEX} is unreadable or corrupted: {exc!r}.") from None
    if os.path.isfile(os.path.join(root, SINGLE)):
        return [SINGLE]
    return None
