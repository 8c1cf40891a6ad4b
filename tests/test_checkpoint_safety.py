"""Checkpoints that never lose or mix data (issue 15): interrupted renames, retention, ranks that
disagree, a full disk (a real tmpfs), a second job in the same directory, checksums, extras.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

import torchdist as td
from torchdist import checkpoint
from torchdist.checkpoint import _layout
from torchdist.errors import CheckpointError

TOPO = td.Topology.single()


def make_state(seed: int, step: int, features: int = 8) -> td.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(features, features)
    return td.TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         step=step)  # fmt: skip


def weights(state: td.TrainState) -> list[torch.Tensor]:
    return [p.detach().clone() for p in state.model.parameters()]


def loaded(root, features: int = 8, **kw) -> td.TrainState:
    return checkpoint.load(root, make_state(999, 0, features), TOPO, **kw)


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def listing(root) -> list[str]:
    return sorted(os.listdir(root))


# --------------------------------------------------------------------------- atomicity
def test_crash_between_the_two_renames_keeps_the_newest_step(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, make_state(1, 1), TOPO)
    checkpoint.save(tmp_path, make_state(2, 2), TOPO)
    newest = make_state(3, 2)  # step 2 saved again, replacing the first step-2 checkpoint
    real_rename = os.rename

    def crash_before_the_second(src, dst):  # dies once the old step_2 is renamed aside
        if os.path.basename(dst) == "step_00000002" and ".tmp-" in os.path.basename(src):
            raise KeyboardInterrupt("killed between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_before_the_second)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, newest, TOPO)
    monkeypatch.undo()
    assert not (tmp_path / ".torchdist_save.lock").exists()  # released on the way out
    names = listing(tmp_path)
    assert "step_00000002" not in names and any(".old-" in n for n in names)
    assert any(".tmp-" in n for n in names)
    # load finds step 2 (the new save, complete but not renamed) without touching the directory
    assert loaded(tmp_path).step == 2 and same(weights(loaded(tmp_path)), weights(newest))
    # the next save recovers it, and retention counts it as step 2, never as a leftover
    checkpoint.save(tmp_path, make_state(4, 3), TOPO, keep=2)
    assert listing(tmp_path) == ["step_00000002", "step_00000003"]
    assert same(weights(loaded(tmp_path / "step_00000002")), weights(newest))


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (10, 20):
        checkpoint.save(tmp_path, make_state(step, step), TOPO)
    resumed = make_state(5, 5)  # a run resumed from an older step, keep=1
    written = checkpoint.save(tmp_path, resumed, TOPO, keep=1)
    assert os.path.basename(written) in listing(tmp_path)
    # the newest (20) is kept as keep=1 says, and so is the one just written; 10 is pruned
    assert listing(tmp_path) == ["step_00000005", "step_00000020"]
    checkpoint.save(tmp_path, make_state(30, 30), TOPO, keep=1)
    assert listing(tmp_path) == ["step_00000030"]


# --------------------------------------------------------------------------- ranks
def test_ranks_disagreeing_on_the_step_or_path_fail_on_every_rank(tmp_path):
    def fn(topo, kind):
        model = torch.nn.Linear(2, 2)
        step = topo.rank if kind == "step" else 1
        root = tmp_path / (f"r{topo.rank}" if kind == "path" else "same")
        try:
            checkpoint.save(root, td.TrainState(model=model, step=step), topo)
        except CheckpointError as exc:
            return str(exc)
        return "saved"

    steps = td.in_process(fn, 2, "step", timeout=30)
    assert all("disagree on the step being saved (by rank: [0, 1])" in m for m in steps)
    paths = td.in_process(fn, 2, "path", timeout=30)
    assert all("save into different directories" in m for m in paths)
    assert not (tmp_path / "same").exists() and not (tmp_path / "r0").exists()


def test_save_on_one_rank_only_fails_within_the_timeout(tmp_path):
    def fn(topo):
        if topo.rank == 1:
            return "did not call save"
        start = time.monotonic()
        try:
            checkpoint.save(tmp_path, td.TrainState(model=torch.nn.Linear(2, 2), step=1), topo,
                            timeout=1.0)  # fmt: skip
        except CheckpointError as exc:
            return str(exc), time.monotonic() - start
        return "saved"

    (message, waited), _ = td.in_process(fn, 2, timeout=30, debug="OFF")
    assert "not every one of the 2 ranks called save within 1 s" in message
    assert "drop an `if rank == 0:`" in message and waited < 10
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- disk
@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs; needs root, else the test is skipped)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("left", [20_000, 45_000])  # fails in the extras, or inside DCP
def test_disk_full_removes_the_partial_save_and_keeps_the_previous(tiny_disk, left):
    root = tiny_disk / "ckpt"
    first = make_state(1, 1, features=128)  # 66 KB of weights
    checkpoint.save(root, first, TOPO)
    free = shutil.disk_usage(tiny_disk).free
    with open(tiny_disk / "filler", "wb") as f:  # the next save (66 KB) cannot fit
        f.write(b"\0" * (free - left))
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(root, make_state(2, 2, features=128), TOPO)
    message = str(info.value)
    assert f"saving checkpoint {root / 'step_00000002'} failed" in message
    assert "MiB" in message and "bytes) free on the filesystem of" in message
    assert f"the newest complete one, {root / 'step_00000001'}, is intact" in message
    assert listing(root) == ["step_00000001"]  # partial save removed, no lock left
    assert same(weights(loaded(root, features=128)), weights(first))
    os.unlink(tiny_disk / "filler")
    checkpoint.save(root, make_state(3, 3, features=128), TOPO, keep=1)  # later saves work
    assert listing(root) == ["step_00000003"]


def test_a_file_as_the_checkpoint_path_is_a_checkpoint_error(tmp_path):
    (tmp_path / "ckpt").write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"ckpt: it is a file, not a directory"):
        checkpoint.save(tmp_path / "ckpt", make_state(1, 1), TOPO)
    with pytest.raises(CheckpointError, match=r"is a file, not a checkpoint directory"):
        loaded(tmp_path / "ckpt")


def test_a_second_job_saving_into_the_same_directory_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".torchdist_save.lock"
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                    "token": "other", "since": time.time()}))  # fmt: skip
        with pytest.raises(CheckpointError, match=rf"held by pid {other.pid} on host"):
            checkpoint.save(tmp_path, make_state(1, 1), TOPO)
        assert listing(tmp_path) == [".torchdist_save.lock"]
    finally:
        other.kill()
        other.wait()
    checkpoint.save(tmp_path, make_state(1, 1), TOPO)  # its process is gone: a stale lock
    assert listing(tmp_path) == ["step_00000001"]


# --------------------------------------------------------------------------- checksums
def test_verify_detects_a_flipped_byte_and_names_the_file(tmp_path):
    path = checkpoint.save(tmp_path, make_state(1, 1), TOPO)
    marker = json.loads(open(os.path.join(path, _layout.MARKER)).read())
    assert marker["checksums"]["algorithm"] == "sha256"
    data = sorted(n for n in marker["checksums"]["files"] if n.endswith(".distcp"))[0]
    loaded(tmp_path, verify=True)  # intact: fine
    with open(os.path.join(path, data), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(path, data)) - 9)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CheckpointError, match=rf"corrupted: {data} has sha256"):
        loaded(tmp_path, verify=True)
    unchecked = checkpoint.save(tmp_path / "plain", make_state(1, 1), TOPO, checksum=False)
    assert "checksums" not in json.loads(open(os.path.join(unchecked, _layout.MARKER)).read())
    with pytest.raises(CheckpointError, match=r"has no checksums"):
        loaded(tmp_path / "plain", verify=True)


# --------------------------------------------------------------------------- extras
class NoStateScheduler:
    def step(self) -> None: ...


def test_unsaveable_extras_name_each_key_and_a_scheduler_needs_state_dict(tmp_path):
    state = make_state(1, 1).replace(extra={"ok": 1, "fn": lambda: 0, "deep": {"obj": object()}})
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(tmp_path, state, TOPO)
    message = str(info.value)
    assert "TrainState.extra['fn']: a function" in message
    assert "TrainState.extra['deep']['obj']: a object" in message and "'ok'" not in message
    with pytest.raises(CheckpointError, match=r"TrainState.scheduler is a NoStateScheduler .*"
                                              r"no state_dict\(\)"):  # fmt: skip
        checkpoint.save(tmp_path, make_state(1, 1).replace(scheduler=NoStateScheduler()), TOPO)
    assert listing(tmp_path) == []
    checkpoint.save(tmp_path, make_state(1, 1), TOPO)
    with pytest.raises(CheckpointError, match=r"TrainState.scheduler is a NoStateScheduler"):
        checkpoint.load(tmp_path, make_state(1, 0).replace(scheduler=NoStateScheduler()), TOPO)
