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


@pytest.fixture(scope="session")
def quick_root(tmp_path_factory):
    """bench/headline.py's quick run, built once per session: a trained tiny teacher, its data,
    and RUN (`run/`) with phase 1 and scores done. Tests that write into it copy it first."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "headline.py"
    spec = importlib.util.spec_from_file_location("headline_quick", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path_factory.mktemp("quick")
    mod.make_quick_run(root, log=lambda *_: None)
    return root
