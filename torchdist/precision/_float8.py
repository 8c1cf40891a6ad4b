"""`autocast_fp8(model, recipe)`: train a model's Linear layers with float8 matmuls (torchao).

A model transform, ``model -> model``: the Linear layers the recipe selects become torchao
``Float8Linear`` layers, which cast their input, weight and output gradient to float8 with
dynamic scales and run the three matmuls of forward and backward through ``torch._scaled_mm``.
Master weights, gradients and optimizer state keep their dtype (fp32 unless you chose otherwise);
parameter names are unchanged, so checkpoints stay portable.

Decisions, where torchao and FSDP2 leave a choice:

* **Which layers.** ``Float8Recipe``'s default filter skips the first and the last ``nn.Linear``
  outside the repeated blocks (in the order ``named_modules`` lists them: typically the input
  projection and the LM head, the layers most sensitive to precision; a block's layers are never
  edges, so siblings such as ``q``, ``k``, ``v`` are treated alike) and every Linear whose in or
  out features are not a
  multiple of 16 (``torch._scaled_mm``'s requirement on GPUs); ``min_features=`` also skips
  layers too small to gain (torchao's H100 tables put the break-even around 1024-4096 features).
  A ``filter=`` predicate over ``(fully_qualified_name, module)`` replaces the default entirely.
  A recipe that selects nothing is an error, not a silent no-op.
* **fp8 all-gather under ``shard``.** ``Float8Recipe.tensorwise()`` turns on torchao's fp8
  all-gather: FSDP2 all-gathers each converted weight as float8 (1 byte per element instead of
  4), cast with a scale that ``optimize`` precomputes after each optimizer step in one
  all-reduce for the whole model (torchao's ``precompute_float8_dynamic_scale_for_fsdp``,
  registered here as a post-step hook; it does nothing until the model is sharded). gloo has no
  float8 dtype, so the float8 bytes travel as ``uint8`` (a view, no copy) and are viewed back
  after the gather -- on every backend, because FSDP2 already gathers as ``uint8`` whenever a
  unit mixes dtypes, so NCCL moves exactly the same bytes. One code path, no fallback, nothing
  silent: the 2-rank CPU tests exercise the path GPUs run (``tests/test_precision_dist.py``: 2
  ranks match one process fed the same half-batches to 1e-5). Rowwise recipes have no fp8
  all-gather in torchao (their weight scales are per row of the unsharded weight); their
  weights are all-gathered in the parameter dtype.
* **Order.** ``autocast_fp8`` comes first: ``autocast_fp8 -> parallelize ->
  checkpoint_activations -> compile -> shard | replicate``. It refuses a model that is already
  sharded, replicated, parallelized, checkpointed, compiled or float8, naming that order.
* **With ``autocast(torch.bfloat16)``.** torchao's ``Float8Linear`` follows CUDA autocast only;
  on CPU the combination works for ``tensorwise`` and ``rowwise`` but ``rowwise_with_gw_hp``
  fails in torchao 0.18 ("expected m1 and m2 to have the same dtype"). For bf16 around fp8
  layers, shard with ``MixedPrecision(param_dtype=torch.bfloat16)`` as torchtitan does (all
  three recipes run so on 2 CPU ranks), or keep the parameters in bf16.

torchao is imported when a model is converted, never by ``import torchdist.precision``; without
it, ``autocast_fp8`` raises an ``ImportError`` naming ``pip install 'torchdist[fp8]'``.

Communicates nothing itself. Under ``shard``: per FSDP unit and step, a ``uint8`` all-gather of
the float8 weights (tensorwise) and, after each optimizer step, one all-reduce of the weight
amaxes; under ``shard`` without precomputed scales (before the first step), one all-reduce per
weight cast.

Example::

    model = autocast_fp8(build_model(), Float8Recipe.tensorwise())
    print(converted_layers(model))        # ('blocks.0.attn.proj', 'blocks.0.mlp.up', ...)
    model = shard(model, topo)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    step = compose(optimize(opt))(value_and_grad(loss_fn))   # optimize precomputes fp8 scales
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from torchdist._model_record import MODEL_ORDER, check_order, record_of
from torchdist.errors import CompositionError
from torchdist.marks import mark

__all__ = ["Float8Recipe", "autocast_fp8", "converted_layers", "fp8_compatible"]

_TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
_RECIPES = _TORCHAO_RECIPES + ("transformer_engine",)

ModuleFilter = Callable[[str, nn.Module], bool]

def fp8_compatible(module: nn.Module, min_features: int = 0) -> bool:
    """True for an ``nn.Linear`` whose in and out features are multiples of 16 and at least
    ``min_features``: the layers ``torch._scaled_mm`` can run and that are big enough to gain."""
    if not isinstance(module, nn.Linear):
        return False
    dims = (module.in_features, module.out_features)
    return all(d % 16 == 0 and d >= min_features for d in dims)


@dataclass(frozen=True)
class Float8Recipe:
    """How ``autocast_fp8`` trains in float8: torchao's scaling recipe plus which layers.

    Build one with ``tensorwise()`` (fastest; fp8 all-gather under ``shard``), ``rowwise()``
    (a scale per row, power-of-two scales: more accurate) or ``rowwise_with_gw_hp()`` (rowwise,
    with the weight gradient computed in high precision: the most accurate), or
    ``transformer_engine()`` (NVIDIA Transformer Engine, CUDA only).

    ``filter``: a predicate over ``(fully_qualified_name, module)`` for each ``nn.Linear``;
    when given, it alone decides. Otherwise ``skip_first_last`` skips the first and last Linear
    outside the repeated blocks and ``fp8_compatible(module, min_features)`` must hold.
    ``select(model)`` lists the layers
    a recipe picks without converting anything.
    """

    name: str = "tensorwise"
    filter: ModuleFilter | None = None
    skip_first_last: bool = True
    min_features: int = 0
    fsdp_float8_all_gather: bool = False
    options: tuple[tuple[str, Any], ...] = ()  # recipe-specific settings (transformer_engine)

    def __post_init__(self) -> None:
        if self.name not in _RECIPES:
            raise CompositionError(
                f"Float8Recipe: unknown recipe {self.name!r}; expected one of {list(_RECIPES)}. "
                "Build one with Float8Recipe.tensorwise(), .rowwise() or .rowwise_with_gw_hp()."
            )
        if self.fsdp_float8_all_gather and self.name != "tensorwise":
            raise CompositionError(
                f"Float8Recipe.{self.name}: fp8 all-gather needs one scale per weight tensor, "
                "which only the tensorwise recipe has. Use Float8Recipe.tensorwise() for fp8 "
                "all-gather, or drop fsdp_float8_all_gather."
            )
        if self.filter is not None and not callable(self.filter):
            raise CompositionError(
                f"Float8Recipe: filter must be a predicate over (name, module), got "
                f"{type(self.filter).__name__}."
            )
        if self.min_features < 0:
            raise CompositionError(
                f"Float8Recipe: min_features must be >= 0, got {self.min_features}."
            )

    # ----------------------------------------------------------------- the named recipes
    @classmethod
    def tensorwise(
        cls,
        *,
        filter: ModuleFilter | None = None,
        skip_first_last: bool = True,
        min_features: int = 0,
        fsdp_float8_all_gather: bool = True,
    ) -> Float8Recipe:
        """One dynamic scale per tensor (torchao ``"tensorwise"``), e4m3 forward, e5m2 gradients.

        ``fsdp_float8_all_gather``: under ``shard``, all-gather the weights in float8.
        """
        return cls("tensorwise", filter, skip_first_last, min_features, fsdp_float8_all_gather)

    @classmethod
    def rowwise(
        cls,
        *,
        filter: ModuleFilter | None = None,
        skip_first_last: bool = True,
        min_features: int = 0,
    ) -> Float8Recipe:
        """A scale per row, rounded to a power of two, e4m3 throughout (torchao ``"rowwise"``)."""
        return cls("rowwise", filter, skip_first_last, min_features)

    @classmethod
    def rowwise_with_gw_hp(
        cls,
        *,
        filter: ModuleFilter | None = None,
        skip_first_last: bool = True,
        min_features: int = 0,
    ) -> Float8Recipe:
        """Rowwise, with the weight gradient computed in high precision (torchao
        ``"rowwise_with_gw_hp"``): the most accurate torchao recipe."""
        return cls("rowwise_with_gw_hp", filter, skip_first_last, min_features)

    @classmethod
    def transformer_engine(
        cls,
        *,
        filter: ModuleFilter | None = None,
        skip_first_last: bool = True,
        min_features: int = 0,
        fp8_format: str = "HYBRID",
        amax_history_len: int = 16,
        amax_compute_algo: str = "max",
        margin: int = 0,
    ) -> Float8Recipe:
        """NVIDIA Transformer Engine's delayed scaling (``te.common.recipe.DelayedScaling``):
        selected Linears become ``te.pytorch.Linear`` and the model's forward runs under
        ``fp8_autocast``. CUDA only; needs ``transformer_engine[pytorch]``."""
        options = (
            ("fp8_format", fp8_format),
            ("amax_history_len", amax_history_len),
            ("amax_compute_algo", amax_compute_algo),
            ("margin", margin),
        )
        return cls("transformer_engine", filter, skip_first_last, min_features, False, options)

    def replace(self, **changes: Any) -> Float8Recipe:
        """``dataclasses.replace`` as a method (e.g. ``recipe.replace(min_features=1024)``)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- what it does
    def select(self, model: nn.Module) -> tuple[str, ...]:
        """Fully-qualified names of the Linear layers this recipe converts in ``model``."""
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if self.filter is not None:
            return tuple(n for n, m in linears if self.filter(n, m))
        edges = set()
        if self.skip_first_last and linears:
            # The edges are the model's own input and output layers, never a layer of a repeated
            # block: skipping blocks.0.q alone would treat q unlike its siblings k and v.
            from torchdist.blocks import default_blocks

            inside = tuple(f"{name}." for name, _ in default_blocks(model))
            outside = [n for n, _ in linears if not n.startswith(inside)] if inside else [
                n for n, _ in linears]  # fmt: skip
            edges = {outside[0], outside[-1]} if outside else set()
        return tuple(
            n for n, m in linears if n not in edges and fp8_compatible(m, self.min_features)
        )

    def to_torchao(self):
        """The ``torchao.float8.Float8LinearConfig`` of this recipe (imports torchao)."""
        if self.name not in _TORCHAO_RECIPES:
            raise CompositionError(f"Float8Recipe.{self.name} is not a torchao recipe.")
        _require_torchao(f"Float8Recipe.{self.name}")
        from torchao.float8 import Float8LinearConfig

        config = Float8LinearConfig.from_recipe_name(self.name)
        if self.fsdp_float8_all_gather:
            config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
        return config


class _PrecomputeFloat8Scales:
    """Post-optimizer-step hook: every fp8 weight's scale for the next all-gather, in one
    all-reduce (torchao's ``precompute_float8_dynamic_scale_for_fsdp``). A no-op until the
    model is sharded: torchao only touches weights that are DTensors.

    A callable object, not a closure, so that ``copy.deepcopy(model)`` gives the copy a hook
    bound to the copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self) -> None:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(self.model)

    def __repr__(self) -> str:
        return "<autocast_fp8: precompute float8 weight scales after the optimizer step>"


def autocast_fp8(model: nn.Module, recipe: Float8Recipe | None = None) -> nn.Module:
    """Convert the Linear layers ``recipe`` selects to float8 training; return the model.

    ``recipe`` defaults to ``Float8Recipe.tensorwise()``. The model is converted in place
    (the same object comes back, unless the model is itself a selected ``nn.Linear``); the
    converted names are in ``converted_layers(model)``. Apply it before ``parallelize``,
    ``checkpoint_activations`` and ``shard``/``replicate``; twice or later raises
    ``CompositionError``.

    Communicates nothing itself; see the module docstring for what it changes under ``shard``.

    Example::

        model = autocast_fp8(model, Float8Recipe.rowwise(filter=lambda name, m: "mlp" in name))
        print(converted_layers(model))
    """
    if not isinstance(model, nn.Module):
        raise CompositionError(f"autocast_fp8 takes an nn.Module, got {type(model).__name__}.")
    recipe = Float8Recipe.tensorwise() if recipe is None else recipe
    if not isinstance(recipe, Float8Recipe):
        raise CompositionError(
            f"autocast_fp8 takes a Float8Recipe (Float8Recipe.tensorwise(), .rowwise(), "
            f".rowwise_with_gw_hp()), got {recipe!r}."
        )
    _check_order(model)
    layers = recipe.select(model)
    if not layers:
        small = f" or below {recipe.min_features}" if recipe.min_features else ""
        why = (
            "the filter selected none"
            if recipe.filter is not None
            else "the default skips the first and last Linear outside the repeated blocks and "
            "those whose features are "
            f"not multiples of 16{small}"
        )
        raise CompositionError(
            f"autocast_fp8: no Linear layer of {type(model).__name__} to convert ({why}). "
            "Check the filter, or pass Float8Recipe.tensorwise(filter=lambda name, m: ...) to "
            "choose layers yourself."
        )
    if recipe.name == "transformer_engine":
        from torchdist.precision._transformer_engine import convert_to_transformer_engine

        model = convert_to_transformer_engine(model, layers, dict(recipe.options))
        hook = None
    else:
        model, hook = _convert_torchao(model, recipe, layers)
    return mark(model, "autocast_fp8", options={"recipe": recipe, "layers": layers},
                after_optimizer_step=hook)  # fmt: skip


def converted_layers(model: nn.Module) -> tuple[str, ...]:
    """Fully-qualified names of the layers ``autocast_fp8`` converted (empty if it did not run)."""
    found = record_of(model).find("autocast_fp8")
    return tuple(found.options["layers"]) if found is not None else ()


# --------------------------------------------------------------------------- internals
def _require_torchao(feature: str, submodule: str = "float8") -> None:
    """Import ``torchao.<submodule>`` or raise an ImportError that says how to install it."""
    import importlib

    try:
        importlib.import_module("torchao")  # first, so a torchao hidden from sys.modules shows
        importlib.import_module(f"torchao.{submodule}")
    except ImportError as exc:
        raise ImportError(
            f"{feature} needs torchao >= 0.18, which could not be imported ({exc}). Install it "
            "with: pip install 'torchdist[fp8]'  (or: pip install 'torchao>=0.18')."
        ) from exc


def _check_order(model: nn.Module) -> None:
    check_order(model, "autocast_fp8")
    from torchdist._distribution import distributed_by_hand

    found = distributed_by_hand(model)
    if found:
        raise CompositionError(
            f"autocast_fp8 after {found}: float8 conversion must see the plain nn.Linear "
            f"layers. The order that works, first to last: {MODEL_ORDER}."
        )


def _convert_torchao(model: nn.Module, recipe: Float8Recipe, layers: tuple[str, ...]):
    config = recipe.to_torchao()
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    already = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    if already:
        raise CompositionError(
            f"autocast_fp8: {already[:3]} are already torchao Float8Linear layers (converted "
            "outside torchdist); convert once, with autocast_fp8 alone."
        )
    chosen = frozenset(layers)
    model = convert_to_float8_training(
        model, config=config, module_filter_fn=lambda module, fqn: fqn in chosen
    )
    if not recipe.fsdp_float8_all_gather:
        return model, None
    from torchdist.precision._torchao import gather_float8_weights_as_bytes

    gather_float8_weights_as_bytes(model)
    return model, _PrecomputeFloat8Scales(model)
