"""`Topology`: the immutable value every torchdist function receives instead of global state.

A topology says how many processes there are, which one this is, which device and backend it
uses, and how the world is laid out as a named device mesh. Mesh axes, outermost first::

    pp  x  dp_replicate  x  dp_shard  x  cp  x  tp

``tp`` is innermost so that tensor-parallel peers are neighbouring ranks (same host, fastest link),
as in torchtitan. Every axis is always present, size-1 axes included, so code can always ask for
``topo.mesh["tp"]``. ``-1`` on one axis fills whatever the others leave; if no axis says ``-1``,
``dp_shard`` fills the rest. The data-parallel axis ``"dp"`` is ``dp_replicate x dp_shard``
flattened; ranks that share a ``dp`` coordinate see the same data.

All arithmetic (sizes, a rank's coordinates, the ranks of a group) works with no process group,
so a plan can be checked on a laptop. ``torchdist.distributed(topo)`` turns a topology into a live
one that carries its ``DeviceMesh`` in ``topo.mesh``.

``Topology.from_env`` is the only place torchdist reads the environment. It understands torchrun
(``WORLD_SIZE``/``RANK``/``LOCAL_RANK``...), Open MPI (``OMPI_COMM_WORLD_*``), MPICH / Intel MPI
(``PMI_SIZE``/``PMI_RANK``), MVAPICH (``MV2_COMM_WORLD_*``) and SLURM ``srun``
(``SLURM_PROCID``...), so a launcher always yields the real world rather than N independent
single-process runs; contradicting or PMIx-only environments are refused (``docs/launchers.md``).

Example::

    >>> topo = Topology(world_size=8, rank=5, tp=2, dp_replicate=2)
    >>> topo.axes
    {'pp': 1, 'dp_replicate': 2, 'dp_shard': 2, 'cp': 1, 'tp': 2}
    >>> topo.coords()
    {'pp': 0, 'dp_replicate': 1, 'dp_shard': 0, 'cp': 0, 'tp': 1}
    >>> topo.group_ranks("tp")
    (4, 5)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from torchdist._launchers import read_launcher
from torchdist._topology_checks import check_backend, check_device, check_timeout
from torchdist.errors import TopologyError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["Topology", "AXES", "ALIASES", "parse_mesh"]

# Set on a DeviceMesh when the ``distributed`` block that made it ends (see Topology.is_live).
ENDED = "_torchdist_world_ended"

#: Mesh axes, outermost first.
AXES: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
#: Names that stand for several axes flattened into one.
ALIASES: dict[str, tuple[str, ...]] = {"dp": ("dp_replicate", "dp_shard")}


@dataclass(frozen=True)
class Topology:
    """How the processes of one job are laid out: world, this rank, device, backend, mesh axes.

    A frozen, hashable value: ``dataclasses.replace(topo, tp=2, dp_shard=-1)`` makes a variant and
    construction validates it. ``mesh`` is set only on the live topology that
    ``torchdist.distributed`` yields; it takes no part in equality or hashing.

    Communicates nothing; it is pure arithmetic until made live.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 0  # 0: same as world_size (one host)
    device: torch.device | str = "cpu"
    backend: str = ""  # "": gloo on CPU, nccl on CUDA
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int | None = None  # None: fills the rest unless another axis says -1
    cp: int = 1
    tp: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    agent_store: bool = False  # torchrun's agent already hosts the rendezvous store
    # seconds a rank waits for its peers (rendezvous, every collective) before it raises;
    # torch's own default is 30 min (docs/faults.md)
    timeout: float = field(default=600.0, compare=False)
    mesh: DeviceMesh | None = field(default=None, compare=False, repr=False)
    flattened: Mapping[str, DeviceMesh] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        for name in ("world_size", "rank", "local_rank", "local_world_size", "master_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TopologyError(
                    f"{name} must be an int, got {value!r} ({type(value).__name__})."
                )
        if self.world_size < 1:
            raise TopologyError(f"world_size must be at least 1, got {self.world_size}.")
        if not 0 <= self.rank < self.world_size:
            raise TopologyError(
                f"rank {self.rank} is out of range for world_size {self.world_size}; "
                f"expected 0 <= rank < {self.world_size}. Check RANK / WORLD_SIZE."
            )
        local_world = self.local_world_size or self.world_size
        if not 1 <= local_world <= self.world_size or self.world_size % local_world:
            raise TopologyError(
                f"local_world_size {local_world} does not divide world_size {self.world_size}; "
                "expected the same number of processes on every host."
            )
        if not 0 <= self.local_rank < local_world:
            raise TopologyError(
                f"local_rank {self.local_rank} is out of range for {local_world} processes per "
                "host."
            )
        object.__setattr__(self, "local_world_size", local_world)
        object.__setattr__(self, "timeout", check_timeout(self.timeout))
        object.__setattr__(self, "dp_shard", self._resolve_axes())
        device = check_device(self.device)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "backend", check_backend(self.backend, device))
        if self.mesh is not None and (
            tuple(self.mesh.mesh.shape) != self.mesh_shape or self.mesh.get_rank() != self.rank
        ):  # a variant made with dataclasses.replace: the old mesh does not describe it
            object.__setattr__(self, "mesh", None)
            object.__setattr__(self, "flattened", {})

    def _resolve_axes(self) -> int:
        sizes = {name: getattr(self, name) for name in AXES}
        for name, size in sizes.items():
            if size is None and name == "dp_shard":
                continue
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise TopologyError(
                    f"mesh axis {name}={size!r} is not a positive int or -1 (fill the rest)."
                )
        fill = [name for name, size in sizes.items() if size == -1]
        if len(fill) > 1:
            raise TopologyError(
                f"axes {fill} are all -1; only one axis can fill the rest of the world. "
                f"Give explicit sizes to all but one of them."
            )
        if sizes["dp_shard"] is None:
            sizes["dp_shard"] = 1 if fill else -1
            fill = fill or ["dp_shard"]
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if fill:
            if self.world_size % fixed:
                raise TopologyError(
                    f"world_size {self.world_size} is not divisible by the fixed axes "
                    f"{_fmt({k: v for k, v in sizes.items() if v != -1})} (product {fixed}), so "
                    f"{fill[0]}=-1 cannot fill the rest. Choose axis sizes whose product divides "
                    f"{self.world_size}."
                )
            sizes[fill[0]] = self.world_size // fixed
            for name in fill:
                if name != "dp_shard":
                    object.__setattr__(self, name, sizes[name])
        elif fixed != self.world_size:
            raise TopologyError(
                f"mesh axes {_fmt(sizes)} multiply to {fixed}, but world_size is "
                f"{self.world_size}. Make their product {self.world_size}, or set one axis to -1 "
                "to fill the rest."
            )
        return sizes["dp_shard"]

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Topology:
        """One process, one device: the topology of a plain single-process run."""
        return cls(world_size=1, rank=0, device=device)

    @classmethod
    def from_env(
        cls,
        *,
        device: torch.device | str | None = None,
        backend: str = "",
        env: Mapping[str, str] | None = None,
        **axes: int,
    ) -> Topology:
        """The topology a launcher describes in the environment; one process when none did.

        Reads torchrun's ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
        ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_USE_AGENT_STORE``, or Open MPI's
        ``OMPI_COMM_WORLD_*``, MPICH's ``PMI_SIZE``/``PMI_RANK``, MVAPICH's ``MV2_COMM_WORLD_*``
        or a SLURM ``srun`` task's ``SLURM_STEP_NUM_TASKS``/``SLURM_PROCID``; a stale
        ``WORLD_SIZE``/``RANK`` that contradicts them is a ``TopologyError``. ``device`` defaults to
        ``cuda:<local_rank>`` when CUDA is available, else the CPU. ``axes`` are mesh axis sizes
        (``dp_shard=-1, tp=2``). ``TORCHDIST_TIMEOUT`` (``torchdist launch --timeout``) sets
        ``timeout``. When no axes are given, ``TORCHDIST_MESH`` (set by
        ``torchdist launch --mesh dp_shard=2,tp=2``) supplies them. ``env`` replaces
        ``os.environ`` (for tests).

        Example::

            topo = Topology.from_env(dp_shard=-1, tp=2)   # under `torchdist launch -n 4 train.py`
        """
        unknown = sorted(set(axes) - set(AXES))
        if unknown:
            raise TopologyError(
                f"unknown mesh axis {unknown}; the axes are {list(AXES)}. "
                f"For the data-parallel axis use dp_shard (FSDP) or dp_replicate (DDP)."
            )
        env = os.environ if env is None else env
        if not axes and env.get("TORCHDIST_MESH"):
            axes = parse_mesh(env["TORCHDIST_MESH"])
        world, rank, local_rank, local_world = read_launcher(env)
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        timeout = env.get("TORCHDIST_TIMEOUT", "")
        port = env.get("MASTER_PORT", "29500")
        if not (port.isascii() and port.isdigit()):
            raise TopologyError(f"MASTER_PORT={port!r} is not a port number.")
        return cls(
            world_size=world,
            rank=rank,
            local_rank=local_rank,
            local_world_size=local_world,
            device=device,
            backend=backend,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(port),
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
            timeout=check_timeout(timeout, "TORCHDIST_TIMEOUT") if timeout else 600.0,
            **axes,
        )

    # ------------------------------------------------------------------ arithmetic
    @property
    def axes(self) -> dict[str, int]:
        """Axis sizes in mesh order, outermost first (size-1 axes included)."""
        return {name: getattr(self, name) for name in AXES}

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(self.axes.values())

    @property
    def dp_size(self) -> int:
        """Number of data-parallel groups of ranks: ``dp_replicate * dp_shard``."""
        return self.dp_replicate * self.dp_shard

    @property
    def is_live(self) -> bool:
        """True on the topology ``torchdist.distributed`` yields (it carries a ``DeviceMesh``),
        inside its block; False once the block has ended."""
        return self.mesh is not None and not getattr(self.mesh, ENDED, False)

    def check_not_ended(self) -> None:
        """Raise ``TopologyError`` if this is a live topology whose ``distributed`` block ended."""
        if self.mesh is not None and getattr(self.mesh, ENDED, False):
            raise TopologyError(
                f"this topology (rank {self.rank} of {self.world_size}) belongs to a "
                "`with td.distributed(topo) as topo:` block that has ended: its process groups "
                "are destroyed. Use it only inside that block (move the call into it), or open "
                "a new block for more communication."
            )

    def submesh(self, axis: str | Iterable[str]) -> DeviceMesh:
        """The live 1-D mesh of ``axis``: one axis (``"tp"``), an alias (``"dp"``) or a tuple of
        axes (flattened on first use, which is collective: every rank must ask)."""
        self.check_not_ended()
        if self.mesh is None:
            raise TopologyError(
                "this topology is not live: use the one `with td.distributed(topo) as topo:` "
                "yields to reach its mesh."
            )
        names = self._axis_names(axis)
        if len(names) == 1:
            return self.mesh[names[0]]
        key = axis if isinstance(axis, str) else "_".join(names)
        if key not in self.flattened:
            from torchdist._compat import flatten_mesh

            self.flattened[key] = flatten_mesh(self.mesh, names, key)  # type: ignore[index]
        return self.flattened[key]

    def size(self, axis: str | Iterable[str]) -> int:
        """Size of one axis, an alias (``"dp"``) or several axes flattened."""
        return math.prod(self.axes[name] for name in self._axis_names(axis))

    def coords(self, rank: int | None = None) -> dict[str, int]:
        """Coordinates of ``rank`` (default: this rank) along every axis, in mesh order."""
        rank = self._check_rank(rank)
        coords: dict[str, int] = {}
        for name in reversed(AXES):
            rank, coords[name] = divmod(rank, self.axes[name])
        return {name: coords[name] for name in AXES}

    def index(self, axis: str | Iterable[str], rank: int | None = None) -> int:
        """``rank``'s position within its group along ``axis`` (e.g. its data-parallel rank)."""
        names = self._axis_names(axis)
        coords = self.coords(rank)
        position = 0
        for name in names:
            position = position * self.axes[name] + coords[name]
        return position

    def dp_rank(self, rank: int | None = None) -> int:
        """Data-parallel index of ``rank``: which slice of each global batch it reads."""
        return self.index("dp", rank)

    def group_ranks(self, axis: str | Iterable[str], rank: int | None = None) -> tuple[int, ...]:
        """Global ranks of ``rank``'s group along ``axis``: same coordinates on every other axis.

        ``topo.group_ranks("dp")`` are the ranks that average gradients with this one;
        ``topo.group_ranks("tp")`` those that split its layers.
        """
        names = self._axis_names(axis)
        base = self.coords(rank)
        ranks = []
        for position in range(self.size(names)):
            coords = dict(base)
            for name in reversed(names):
                position, coords[name] = divmod(position, self.axes[name])
            ranks.append(self._rank_of(coords))
        return tuple(ranks)

    def all_groups(self, axis: str | Iterable[str]) -> tuple[tuple[int, ...], ...]:
        """Every group along ``axis``, each as its global ranks, ordered by lowest rank."""
        return tuple(sorted({self.group_ranks(axis, rank) for rank in range(self.world_size)}))

    def _rank_of(self, coords: Mapping[str, int]) -> int:
        rank = 0
        for name in AXES:
            rank = rank * self.axes[name] + coords[name]
        return rank

    def _axis_names(self, axis: str | Iterable[str]) -> tuple[str, ...]:
        names: list[str] = []
        for name in (axis,) if isinstance(axis, str) else tuple(axis):
            if name in ALIASES:
                names.extend(ALIASES[name])
            elif name in AXES:
                names.append(name)
            else:
                raise TopologyError(
                    f"unknown mesh axis {name!r}; the axes are {list(AXES)} and the aliases "
                    f"{list(ALIASES)}."
                )
        return tuple(names)

    def _check_rank(self, rank: int | None) -> int:
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is out of range for world_size {self.world_size}.")
        return rank

    def replace(self, **changes: Any) -> Topology:
        """``dataclasses.replace`` as a method; the live mesh is dropped when the layout changes."""
        if self.mesh is not None and set(changes) - {"mesh", "flattened", "timeout"}:
            changes.setdefault("mesh", None)
            changes.setdefault("flattened", {})
        return dataclasses.replace(self, **changes)


def parse_mesh(text: str) -> dict[str, int]:
    """``"dp_shard=2,tp=2"`` -> ``{"dp_shard": 2, "tp": 2}`` (the ``--mesh`` syntax)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in AXES:
            raise TopologyError(
                f"unknown mesh axis {name!r} in {text!r}; the axes are {list(AXES)}."
            )
        try:
            axes[name] = int(size)
        except ValueError:
            raise TopologyError(
                f"mesh axis {part!r} in {text!r} has no integer size; write e.g. dp_shard=2,tp=2."
            ) from None
    return axes


def _fmt(sizes: Mapping[str, int | None]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sizes.items()) + "}"
