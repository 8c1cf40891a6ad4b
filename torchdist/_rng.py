"""Random-number state, in one place: seed, capture, restore, sync across ranks.

``capture(topo)`` returns this process's generator states as plain data (tensors, ints, strings,
lists and dicts: what ``torch.load(weights_only=True)`` accepts), one encoding used both by
checkpoints and by ``sync_rng``'s broadcast. Generators covered: torch's CPU generator, the CUDA
generator of ``topo.device`` when it is a GPU, Python's ``random``, NumPy's global generator
when NumPy is installed, and an explicit ``torch.Generator`` when given.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from torchdist.collectives import Axis, broadcast
from torchdist.errors import TopologyError
from torchdist.topology import Topology

__all__ = ["set_seed", "sync_rng", "capture", "restore"]


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def capture(topo: Topology, generator: torch.Generator | None = None) -> dict[str, Any]:
    """This process's RNG states, as data. Communicates nothing."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    version, internal, gauss = random.getstate()
    rng["python"] = {"version": version, "state": list(internal), "gauss_next": gauss}
    if topo.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(topo.device)
    if generator is not None:
        rng["generator"] = generator.get_state()
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return rng


def restore(rng: dict[str, Any], topo: Topology, generator: torch.Generator | None = None) -> None:
    """Set this process's RNGs to ``rng`` (as ``capture`` made it). Communicates nothing."""
    # set_*_state need tensors that own their storage from offset 0
    own = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rng.items()}
    torch.set_rng_state(own["torch"])
    py = own["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in own and topo.device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"], topo.device)
    if generator is not None and "generator" in own:
        generator.set_state(own["generator"])
    np = _numpy()
    if np is not None and "numpy" in own:
        state = own["numpy"]
        np.random.set_state(
            (
                state["kind"],
                state["keys"].numpy().astype(np.uint32),
                state["pos"],
                state["has_gauss"],
                state["cached_gaussian"],
            )
        )


def set_seed(seed: int, topo: Topology | None = None, *, per_rank: bool = False) -> int:
    """Seed Python's ``random``, NumPy (when installed) and torch (CPU and every CUDA device).

    ``per_rank=True`` seeds rank ``r`` with ``seed + r`` (distinct dropout masks, distinct data
    augmentation); otherwise every rank gets ``seed``. Returns the seed used on this rank.
    Communicates nothing.

    Example::

        td.set_seed(0, topo, per_rank=True)
    """
    if per_rank:
        if topo is None:
            raise TopologyError("set_seed(per_rank=True) needs the topology to know the rank.")
        seed += topo.rank
    random.seed(seed)
    np = _numpy()
    if np is not None:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def sync_rng(
    topo: Topology, *, src: int = 0, generator: torch.Generator | None = None, axis: Axis = None
) -> None:
    """Copy rank ``src``'s random state to every rank of ``topo`` (or of its ``axis`` groups).

    Communicates: one ``broadcast`` of ``capture``'s data from ``src`` over ``axis``.

    Example::

        td.sync_rng(topo)            # every rank now draws the same dropout masks
    """
    restore(broadcast(capture(topo, generator), topo, src=src, axis=axis), topo, generator)
