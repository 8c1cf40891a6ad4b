"""The world's lifecycle: bring a process group up and down, start ranks, keep forks safe.

* ``distributed(topo)`` -- the process group and named ``DeviceMesh`` of one ``with`` block.
* ``spawn(fn, nprocs)`` -- real rank processes (notebooks, tests); a failing or hanging rank
  becomes an error carrying that rank's traceback or stack.
* ``in_process(fn, nranks)`` -- ranks as threads of this process, each with a real gloo group.

Nothing here is module state that configures anything; see ``_forksafe`` for the one fact about
the process heap that is kept.
"""

from torchdist.runtime._distributed import as_timedelta, distributed
from torchdist.runtime._worlds import in_process, spawn

__all__ = ["distributed", "spawn", "in_process", "as_timedelta"]
