"""Shared test setup.

``TORCH_DISTRIBUTED_DEBUG=DETAIL`` is set before torch is imported so that gloo reports a
mismatched collective at once instead of hanging (TESTING.md). Every test has a timeout
(pyproject: pytest-timeout) so a hang becomes a failure.
"""

import os

os.environ.setdefault("TORCH_DISTRIBUTED_DEBUG", "DETAIL")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two xdist workers share two cores: OpenMP workers spinning in each would only contend.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield
