"""What each launcher writes into the environment: torchrun, Open MPI, MPICH / Intel MPI.

Pure parsing of a mapping that ``Topology.from_env`` hands in; nothing here reads
``os.environ`` itself (``Topology.from_env`` is the one place that does).
"""

from __future__ import annotations

from collections.abc import Mapping

from torchdist.errors import TopologyError

__all__ = ["read_launcher"]

# (world size, rank, local rank, local world size) variables of each launcher we understand.
LAUNCHER_ENV = {
    "torchrun": ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "openmpi": (
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "mpich": ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


def read_launcher(env: Mapping[str, str]) -> tuple[int, int, int, int]:
    """``(world_size, rank, local_rank, local_world_size or 0)``; one process when no launcher
    variables are present."""
    for launcher, names in LAUNCHER_ENV.items():
        present = [name for name in names[:2] if name in env]
        if not present:
            continue
        if len(present) != 2:
            missing = [name for name in names[:2] if name not in env]
            raise TopologyError(
                f"{launcher} variable {present[0]} is set but {missing[0]} is not; a launcher sets "
                f"both. Unset {present[0]} for a single process, or launch with `torchdist launch`."
            )
        values = []
        for name in names:
            raw = env.get(name)
            if raw is None:
                values.append(None)
            elif raw.strip().isascii() and raw.strip().isdigit():
                values.append(int(raw))
            else:
                raise TopologyError(f"{name}={raw!r} is not a non-negative integer.")
        world, rank, local_rank, local_world = values
        if local_rank is None:
            local_rank = rank if local_world is None else rank % local_world
        return world, rank, local_rank, local_world or 0
    return 1, 0, 0, 0
