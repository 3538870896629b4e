"""Contract: our STU-Net has exactly the keys, order and shapes of the released checkpoints.

This is the promise to every team holding released STU-Net weights: they load with
``load_state_dict(strict=True)``. The reference JSON is a copy kept in tests/contracts so the test
runs without ../shared; when ../shared exists we also check the copy has not drifted.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONTRACTS

from stunet_scale.models import RELEASE_NAMES, build_stunet, count_parameters

REFERENCE = json.loads((CONTRACTS / "stunet_released_state_dicts.json").read_text())["models"]
EXPECTED_KEYS = {"S": 130, "B": 130, "L": 218, "H": 306}
EXPECTED_PARAMS = {"S": 14_596_941, "B": 58_262_669, "L": 440_302_605, "H": 1_457_326_221}


@pytest.mark.parametrize("size", ["S", "B", "L", "H"])
def test_state_dict_matches_release(size):
    ref = REFERENCE[RELEASE_NAMES[size]]["state_dict"]
    with torch.device("meta"):
        model = build_stunet(size)
    sd = model.state_dict()
    assert list(sd) == list(ref), "key names or order differ from the released checkpoint"
    assert len(sd) == EXPECTED_KEYS[size]
    for key, shape in ref.items():
        assert list(sd[key].shape) == shape, key
    n = sum(p.numel() for p in model.parameters())
    assert n == EXPECTED_PARAMS[size] == REFERENCE[RELEASE_NAMES[size]]["params"]
    assert count_parameters(size) == n
    assert not list(model.buffers()), "released checkpoints have no buffers (InstanceNorm without running stats)"


@pytest.mark.parametrize("size", ["L", "H"])
def test_large_presets_load_released_shaped_weights_strict_on_meta(size):
    # Materialising H takes 6 GB; on meta, assign=True still checks every key and shape strictly.
    ref = REFERENCE[RELEASE_NAMES[size]]["state_dict"]
    with torch.device("meta"):
        model = build_stunet(size)
        weights = {k: torch.empty(v) for k, v in ref.items()}
    result = model.load_state_dict(weights, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("size", ["S", "B"])
def test_released_shaped_weights_load_strict_and_are_used(size):
    ref = REFERENCE[RELEASE_NAMES[size]]["state_dict"]
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v, generator=gen) * 0.01 for k, v in ref.items()}
    model = build_stunet(size)
    model.load_state_dict(weights, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_unexpected_key_is_refused():
    model = build_stunet("S")
    sd = model.state_dict()
    sd["module.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict(sd, strict=True)


def test_contract_copy_matches_shared(shared_dir):
    shared = json.loads((shared_dir / "data/reference/stunet_released_state_dicts.json").read_text())
    assert shared["models"] == REFERENCE, "tests/contracts copy drifted from ../shared/data/reference"
