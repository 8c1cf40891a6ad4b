"""The `torchdist` command: launch (real processes through torchrun), env, estimate-memory."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from torchdist.cli import launch_command, main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _torchdist(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_DISTRIBUTED_DEBUG": "OFF"}
    return subprocess.run(
        [sys.executable, "-m", "torchdist.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


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


def _launch_args(**changes):
    import argparse

    args = dict(
        nproc=None, nnodes=1, node_rank=0, master_addr="", master_port=29500, max_restarts=0,
        mesh="", script=__file__, script_args=["--x", "1"], timeout=600.0, rdzv_timeout=600.0,
        rdzv_id="torchdist",
    )  # fmt: skip
    return argparse.Namespace(**{**args, **changes})


def test_launch_command_says_what_it_chose_and_passes_the_mesh():
    cmd, env, said = launch_command(_launch_args(mesh="dp_shard=1"))
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=1"]
    assert "--standalone" in cmd and cmd[-3:] == [__file__, "--x", "1"]
    assert env == {"TORCHDIST_MESH": "dp_shard=1", "TORCHDIST_TIMEOUT": "600"}
    assert "no GPU" in said and "world 1" in said
    multi = _launch_args(nproc=4, nnodes=2, master_addr="10.0.0.1", mesh="dp_shard=4,tp=2")
    cmd, _, said = launch_command(multi)
    assert "--nnodes=2" in cmd and "--master-addr=10.0.0.1" in cmd and "--standalone" not in cmd
    assert "world 8" in said


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"nproc": 0}, "-n 0: expected at least one process"),
        ({"nproc": 2, "script": "no_such_train.py"}, "'no_such_train.py': no such file"),
        ({"nproc": 2, "script": str(ROOT)}, "a directory"),
        ({"nproc": 2, "mesh": "dp_shard=two"}, "no integer size"),
        ({"nproc": 2, "mesh": "dp_shard=2,tp=2"}, "--mesh dp_shard=2,tp=2 on world 2"),
        ({"nproc": 2, "mesh": "ep=2"}, "unknown mesh axis 'ep'"),
    ],
)
def test_launch_checks_n_script_and_mesh_before_starting_anything(changes, says):
    from torchdist.cli import UsageError

    with pytest.raises(UsageError, match=re.escape(says)):
        launch_command(_launch_args(**changes))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["launch"],
        ["launch", "-n", "x", "t.py"],
        ["launch", "-n", "2", "--mesh", "tp=3", __file__],
        ["estimate-memory", "--params", "many"],
        ["estimate-memory", "--params", "7e9", "--world", "8", "--mesh", "dp_shard=3"],
        ["estimate-memory", "--model", "/no/such/model"],
        ["estimate-memory", "--params", "7e9", "--seq", "2048", "--batch", "1"],
        ["estimate-memory", "--params", "7e9", "--dtype", "fp64"],
        ["plot", "/no/such/metrics.jsonl"],
    ],
)
def test_bad_arguments_anywhere_are_one_line_and_exit_2(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("torchdist"), captured.err
    assert "Traceback" not in captured.err


def test_version_and_help_text_on_every_option(capsys):
    import torchdist
    from torchdist.cli import _parser

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == "torchdist 0.1.0"
    assert torchdist.__version__ == "0.1.0"
    parser = _parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in {"torchdist": parser, **commands}.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_bad_arguments_from_the_shell_print_no_traceback():
    result = _torchdist("launch", "-n", "2", "missing_script.py", timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "missing_script.py" in result.stderr


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
    assert "exactly one of --params" in capsys.readouterr().err


def test_estimate_memory_reads_a_model_directory_and_estimates_activations(tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    model = tmp_path / "tiny-llama"
    model.mkdir()
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 100}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    save_file({"a": torch.zeros(10, 10), "b": torch.zeros(5)}, str(model / "model.safetensors"))
    argv = ["estimate-memory", "--model", str(model), "--dtype", "fp32", "--optimizer", "adamw",
            "--seq", "128", "--batch", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "parameters: 105 (counted from the headers of 1 safetensors file(s))" in out
    assert len([line for line in out.splitlines() if " adamw " in line]) == 4  # one optimizer
    assert "(fp32)" in out and "with checkpoint_activations" in out and "assumptions:" in out
    (model / "model.safetensors").unlink()
    assert main(["estimate-memory", "--config", str(model / "config.json")]) == 0
    assert "computed from config.json shapes" in capsys.readouterr().out


def test_just_alone_lists_the_tasks():
    import shutil

    here = str(pathlib.Path(sys.executable).parent)
    just = shutil.which("just") or shutil.which("just", path=here)
    if just is None:
        pytest.skip("just is not installed (rust-just is in .[dev])")
    result = subprocess.run([just], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for task in ("test", "demo", "notebook", "plot", "bench", "lint"):
        assert re.search(rf"^\s+{task}\b", result.stdout, re.M), result.stdout


def test_plot_command_draws_a_metrics_file(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (it is in .[dev])")
    import json

    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps({"step": s, "time": 0.0, "loss": 1 / s, "lr": 0.1}) + "\n"
                             for s in range(1, 20)))  # fmt: skip
    assert main(["plot", str(jsonl), "--keys", "loss", "--log-y"]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'loss.png'}: loss"
    assert (tmp_path / "loss.png").stat().st_size > 5_000
    assert main(["plot", str(jsonl), "--keys", "accuracy"]) == 2
    assert "the metrics it holds are ['loss', 'lr']" in capsys.readouterr().err
