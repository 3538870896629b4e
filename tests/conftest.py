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


# Tests write only under their tmp_path: a test that writes into the checkout (e.g. a config left
# at run_dir=runs/debug, which is the user's own quickstart run) fails the session here.
_WATCHED = ("runs", "mlruns", "mlflow.db", "mlartifacts", "data_shards")


def _checkout_snapshot() -> dict[str, float]:
    seen = {}
    for name in _WATCHED:
        top = REPO / name
        if top.is_file():
            seen[name] = top.stat().st_mtime
        elif top.is_dir():
            for p in top.rglob("*"):
                seen[str(p.relative_to(REPO))] = p.stat().st_mtime if p.is_file() else 0.0
    return seen


def pytest_sessionstart(session):
    session.config._checkout_before = _checkout_snapshot()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_checkout_before", None)
    if before is None or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    after = _checkout_snapshot()
    changed = sorted(k for k, v in after.items() if before.get(k) != v)
    if changed:
        print(f"\nERROR: the tests wrote into the checkout ({REPO}): {', '.join(changed[:10])}"
              f"{' ...' if len(changed) > 10 else ''}. Tests must write only under tmp_path.")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present on this machine")
    return SHARED


@pytest.fixture(scope="session")
def prepared_demo(tmp_path_factory) -> Path:
    """A small prepared store (4 demo phantoms, STU-Net class map, Zarr + WebDataset) shared by the data tests."""
    from stunet_scale.data.ingest.demo import make_demo_store

    return make_demo_store(tmp_path_factory.mktemp("prepared_demo"), cases=4, seed=0, format="both")
