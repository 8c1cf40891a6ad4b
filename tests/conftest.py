"""Shared test setup.

``TORCH_DISTRIBUTED_DEBUG=DETAIL`` is set before torch is imported so that gloo reports a
mismatched collective at once instead of hanging (TESTING.md). Every test has a timeout
(pyproject: pytest-timeout) so a hang becomes a failure. ``TORCH_EXTENSIONS_DIR`` defaults to
``.cache/torch_extensions/`` in the repo so DeepSpeed's JIT-built CPU op is compiled once.
"""

import gc
import os

os.environ.setdefault("TORCH_DISTRIBUTED_DEBUG", "DETAIL")

import pytest  # noqa: E402
import torch  # noqa: E402

# DeepSpeed JIT-builds its CPU shared-memory comm op (~30 s of compiling) when an engine's comm
# backend starts. Torch caches the build in TORCH_EXTENSIONS_DIR; a folder inside the repo
# (git-ignored, per torch version) makes that once per checkout instead of once per fresh machine
# or home. Spawned ranks inherit it.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    os.path.join(_ROOT, ".cache", "torch_extensions", f"torch-{torch.__version__}"),
)

# Two xdist workers share two cores: OpenMP workers spinning in each would only contend.
torch.set_num_threads(1)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what is alive after collection (torch, transformers, the test modules: some 300,000
    objects that live for the session) out of the cyclic collector's reach. A full collection
    otherwise walks all of them, and in an in-process world it stops every rank thread while it
    does (rank agreement, sharding and HF parity in one worker: 57 s before, 47 s after).
    torchdist's own forks keep the freeze (``_forksafe.collector_frozen``)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def emulated_fp8_matmuls():
    """CPU fp8 matmuls on torch's emulated path for the test (``_precision_models.onednn_off``)."""
    from _precision_models import onednn_off

    with onednn_off():
        yield
