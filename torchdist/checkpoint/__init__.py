"""Checkpoints: a whole training state through DCP, and weights as safetensors.

* ``save(path, state, topo, *, loader=None, keep=None)`` / ``load(path, state, topo, *,
  loader=None)``: model and optimizer through ``torch.distributed.checkpoint`` (each rank writes
  its shards; loads at another world size or mesh reshard), plus step, every rank's RNG states,
  scheduler, loss scale, ``TrainState.extra`` and the loader's position. Atomic: a checkpoint
  directory appears only once complete. See ``torchdist.checkpoint._dcp``.
* ``export_safetensors(model, path, topo)`` / ``load_safetensors(model, path, topo)``:
  consolidated full weights in the Hugging Face layout, written one parameter at a time; loads
  read only each rank's slices. See ``torchdist.checkpoint._safetensors``.

Every error is a ``CheckpointError`` that names what was found, what was expected and the fix.
Nothing is ever unpickled freely: see ``torchdist.checkpoint._safe`` for what DCP's metadata
means for checkpoints from untrusted sources.

Example::

    from torchdist import checkpoint

    checkpoint.save("ckpt", state, topo, loader=loader, keep=3)
    state = checkpoint.load("ckpt", state, topo, loader=loader)     # the newest complete step
"""

from torchdist.checkpoint._dcp import load, save
from torchdist.checkpoint._layout import FORMAT_VERSION, MARKER
from torchdist.checkpoint._safetensors import export_safetensors
from torchdist.checkpoint._safetensors_load import SafetensorsLoad, load_safetensors

__all__ = [
    "save",
    "load",
    "export_safetensors",
    "load_safetensors",
    "SafetensorsLoad",
    "FORMAT_VERSION",
    "MARKER",
]
