"""torchdist's exception types, in one place.

Every message says what was found, what was expected, and how to fix it. Each type also derives
from the builtin a caller would naturally catch (``ValueError``, ``RuntimeError``,
``TimeoutError``), so ``except ValueError`` keeps working around torchdist calls.
"""

from __future__ import annotations

__all__ = [
    "TorchdistError",
    "TopologyError",
    "CompositionError",
    "CollectiveError",
    "CheckpointError",
    "StepError",
    "ShardingError",
    "RankError",
    "DistributedTimeoutError",
]


class TorchdistError(Exception):
    """Base class of every error torchdist raises on purpose."""


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
