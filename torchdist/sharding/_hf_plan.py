"""A Hugging Face model's own tensor-parallel plan, for ``parallelize(model, topo)`` with no plan.

Where the plan is looked up, first found wins (the source is logged on ``torchdist.sharding``
at INFO and kept in the record's options as ``plan_source``):

1. ``model.tp_plan`` (transformers >= 4.50 and 5.x: the merged plan, prefixed module names);
2. ``model._tp_plan`` (older 4.x instances, merged in ``post_init``);
3. ``config.base_model_tp_plan`` under ``model.base_model_prefix`` plus the class's ``_tp_plan``
   (the head), built the way transformers merges them.

A model with none of them (GPT-2, BERT: their configs carry no plan) is a ``ShardingError`` that
says to pass a plan. Before anything is split, ``check_plan_fits`` checks the config against the
tp size: attention heads and key/value heads must divide by it (HF's attention reshapes the
local projection into ``heads // tp`` heads; an uneven split would mix heads). Nothing here
imports transformers; nothing communicates.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from torchdist.errors import ShardingError

__all__ = ["hf_tp_plan", "check_plan_fits", "tied_groups", "retie"]

log = logging.getLogger("torchdist.sharding")
_ATTENTION = ("attn", "attention", "q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv")


def hf_tp_plan(model: nn.Module) -> tuple[dict[str, Any], str]:
    """``(plan, source)``: the model's own tensor-parallel plan and where it was found."""
    name = type(model).__name__
    plan = getattr(model, "tp_plan", None)
    if isinstance(plan, Mapping) and plan:
        return dict(plan), f"{name}.tp_plan"
    plan = getattr(model, "_tp_plan", None)
    if isinstance(plan, Mapping) and plan:
        return dict(plan), f"{name}._tp_plan"
    config = getattr(model, "config", None)
    base = getattr(config, "base_model_tp_plan", None)
    if isinstance(base, Mapping) and base:
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and not hasattr(model, prefix):
            prefix = ""  # the model is the base model itself
        merged = {f"{prefix}.{k}" if prefix else k: v for k, v in base.items()}
        merged.update(getattr(type(model), "_tp_plan", None) or {})
        return merged, f"{name}.config.base_model_tp_plan"
    hint = (
        " (a transformers model whose class and config define no tensor-parallel plan, e.g. "
        "GPT-2 or BERT)"
        if config is not None
        else ""
    )
    raise ShardingError(
        f"parallelize: no plan given and {name} has none of its own{hint}: looked for "
        "model.tp_plan, model._tp_plan and model.config.base_model_tp_plan. Pass a plan "
        "{module-name glob: style}, e.g. {'layers.*.mlp.up': 'colwise', 'layers.*.mlp.down': "
        "'rowwise'}, or use shard()/replicate() for this model."
    )


def check_plan_fits(model: nn.Module, plan: Mapping[str, Any], tp: int, source: str) -> None:
    """Refuse a tp size the model's attention cannot be split by (``ShardingError``)."""
    config = getattr(model, "config", None)
    if config is None or tp == 1:
        return
    config = getattr(config, "get_text_config", lambda: config)()
    splits_attention = any(
        any(word in pattern for word in _ATTENTION) and style != "replicate"
        for pattern, style in plan.items()
    )
    if not splits_attention:
        return
    bad = []
    for key in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value % tp:
            bad.append(f"{key}={value}")
    if bad:
        heads = getattr(config, "num_attention_heads", None)
        kv = getattr(config, "num_key_value_heads", None) or heads
        fits = [d for d in range(1, tp + 1) if heads and heads % d == 0 and kv % d == 0]
        raise ShardingError(
            f"parallelize: {source} splits attention heads over tp={tp}, but "
            f"{type(model).__name__}'s config has {', '.join(bad)}, not divisible by {tp}; each "
            f"rank must hold whole heads. Use a tp size that divides both (here: {fits}) and "
            "put the other ranks on dp_shard, or pass a plan that leaves attention whole."
        )


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of each parameter registered under more than one name (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Make each group of names one parameter again after ``parallelize_module`` distributed
    them separately; refuse when the styles gave them different layouts."""
    for names in groups:
        params = [model.get_parameter(n) for n in names]
        first = params[0]
        if all(p is first for p in params):
            continue
        layouts = {(str(getattr(p, "placements", None)), tuple(p.shape)) for p in params}
        if len(layouts) > 1:
            raise ShardingError(
                f"parallelize: the tied parameters {names} got different tensor-parallel "
                f"layouts ({sorted(layouts)}); give their modules styles that shard the weight "
                "the same way (HF: embedding_rowwise with colwise_gather_output both split the "
                "vocabulary) or untie them first."
            )
        for name in names[1:]:
            owner, _, local = name.rpartition(".")
            setattr(model.get_submodule(owner), local, first)
