"""Shared fixtures for the `ling` tests: offline environment, the tiny preset and a seeded tiny model."""

import os
import tempfile

os.environ["HF_DATASETS_OFFLINE"] = "1"
# Tokenised sources and datasets' own caches go to a fresh folder, never the user's cache.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="ling-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import ling  # noqa: E402
from ling.model import build_model  # noqa: E402

# The test tensors are tiny: one intra-op thread is faster than two, and it keeps the suite fast when
# another process holds a core (torch._grouped_mm on CPU then spends ~0.2 s per call waiting on
# its second thread).
torch.set_num_threads(1)


@pytest.fixture
def tiny_config():
    return ling.preset("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config)


@pytest.fixture(autouse=True)
def _isolate_lightning_globals():
    """Lightning's seed_everything (run by the CLI tests) exports PL_GLOBAL_SEED, which distributed
    strategies re-seed from at setup; clear it so later tests start from their own seeds."""
    yield
    os.environ.pop("PL_GLOBAL_SEED", None)
    # Lightning's process launchers set the thread count (and OMP_NUM_THREADS) for their processes.
    torch.set_num_threads(1)
    # trainer.deterministic (the CPU configs set it) switches torch's deterministic mode on process-wide.
    torch.use_deterministic_algorithms(False)
