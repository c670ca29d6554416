"""Shared test settings."""

import os

# Set before torch is imported: spinning OpenMP workers slow every other process on a
# small shared machine several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models run fastest so on a shared 2-core machine,
    and results compare bit for bit with `OMP_NUM_THREADS=1` subprocesses."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
