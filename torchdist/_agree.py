"""Cross-rank agreement of pytree structure, keys, dtypes and shapes before a collective.

Each rank hashes a description of its tree (treedef, each leaf's path and what must agree for
that collective) into one int64 and the ranks all-gather ``[hash, leaf count]``: one 16-byte
all-gather per checked collective. Only on a mismatch do they exchange the full descriptions
(``all_gather_object``) so that every rank raises the same ``CollectiveError`` naming the leaf and
each rank's value. Costs are in ``docs/collectives.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import optree
import torch

from torchdist.errors import CollectiveError

__all__ = ["describe_leaves", "check_agree", "should_check"]


def _path(path: tuple) -> str:
    return "/".join(map(str, path)) or "<root>"


def describe_leaves(tree: Any, describe) -> tuple[str, list[tuple[str, Any]]]:
    """``(treedef string, [(leaf path, describe(leaf)), ...])`` of ``tree``; ``describe`` gives
    what must agree, or a pair ``(what must agree, what to show)``."""
    paths, leaves, treedef = optree.tree_flatten_with_path(tree, none_is_leaf=False)
    return str(treedef), [(_path(p), describe(leaf)) for p, leaf in zip(paths, leaves)]


def should_check(check: bool | None, group, *, syncs_anyway: bool) -> bool:
    """``check`` if given; else on where cheap (the collective already waits on the host, or the
    group is gloo) and always under ``TORCH_DISTRIBUTED_DEBUG=DETAIL``."""
    if check is not None:
        return check
    import torch.distributed as dist

    if dist.get_debug_level() == dist.DebugLevel.DETAIL:
        return True
    return syncs_anyway or dist.get_backend(group) == "gloo"


def check_agree(
    treedef: str,
    leaves: Sequence[tuple[str, Any]],
    group,
    what: str,
    device: torch.device | str = "cpu",
) -> None:
    """Raise ``CollectiveError`` on every rank of ``group`` unless all ranks passed the same
    ``treedef`` and leaf descriptions. Communicates: one all-gather of two int64 (and, only on a
    mismatch, one ``all_gather_object`` of the descriptions)."""
    import torch.distributed as dist

    compared = [(p, d[0] if isinstance(d, tuple) else d) for p, d in leaves]
    digest = hashlib.blake2b(repr((treedef, compared)).encode(), digest_size=8).digest()
    mine = torch.tensor(
        [int.from_bytes(digest, "little", signed=True), len(leaves)],
        dtype=torch.int64, device=device,
    )  # fmt: skip
    size = dist.get_world_size(group)
    out = mine.new_empty(size * 2)
    dist.all_gather_single(out, mine, group=group)
    rows = out.view(size, 2).tolist()
    if all(row == rows[0] for row in rows):
        return
    every: list[Any] = [None] * size
    dist.all_gather_object(every, (treedef, list(leaves)), group=group)
    raise CollectiveError(_explain(what, every))


def _explain(what: str, every: list[tuple[str, list[tuple[str, Any]]]]) -> str:
    counts = [len(leaves) for _, leaves in every]
    what += f" (ranks hold different numbers of tensors ({counts}))" if len(set(counts)) > 1 else ""
    maps = [{p: d if isinstance(d, tuple) else (d, d) for p, d in leaves} for _, leaves in every]
    order: list[str] = []
    for _, leaves in every:
        order += [p for p, _ in leaves if p not in order]
    for path in order:
        got = [m.get(path) for m in maps]
        if len({g[0] if g else None for g in got}) > 1:
            found = ", ".join(
                f"rank {r}: {g[1] if g else 'no such leaf'}" for r, g in enumerate(got)
            )
            kinds = {str(g[1]).split("(")[0] if g else None for g in got}
            how = "in keys" if None in kinds else "in dtype" if len(kinds) > 1 else "in shape"
            return (
                f"{what}: leaf {path!r} differs across ranks {how} ({found}). Every rank must "
                f"pass a "
                f"pytree with the same keys, structure, dtypes and shapes; a rank that passes "
                f"another tree would reduce unrelated values together."
            )
    found = ", ".join(f"rank {r}: {t}" for r, (t, _) in enumerate(every))
    return (
        f"{what}: the pytree structure differs across ranks ({found}). Every rank must pass the "
        f"same containers (a list on one rank and a tuple on another do not match)."
    )
