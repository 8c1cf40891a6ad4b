"""The GPU acceptance script's ``--cpu`` smoke mode, so the script is known to work before a GPU
is lent: every row (bf16, fp8 tensorwise, fp8 rowwise; torchdist's composed step and the
hand-written torchao loop; compile off and on) runs on a tiny Llama-style model, the table and
the bf16 parity lines are printed, and the run is accepted. Also the compile benchmark's adapter
(``benchmarks/compile.py``'s ``apply_compile``), which the GPU script reaches ``compile`` through.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from _precision_models import onednn_off

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("torchao")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _smoke(argv: list[str]) -> int:
    """The acceptance script's ``main(argv)``, in this process; the process-wide settings its
    ``--cpu`` mode changes (threads, oneDNN) are put back afterwards."""
    acceptance = _load("bench_gpu_acceptance", "benchmarks/gpu/acceptance.py")
    threads = torch.get_num_threads()
    try:
        with onednn_off():  # restores the oneDNN switch the script turns off
            return acceptance.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_gpu_acceptance_cpu_smoke_runs_every_row_and_passes_parity(capsys):
    rc = _smoke(["--cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    table = [line for line in out.splitlines() if line.split()[:1] in (["bf16"], ["tensorwise"],
                                                                       ["rowwise"])]  # fmt: skip
    rows = [line for line in table if "parity" not in line]
    assert len(rows) == 12, out  # 3 recipes x {td, hand} x compile {off, on}
    assert not any("error" in row or "skipped" in row for row in rows), out
    assert out.count("PASS") == 2 and "ACCEPTED" in out and "NOT ACCEPTED" not in out, out


def test_run_sh_forwards_arguments_to_the_script():
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks/gpu/run.sh"), "--help"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--cpu" in out.stdout and "--budget-s" in out.stdout


def test_apply_compile_compiles_through_torchdist_whichever_kind_compile_is():
    bench = _load("bench_compile", "benchmarks/compile.py")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    compiled, transforms = bench.apply_compile(model, ("outer",), backend="eager")
    import torchdist.transforms as T

    kind_is_model = len(transforms) == 1
    if kind_is_model:  # compile is a model transform: applied now, step transforms unchanged
        assert transforms == ("outer",)
        assert "compile" in __import__("torchdist").marks.applied(compiled)
    else:  # a step transform: appended innermost
        assert transforms[0] == "outer" and getattr(transforms[1], "name", "") == "compile"
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), model(x))
    assert callable(T.compile)


def test_gpu_acceptance_budget_skips_rows_and_nothing_measured_is_not_accepted(capsys):
    """A spent budget skips every row, names why, and a run that measured no parity fails."""
    rc = _smoke(["--cpu", "--budget-s", "-1", "--recipes", "bf16"])
    out = capsys.readouterr().out
    assert rc == 1, out
    rows = [line for line in out.splitlines() if line.startswith("bf16 ") and "parity" not in line]
    assert len(rows) == 4 and all("skipped: time budget" in row for row in rows), out
    assert "not measured" in out and "NOT ACCEPTED" in out, out
