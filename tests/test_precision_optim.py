"""low_bit_adamw and the MS-AMP adapter on one process.

Low-bit AdamW: optimizer-state bytes (``optimizer_state_bytes``: codes, scales and lookup tables
of torchao's quantized state) against torch AdamW's fp32 state on an MLP whose tensors torchao
all quantizes (>= 4096 elements, sizes multiples of the block); and the loss of 50 steps on the
small GPT against torch AdamW from the same initialisation and batches, within 5% at every step.
The sharded case is in ``test_precision_dist.py``.

MS-AMP is not installed in CI (not on PyPI, CUDA only): its argument checks and the ImportError
that says how to install it, and what gives the same savings, are tested here; the call itself
only where msamp exists.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
from _precision_models import build_gpt, loss_fn, markov_batches

import torchdist as td
from torchdist.marks import mark
from torchdist.precision import autocast_fp8, low_bit_adamw, msamp_initialize, optimizer_state_bytes
from torchdist.transforms import compose, optimize, value_and_grad

pytest.importorskip("torchao")


def mlp(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
            nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 32),
        )  # fmt: skip


def state_bytes_after_one_step(make_opt) -> int:
    model = mlp()
    opt = make_opt(model.parameters())
    model(torch.randn(4, 32)).square().mean().backward()
    opt.step()
    return optimizer_state_bytes(opt)


@pytest.mark.parametrize(
    "kwargs, at_most",
    [(dict(bits=8), 0.30), (dict(fp8=True), 0.30), (dict(bits=4), 0.16)],
    ids=["8bit", "fp8", "4bit"],
)
def test_state_bytes_are_a_fraction_of_adamw(kwargs, at_most):
    fp32 = state_bytes_after_one_step(lambda p: torch.optim.AdamW(p, lr=1e-3))
    n = sum(p.numel() for p in mlp().parameters())
    assert fp32 >= 8 * n  # two fp32 moments per element (plus step counters)
    low = state_bytes_after_one_step(lambda p: low_bit_adamw(p, lr=1e-3, **kwargs))
    assert low <= at_most * fp32, (low / fp32, kwargs)  # measured: 26.5%, 25.8%, 13.8%


MODEL0 = build_gpt(seed=0, layers=1, seq=16)
KINDS = {"8bit": dict(bits=8), "4bit": dict(bits=4), "fp8": dict(fp8=True)}
BATCHES = markov_batches(50, 8, 16, seed=1)


@functools.cache
def losses(kind: str) -> tuple[float, ...]:
    model = copy.deepcopy(MODEL0)
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    else:
        opt = low_bit_adamw(model.parameters(), lr=3e-3, **KINDS[kind])
    step = compose(optimize(opt))(value_and_grad(loss_fn))
    state, out = td.TrainState(model=model, optimizer=opt), []
    for batch in BATCHES:
        state, metrics = step(state, batch)
        out.append(metrics["loss"].item())
    return tuple(out)


@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_tracks_adamw_within_5_percent(kind):
    low, ref = losses(kind), losses("adamw")
    assert ref[-1] < 0.6 * ref[0]  # it learned (4.3 -> ~2.2 nats)
    worst = max(abs(a - b) / b for a, b in zip(low, ref))
    assert worst <= 0.05, worst  # measured: 0.08% (8-bit), 2.3% (4-bit), 0.25% (fp8)


def test_eager_on_cpu_compiled_on_request_and_scheduler_works():
    from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8

    model = mlp()
    for kwargs, cls in (
        (dict(bits=8), AdamW8bit),
        (dict(bits=4), AdamW4bit),
        (dict(fp8=True), AdamWFp8),
    ):
        opt = low_bit_adamw(model.parameters(), **kwargs)
        assert isinstance(opt, cls) and type(opt) is not cls  # the uncompiled variant on CPU
        assert type(low_bit_adamw(model.parameters(), compile=True, **kwargs)) is cls
    groups = [
        {"params": (p for p in model[0].parameters()), "lr": 1e-2},
        {"params": list(model[2].parameters())},
    ]
    opt = low_bit_adamw(groups, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for _ in range(2):
        model(torch.randn(4, 32)).square().mean().backward()
        opt.step(), sched.step(), opt.zero_grad()
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([2.5e-3, 2.5e-4])


def test_bad_arguments_name_the_fix():
    params = list(mlp().parameters())
    with pytest.raises(td.CompositionError, match="bits must be 8 or 4.*fp8=True"):
        low_bit_adamw(params, bits=16)
    with pytest.raises(td.CompositionError, match="fp8=True stores the moments in float8"):
        low_bit_adamw(params, bits=4, fp8=True)
    with pytest.raises(td.CompositionError, match="empty parameter list"):
        low_bit_adamw([])
    with pytest.raises(td.CompositionError, match="compile must be"):
        low_bit_adamw(params, compile="yes")


# --------------------------------------------------------------------------- MS-AMP
def msamp_installed() -> bool:
    try:
        import msamp  # noqa: F401
    except ImportError:
        return False
    return True


def test_msamp_bad_opt_level_is_ours_and_comes_first():
    model = build_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(
        td.CompositionError, match=r"opt_level must be one of \['O1', 'O2'\], got 'O4'"
    ):
        msamp_initialize(model, opt, opt_level="O4")
    with pytest.raises(td.CompositionError, match="O3 .* DeepSpeed config"):
        msamp_initialize(model, opt, opt_level="O3")


def test_msamp_refuses_a_distributed_or_fp8_model():
    def rank(topo):
        sharded = td.sharding.shard(build_gpt(), topo)
        with pytest.raises(
            td.CompositionError,
            match="msamp_initialize after shard.*no FSDP2 support.*low_bit_adamw",
        ):
            msamp_initialize(sharded, None, "O2")
        return True

    assert td.in_process(rank, 1) == [True]
    fp8 = autocast_fp8(build_gpt())
    with pytest.raises(td.CompositionError, match="after autocast_fp8.*one fp8 system"):
        msamp_initialize(fp8, None, "O1")
    twice = mark(build_gpt(), "msamp")
    with pytest.raises(td.CompositionError, match="already applied"):
        msamp_initialize(twice, None, "O1")


def test_msamp_refuses_optimizers_it_cannot_convert():
    model = build_gpt()
    with pytest.raises(
        td.CompositionError, match="torch.optim.Adam, torch.optim.AdamW.*got torch.optim.sgd.SGD"
    ):
        msamp_initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), "O2")
    other = torch.optim.AdamW(build_gpt(seed=1).parameters())
    with pytest.raises(td.CompositionError, match="not the model's"):
        msamp_initialize(model, other, "O2")


@pytest.mark.skipif(msamp_installed(), reason="msamp is installed here")
def test_msamp_missing_says_how_to_install_and_what_to_use_instead():
    model = build_gpt()
    with pytest.raises(ImportError) as err:
        msamp_initialize(model, torch.optim.AdamW(model.parameters()), opt_level="O2")
    message = str(err.value)
    for needle in (
        "not on PyPI", "github.com/Azure/MS-AMP", "python3 -m pip install .", "autocast_fp8(",
        "Float8Recipe.tensorwise()", "low_bit_adamw(model.parameters(), bits=8)",
    ):  # fmt: skip
        assert needle in message, needle
    assert td.marks.applied(model) == ()
