"""A cheap version of ``benchmarks/soak.py``'s leak check: worlds created and destroyed one after
another in this process (threads and forked processes) leave no threads, file descriptors,
sockets, listening ports or child processes behind. The 50-world and 2,000-step figures are in
docs/faults.md ("Under load")."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _soak():
    spec = importlib.util.spec_from_file_location("bench_soak", os.path.join(ROOT, "benchmarks",
                                                                             "soak.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.multiprocess
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts in /proc (Linux)")
@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_worlds_one_after_another_leave_nothing_behind(kind):
    first, last, _ = _soak().many_worlds(8, kind)
    grew = {name: last[name] - first[name] for name in first}
    assert grew["threads"] <= 1, (first, last)  # pytest's own timer thread may come and go
    assert {k: v for k, v in grew.items() if k != "threads"} == {
        "fds": 0, "sockets": 0, "listening": 0, "children": 0}, (first, last)  # fmt: skip
