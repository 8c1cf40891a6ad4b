"""Every Python block of README.md runs verbatim, given only what the README says the user
supplies (``build_model``, ``batches``), on 1 and 2 ranks; its command lines run too."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys

import pytest
import torch

from torchdist.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)
BASH = re.findall(r"```bash\n(.*?)```", README, re.S)
LAUNCHER = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHDIST_MESH",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")  # fmt: skip


def _user_supplies() -> dict:
    """What "Twenty lines" says the user brings: a model and global batches (same on all ranks)."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(8)]  # fmt: skip

    def build_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    return {"build_model": build_model, "batches": batches, "__name__": "__main__"}


def _run_block(code: str, env: dict[str, str]) -> dict[str, torch.Tensor]:
    for key in LAUNCHER:
        os.environ.pop(key, None)
    os.environ.update(env)
    namespace = _user_supplies()
    exec(compile(code, "README.md", "exec"), namespace)
    return {k: v.detach().clone() for k, v in namespace["state"].model.state_dict().items()}


def _rank_main(code, env, queue):
    try:
        weights = {k: v.tolist() for k, v in _run_block(code, env).items()}  # no shared memory
        queue.put((env["RANK"], weights, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put((env["RANK"], None, repr(exc)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readme_has_the_blocks_this_file_runs():
    """A new Python block in README.md needs a test here that runs it verbatim."""
    assert len(PYTHON) == 2, f"README.md has {len(PYTHON)} Python blocks; this file runs 2"
    assert "split_between_ranks" in PYTHON[0] and "in_process" in PYTHON[1]


@pytest.mark.multiprocess
def test_twenty_lines_run_verbatim_on_one_and_two_ranks_and_agree(monkeypatch):
    code = PYTHON[0]
    for key in LAUNCHER:
        monkeypatch.delenv(key, raising=False)
    single = _run_block(code, {})  # plain `python train.py`
    port = str(_free_port())
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(code, {
            "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, queue), daemon=True)
        for r in range(2)
    ]  # fmt: skip
    for proc in procs:
        proc.start()
    results = dict((rank, (weights, error)) for rank, weights, error in
                   (queue.get(timeout=120) for _ in procs))  # fmt: skip
    for proc in procs:
        proc.join(timeout=30)
    assert all(error is None for _, error in results.values()), results
    for rank in ("0", "1"):  # 2 ranks on half batches each == 1 rank on the whole batches
        weights = results[rank][0]
        for name, value in single.items():
            torch.testing.assert_close(torch.tensor(weights[name]), value, atol=1e-5, rtol=1e-4)


def test_in_process_block_runs_verbatim():
    namespace: dict = {}
    exec(compile(PYTHON[1], "README.md", "exec"), namespace)
    result = namespace["td"].in_process(
        lambda topo: namespace["td"].all_reduce(torch.ones(2), topo), 4, dp_shard=2, tp=2
    )
    assert all(torch.equal(r, torch.full((2,), 4.0)) for r in result)


def _commands(prefix: str) -> list[list[str]]:
    lines = [line.split("#")[0].strip() for block in BASH for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith(prefix)]


def test_readme_estimate_memory_and_env_lines_run(capsys, tmp_path):
    for argv in _commands("torchdist estimate-memory"):
        if "--model" in argv:  # the user's local model directory: a Llama-2-7B config here
            model = tmp_path / "llama"
            model.mkdir()
            (model / "config.json").write_text(
                '{"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, '
                '"num_attention_heads": 32, "vocab_size": 32000}'
            )
            argv[argv.index("--model") + 1] = str(model)
        assert main(argv) == 0, argv
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "activations per rank" in out and "assumptions:" in out


@pytest.mark.multiprocess
def test_readme_launch_line_works_end_to_end(tmp_path):
    """The headline: 4 ranks, FSDP2 x tensor parallel, the layout taken from --mesh."""
    [argv] = [a for a in _commands("torchdist launch") if "--mesh" in a]
    argv += ["--steps", "2", "--log-every", "1", "--run-dir", str(tmp_path)]  # small steps
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    result = subprocess.run([sys.executable, "-m", "torchdist.cli", *argv], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "mesh dp_shard=2,tp=2" in result.stderr and "world 4" in result.stderr
    assert "training: tp, shard" in output and "final loss" in output
    meshes = set(re.findall(r"rank \d: world 4, mesh (\{[^}]*\})", output))  # lines interleave
    assert meshes == {"{'pp': 1, 'dp_replicate': 1, 'dp_shard': 2, 'cp': 1, 'tp': 2}"}
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
