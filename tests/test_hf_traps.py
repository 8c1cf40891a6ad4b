"""Hugging Face traps (issue 18) on tiny random-weight models built from configs (no download).

1. meta-device init, ``shard``, ``materialize``: non-persistent buffers (rotary ``inv_freq``) are
   re-initialised, and one that cannot be is a ``ShardingError`` naming it.
2. ``spawn`` after a real ``torch.compile`` in the calling process does not hang.
3. Twenty ``distributed()`` blocks one after another in ONE torchrun job.
4. HF's tensor-parallel style vocabulary; spawn's ranks carry torchrun's environment;
   GPT-2's ``Conv1D`` under ``parallelize`` is a ``ShardingError`` saying what to do.
6. A sharded HF model saved the documented way (``export_safetensors``) loads with
   ``from_pretrained`` (docs/huggingface.md).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import torchdist as td
from torchdist.errors import ShardingError
from torchdist.sharding import materialize, parallelize, shard

transformers = pytest.importorskip("transformers")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _llama_config(**overrides):
    config = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config.update(overrides)
    return transformers.LlamaConfig(**config)


def _tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(_llama_config()).eval()


def _python(code: str, timeout: float, env: dict[str, str] | None = None):
    """Run ``code`` in a fresh interpreter from the repo root; return the finished process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------- 1. non-persistent buffers
def test_meta_llama_sharded_then_materialized_matches_the_real_model(tmp_path):
    from torchdist.checkpoint import export_safetensors, load_safetensors

    reference = _tiny_llama()
    full = reference.state_dict()
    with td.distributed(td.Topology.single()) as one:
        export_safetensors(reference, tmp_path / "export", one)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits

    def run(topo):
        outputs = []
        for how in ("full_state_dict", "init+load_safetensors"):
            with torch.device("meta"):
                model = transformers.LlamaForCausalLM(_llama_config())
            model = shard(model, topo)
            if how == "full_state_dict":
                materialize(model, "cpu", full_state_dict=full)
            else:
                materialize(model, "cpu", init=lambda m: None)
                load_safetensors(model, tmp_path / "export", topo)
            rotary = model.model.rotary_emb
            with torch.no_grad():
                logits = model.eval()(ids).logits
            outputs.append((how, logits, rotary.inv_freq.clone(), rotary.original_inv_freq))
        return outputs

    for outputs in td.in_process(run, 2, dp_shard=2):
        for how, logits, inv_freq, original in outputs:
            torch.testing.assert_close(
                inv_freq, reference.model.rotary_emb.inv_freq, rtol=0, atol=0, msg=how
            )
            torch.testing.assert_close(original, inv_freq, rtol=0, atol=0, msg=how)
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6, msg=how)


class _Masked(nn.Module):
    """A module with a non-persistent buffer and no initialiser that recomputes it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, x):
        return self.proj(x) * self.scale


def test_a_buffer_nothing_can_reinitialise_is_an_error_naming_it():
    with torch.device("meta"):
        model = nn.Sequential(_Masked())
    with pytest.raises(ShardingError, match=r"0\.scale \(_Masked\).*buffers="):
        materialize(model, "cpu", init=lambda m: None)


def test_buffers_given_or_already_real_are_kept():
    real = nn.Sequential(_Masked())
    materialize(real, "cpu", init=lambda m: None)  # not on meta: its value survives to_empty
    assert real[0].scale.tolist() == [2.0] * 4
    with torch.device("meta"):
        model = nn.Sequential(_Masked())
    materialize(model, "cpu", init=lambda m: None, buffers={"0.scale": torch.full((4,), 3.0)})
    assert model[0].scale.tolist() == [3.0] * 4
    with torch.device("meta"):
        model = nn.Sequential(_Masked())
    with pytest.raises(ShardingError, match=r"\['0\.nope'\]"):
        materialize(model, "cpu", init=lambda m: None, buffers={"0.nope": torch.zeros(4)})


# ------------------------------------------------------------------- 2. spawn after torch.compile
@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_spawn_after_a_real_compile_in_the_caller_does_not_hang():
    # The hang needs a real C++ kernel build in the caller (with two compile threads, so the
    # caller owns the compile thread pool a forked rank inherits) and another in each rank. A
    # constant new to every run makes both kernels new to inductor's cache, so both builds really
    # run, while the cache's one-off work (its CPU-feature probes, ~15 s here) is shared with the
    # suite's other compiles. Without the fix the ranks wait forever (checked by hand: spawn's
    # timeout fires).
    constant = 1.0 + random.SystemRandom().random()  # not the seeded generator: new every run
    done = _python(
        f"""
        import torch, torchdist as td
        from torch._inductor.async_compile import AsyncCompile
        f = torch.compile(lambda x: (x.sin() + {constant!r}).sum())
        f(torch.randn(8))
        print("CALLER POOL", AsyncCompile.pool.cache_info().currsize)

        def rank(topo):
            g = torch.compile(lambda x: (x.cos() * {constant!r}).sum())
            return float(g(torch.ones(4)))

        print("RESULT", td.spawn(rank, 2, timeout=60))
        """,
        timeout=150,
        env={"TORCHINDUCTOR_COMPILE_THREADS": "2"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "CALLER POOL 1" in done.stdout, done.stdout  # the trap was set: a pool to inherit
    value = 4 * constant * torch.cos(torch.tensor(1.0)).item()
    assert "RESULT [" in done.stdout, done.stdout
    results = eval(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert results == pytest.approx([value, value], rel=1e-5)


# ------------------------------------------------------- 3. sequential worlds in one torchrun job
_SEQUENTIAL_WORLDS = """
import os, torch, torchdist as td
for i in range(20):
    with td.distributed(td.Topology.from_env(), timeout=30) as topo:
        total = td.all_reduce(torch.full((2,), float(topo.rank + i)), topo, op="sum")
        assert total.tolist() == [2.0 * i + 1] * 2, (i, total)
print("WORLDS-OK", os.environ["RANK"], flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_twenty_sequential_worlds_in_one_torchrun_job(tmp_path):
    script = tmp_path / "worlds.py"
    script.write_text(_SEQUENTIAL_WORLDS)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + ["--nproc-per-node", "2", str(script)],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert done.stdout.count("WORLDS-OK") == 2, done.stdout


# ------------------------------------------------------------- 4. HF plans, environment, Conv1D
def test_hf_llama_runs_its_own_tp_plan():
    reference = _tiny_llama()
    full = reference.state_dict()
    plan = reference.tp_plan  # HF's names: colwise_gather_output, embedding_rowwise, ...
    assert {"colwise_gather_output", "embedding_rowwise"} <= set(plan.values())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits

    def run(topo):
        model = transformers.LlamaForCausalLM(_llama_config())
        model.load_state_dict(full)
        model = parallelize(model.eval(), topo, plan)
        q = model.model.layers[0].self_attn.q_proj.weight
        with torch.no_grad():
            return tuple(q.to_local().shape), model(ids).logits

    for local_shape, logits in td.in_process(run, 2, tp=2):
        assert local_shape == (16, 32)  # 4 heads x 8 over 2 ranks
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_every_hf_style_name_maps_or_is_refused_with_a_reason():
    from torch.distributed.tensor.parallel import ParallelStyle

    from torchdist.sharding._tp_styles import HF_STYLES, REFUSED, resolve_plan

    resolved = resolve_plan({f"m{i}": name for i, name in enumerate(HF_STYLES)})
    assert len(resolved) == len(HF_STYLES) - 1  # "replicate" leaves the module alone
    assert all(isinstance(style, ParallelStyle) for style in resolved.values())
    for name, reason in REFUSED.items():
        with pytest.raises(ShardingError, match=rf"'layer'.*{name!r}.*{re.escape(reason[:30])}"):
            resolve_plan({"layer": name})
    with pytest.raises(ShardingError, match="unknown style 'colwize'.*colwise_gather_output"):
        resolve_plan({"layer": "colwize"})


def test_transformers_installed_styles_are_all_known():
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    from torchdist.sharding._tp_styles import HF_STYLES, REFUSED

    assert set(ALL_PARALLEL_STYLES) <= set(HF_STYLES) | set(REFUSED)


def test_gpt2_conv1d_under_tp_says_what_to_do():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    )
    with td.distributed(td.Topology.single()) as topo:
        with pytest.raises(
            ShardingError, match=r"transformer\.h\.0\.attn\.c_attn.*Conv1D.*shard\(\)"
        ):
            parallelize(gpt2, topo, {"transformer.h.*.attn.c_attn": "colwise"})


def _rank_environment(topo):
    keys = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {key: os.environ.get(key) for key in keys}


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_spawned_ranks_look_like_torchrun_ranks_and_hf_tp_auto_shards(tmp_path):
    envs = td.spawn(_rank_environment, 2)
    for rank, env in enumerate(envs):
        assert env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["MASTER_ADDR"] and env["MASTER_PORT"] == envs[0]["MASTER_PORT"]

    reference = _tiny_llama()
    reference.save_pretrained(tmp_path / "llama")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits

    def load(topo):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "llama", tp_plan="auto"
        )
        q = model.model.layers[0].self_attn.q_proj.weight
        with torch.no_grad():
            return tuple(q.to_local().shape), model.eval()(ids).logits

    for local_shape, logits in td.spawn(load, 2, timeout=120):
        assert local_shape == (16, 32)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------- 6. save a sharded HF model (docs)
def test_a_sharded_hf_model_exports_to_a_directory_from_pretrained_loads(tmp_path):
    from torchdist.checkpoint import export_safetensors

    reference = _tiny_llama()
    full = reference.state_dict()

    def run(topo):
        model = transformers.LlamaForCausalLM(_llama_config())
        model.load_state_dict(full)
        export_safetensors(shard(model, topo), tmp_path / "export", topo)  # not save_pretrained

    td.in_process(run, 2, dp_shard=2)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_sequential_worlds_without_an_agent_store(tmp_path):
    # WORLD_SIZE/RANK/MASTER_* by hand (as mpirun or a scheduler sets them): rank 0 hosts a new
    # store on the same port per world, and a rank must not connect to the one being closed.
    script = tmp_path / "worlds.py"
    script.write_text(_SEQUENTIAL_WORLDS.replace("range(20)", "range(5)"))
    port = 20000 + os.getpid() % 20000
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    for key in [k for k in env if k.startswith("TORCHELASTIC")]:
        del env[key]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script)],
            cwd=_ROOT,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outs = [rank.communicate(timeout=90) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (out, err) in zip(ranks, outs):
        assert rank.returncode == 0 and "WORLDS-OK" in out, err[-3000:]
