"""Big-model inference: build on meta, plan a device map, load straight into it, offload the rest.

* ``init_empty(build_fn)``: any model, Hugging Face models included, with parameters on meta.
* ``infer_device_map(model, max_memory={"cuda:0": "20GiB", "cpu": "8GiB", "disk": "1TiB"})``:
  a frozen, printable ``DeviceMap`` (module name -> device) that keeps blocks whole.
* ``load_and_dispatch(model, checkpoint_dir, device_map="auto", offload_dir=...)``: reads
  safetensors into the map; CPU- and disk-mapped units are moved in by hooks just before their
  forward and released after.

Communicates nothing across processes. Example::

    from torchdist.inference import init_empty, load_and_dispatch

    model = init_empty(lambda: GPT(dim=4096, layers=48))
    model = load_and_dispatch(model, "export/", max_memory={"cpu": "4GiB", "disk": "200GiB"})
    logits = model(tokens)
"""

from torchdist.inference._device_map import DeviceMap, infer_device_map, parse_size
from torchdist.inference._dispatch import Dispatched, dispatched, load_and_dispatch
from torchdist.inference._meta import init_empty

__all__ = [
    "init_empty",
    "infer_device_map",
    "DeviceMap",
    "parse_size",
    "load_and_dispatch",
    "Dispatched",
    "dispatched",
]
