"""torchdist's exception types, in one place.

Every message says what was found, what was expected, and how to fix it. Each type also derives
from the builtin a caller would naturally catch (``ValueError``, ``RuntimeError``,
``TimeoutError``), so ``except ValueError`` keeps working around torchdist calls.

Which type to raise:

* ``ConfigError`` -- an argument that is wrong on its own, whatever else is going on (a negative
  ``k``, a NaN ``max_norm``, a budget string that does not parse). Raised where the value is
  first seen, usually when a transform is built.
* ``TopologyError`` -- the world, the mesh or a device does not fit (axes vs world size).
* ``CompositionError`` -- each piece is fine, their combination is not (an order that cannot
  work, a DeepSpeed config that disagrees with the transforms, an optimizer that does not hold
  the model's parameters).
* ``ShardingError`` -- a model a model transform cannot handle (no blocks, dtypes FSDP refuses).
* ``StepError`` -- something a step produced or was handed at run time (a non-scalar loss, a
  non-finite loss or gradient norm).
* ``CollectiveError``, ``CheckpointError`` -- what their names say; ``RankError`` and
  ``DistributedTimeoutError`` carry another rank's failure or hang back to the caller.
"""

from __future__ import annotations

__all__ = [
    "TorchdistError",
    "ConfigError",
    "TopologyError",
    "CompositionError",
    "CollectiveError",
    "CheckpointError",
    "StepError",
    "ShardingError",
    "RankError",
    "DistributedTimeoutError",
    "DeviceMapError",
]


class TorchdistError(Exception):
    """Base class of every error torchdist raises on purpose."""


class ConfigError(TorchdistError, ValueError):
    """An argument that is wrong on its own: out of range, the wrong type, unparsable."""


class TopologyError(TorchdistError, ValueError):
    """A topology that cannot exist: mesh axes that do not fit the world, a bad rank or device."""


class CompositionError(TorchdistError, ValueError):
    """Transforms composed in an order that cannot work, or applied twice."""


class CollectiveError(TorchdistError, ValueError):
    """A collective got something it cannot communicate (a non-tensor leaf, mismatched trees)."""


class StepError(TorchdistError, ValueError):
    """A step function was handed or produced something it cannot use (a non-scalar loss)."""


class ShardingError(TorchdistError, ValueError):
    """A model a sharding transform cannot handle: no parameters, blocks that match nothing."""


class DeviceMapError(TorchdistError, ValueError):
    """A device map that cannot work: a model that fits nowhere, tensors it places nowhere."""


class CheckpointError(TorchdistError, RuntimeError):
    """A checkpoint that is missing, truncated, from another model or from a newer format."""


class RankError(TorchdistError, RuntimeError):
    """A rank failed and its own exception could not be carried back to the caller as it was.

    ``rank`` is the failing rank, ``remote_traceback`` the traceback text printed on that rank.
    """

    def __init__(self, message: str, *, rank: int = -1, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


class DistributedTimeoutError(TorchdistError, TimeoutError):
    """Ranks did not finish in time: a hang (a skipped collective, a deadlock) turned into an error.

    ``ranks`` lists the ranks still running at the deadline and ``stacks`` their Python stacks.
    """

    def __init__(self, message: str, *, ranks: tuple[int, ...] = (), stacks: str = "") -> None:
        super().__init__(message)
        self.ranks = ranks
        self.stacks = stacks
