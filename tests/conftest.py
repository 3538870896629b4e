"""Shared test fixtures. Tests must pass without ../shared; they use it only when it exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONTRACTS = Path(__file__).with_name("contracts")

# DeepSpeed picks its accelerator at import; tests always run it on CPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present on this machine")
    return SHARED


@pytest.fixture(scope="session")
def prepared_demo(tmp_path_factory) -> Path:
    """A small prepared store (4 demo phantoms, STU-Net class map, Zarr + WebDataset) shared by the data tests."""
    from stunet_scale.data.demo import make_demo_store

    return make_demo_store(tmp_path_factory.mktemp("prepared_demo"), cases=4, seed=0, format="both")
