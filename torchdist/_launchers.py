"""What each launcher writes into the environment: torchrun, Open MPI, MPICH / Intel MPI,
MVAPICH, SLURM ``srun``, PMIx.

Pure parsing of a mapping that ``Topology.from_env`` hands in; nothing here reads
``os.environ`` itself (``Topology.from_env`` is the one place that does). The rules are in
``docs/launchers.md``: launchers nest (SLURM outside MPI outside torchrun), the innermost one that
is present describes this process, and variables that look like a launcher's but contradict the
real launcher (a stale ``WORLD_SIZE=1 RANK=0`` exported in a shell) are refused, never obeyed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torchdist.errors import TopologyError

__all__ = ["read_launcher", "LAUNCHER_ENV"]

# (world size, rank, local rank, local world size) variables of each launcher we understand,
# innermost first: the first one present describes this process.
LAUNCHER_ENV: dict[str, tuple[str, str, str, str]] = {
    "torchrun": ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "openmpi": (
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "mvapich": (
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
    "mpich": ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "slurm": ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_TASKS_PER_NODE"),
}
# Variables only a torchelastic agent (torchrun, `torchdist launch`) sets: with them, torchrun's
# WORLD_SIZE/RANK are real even inside an MPI or SLURM allocation (torchrun per node under srun).
_AGENT_MARKERS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT")


def _int(name: str, raw: str) -> int:
    raw = raw.strip()
    if raw.isascii() and raw.isdigit():
        return int(raw)
    raise TopologyError(f"{name}={raw!r} is not a non-negative integer.")


def _slurm_local_world(raw: str | None, node: int | None) -> int | None:
    """``SLURM_TASKS_PER_NODE`` is ``"4"``, ``"2(x3)"`` or ``"4(x2),3"``; one count per node."""
    if raw is None:
        return None
    counts: list[int] = []
    for part in raw.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if len(set(counts)) == 1:
        return counts[0]
    return counts[node] if node is not None and node < len(counts) else None


def _read(launcher: str, env: Mapping[str, str]) -> tuple[int, int, int | None, int | None] | None:
    names = LAUNCHER_ENV[launcher]
    if launcher == "slurm" and "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" not in env:
        # An sbatch script's own shell has SLURM_PROCID=0 and SLURM_NTASKS=N but is one process;
        # only a task that srun started (a job step) is one of N.
        return None
    present = [name for name in names[:2] if name in env]
    if not present:
        return None
    if len(present) != 2:
        missing = [name for name in names[:2] if name not in env]
        raise TopologyError(
            f"{launcher} variable {present[0]} is set but {missing[0]} is not; a launcher sets "
            f"both. Unset {present[0]} for a single process, or launch with `torchdist launch`."
        )
    world, rank = _int(names[0], env[names[0]]), _int(names[1], env[names[1]])
    local_rank = _int(names[2], env[names[2]]) if names[2] in env else None
    if launcher == "slurm":
        node = _int("SLURM_NODEID", env["SLURM_NODEID"]) if "SLURM_NODEID" in env else None
        local_world = _slurm_local_world(env.get(names[3]), node)
    else:
        local_world = _int(names[3], env[names[3]]) if names[3] in env else None
    return world, rank, local_rank, local_world


def read_launcher(env: Mapping[str, str]) -> tuple[int, int, int, int]:
    """``(world_size, rank, local_rank, local_world_size or 0)``; one process when no launcher
    variables are present.

    Raises ``TopologyError`` when launchers contradict each other (a stale ``WORLD_SIZE`` against
    Open MPI's, SLURM's or MVAPICH's values) or when only PMIx is there (``PMIX_RANK`` without a
    world size).
    """
    found = {name: got for name in LAUNCHER_ENV if (got := _read(name, env)) is not None}
    agent = any(marker in env for marker in _AGENT_MARKERS)
    if "torchrun" in found and not agent:
        # WORLD_SIZE/RANK without an agent: a user's export (or a wrapper's copy). It must agree
        # with the process launcher, if any, or we would silently run N single-process jobs.
        tw, tr = found["torchrun"][:2]
        for other, (ow, orank, *_rest) in found.items():
            if other != "torchrun" and (ow, orank) != (tw, tr):
                o_names = LAUNCHER_ENV[other]
                raise TopologyError(
                    f"launcher variables disagree: WORLD_SIZE={tw} RANK={tr} but {other} says "
                    f"{o_names[0]}={ow} {o_names[1]}={orank}. WORLD_SIZE/RANK look stale (no "
                    f"torchrun agent set them); unset them (`unset WORLD_SIZE RANK LOCAL_RANK`) "
                    f"so the {other} values are used, or launch with `torchdist launch`."
                )
    mpis = {k: v[:2] for k, v in found.items() if k in ("openmpi", "mvapich", "mpich")}
    if len(set(mpis.values())) > 1:
        said = ", ".join(f"{k}: world {w} rank {r}" for k, (w, r) in mpis.items())
        raise TopologyError(
            f"MPI launchers disagree ({said}); this process was started by one of them. Unset "
            "the other's variables (left over from an outer job?) or launch with "
            "`torchdist launch`."
        )
    if not found:
        if "PMIX_RANK" in env:
            raise TopologyError(
                f"PMIX_RANK={env['PMIX_RANK']} is set but no launcher variable gives the world "
                f"size (PMIx keeps it behind its API, which torchdist does not link). Launch with "
                f"`srun` (sets SLURM_STEP_NUM_TASKS), `mpirun` (sets OMPI_COMM_WORLD_SIZE) or "
                f"`torchdist launch`, or export WORLD_SIZE=<processes> RANK=$PMIX_RANK."
            )
        return 1, 0, 0, 0
    world, rank, local_rank, local_world = next(iter(found.values()))
    if local_rank is None:
        local_rank = rank if not local_world else rank % local_world
    return world, rank, local_rank, local_world or 0
