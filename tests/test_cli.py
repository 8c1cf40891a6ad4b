"""The `torchdist` command: launch (real processes through torchrun), env, estimate-memory."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from torchdist.cli import launch_command, main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _torchdist(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_DISTRIBUTED_DEBUG": "OFF"}
    return subprocess.run(
        [sys.executable, "-m", "torchdist.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


@pytest.mark.multiprocess
def test_launch_two_ranks_trains_and_both_report_the_same_world():
    result = _torchdist("launch", "-n", "2", "examples/train_gpt.py", "--steps", "3",
                        "--log-every", "1", "--loss-curve", "")  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    worlds = re.findall(r"rank (\d): world (\d+), mesh (\{.*\})", output)
    assert sorted(w[0] for w in worlds) == ["0", "1"]
    assert {w[1:] for w in worlds} == {
        ("2", "{'pp': 1, 'dp_replicate': 1, 'dp_shard': 2, 'cp': 1, 'tp': 1}")
    }
    assert "world 2" in result.stderr  # launch says what it chose
    assert "final loss" in output


@pytest.mark.multiprocess
def test_launch_of_a_failing_rank_exits_non_zero_with_its_traceback(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        "import torchdist as td\n"
        "topo = td.Topology.from_env(device='cpu')\n"
        "def explode():\n"
        "    raise ValueError(f'rank {topo.rank} cannot go on')\n"
        "if topo.rank == 1:\n"
        "    explode()\n"
    )
    result = _torchdist("launch", "-n", "2", str(script))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ValueError: rank 1 cannot go on" in output
    assert "in explode" in output  # rank 1's own traceback, not just a summary


def test_launch_command_says_what_it_chose_and_passes_the_mesh():
    import argparse

    args = argparse.Namespace(
        nproc=None, nnodes=1, node_rank=0, master_addr="", master_port=29500, max_restarts=0,
        mesh="dp_shard=2,tp=2", script="t.py", script_args=["--x", "1"],
    )  # fmt: skip
    cmd, env, said = launch_command(args)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=1"]
    assert "--standalone" in cmd and cmd[-3:] == ["t.py", "--x", "1"]
    assert env == {"TORCHDIST_MESH": "dp_shard=2,tp=2"}
    assert "no GPU" in said and "world 1" in said
    multi = argparse.Namespace(**{**vars(args), "nproc": 4, "nnodes": 2, "master_addr": "10.0.0.1"})
    cmd, _, said = launch_command(multi)
    assert "--nnodes=2" in cmd and "--master-addr=10.0.0.1" in cmd and "--standalone" not in cmd
    assert "world 8" in said


def test_launch_rejects_a_bad_mesh_before_starting_anything():
    import argparse

    from torchdist import TopologyError

    args = argparse.Namespace(
        nproc=2, nnodes=1, node_rank=0, master_addr="", master_port=29500, max_restarts=0,
        mesh="dp_shard=two", script="t.py", script_args=[],
    )  # fmt: skip
    with pytest.raises(TopologyError, match="no integer size"):
        launch_command(args)


def test_env_lists_versions_backends_and_extras(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "optree", "safetensors", "torchao", "deepspeed", "msamp", "gloo"):
        assert name in out
    assert "not installed" in out  # msamp is not on the package index


def test_estimate_memory_for_seven_billion_parameters_on_eight_ranks(capsys):
    assert main(["estimate-memory", "--params", "7e9", "--world", "8"]) == 0
    out = capsys.readouterr().out
    shard = next(line for line in out.splitlines() if line.startswith("shard") and "adamw " in line)
    assert float(shard.split()[-1]) == pytest.approx(16 * 7e9 / 8 / 2**30, abs=0.01)


def test_estimate_memory_needs_exactly_one_source(capsys):
    assert main(["estimate-memory", "--world", "8"]) == 2
