"""FLOPs are counted from the real module graph on the meta device, never hard-coded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CONTRACTS

from stunet_scale.models import forward_flops, train_step_flops

REFERENCE = json.loads((CONTRACTS / "stunet_released_state_dicts.json").read_text())["models"]
# The figures, TFLOP per 1x1x128^3 forward pass.
QUOTED_TFLOP = {"S": 0.259, "B": 1.012, "L": 7.607, "H": 25.19}


@pytest.mark.parametrize("size,name", [("S", "small"), ("B", "base"), ("L", "large"), ("H", "huge")])
def test_forward_flops_per_128_patch(size, name):
    flops = forward_flops(size)
    assert flops == REFERENCE[name]["forward_flops_per_128cube_patch"]
    assert round(flops / 1e12, 3 if size != "H" else 2) == QUOTED_TFLOP[size]
    assert train_step_flops(size) == 3 * flops


def test_flops_scale_with_patch_and_batch():
    assert forward_flops("S", (64, 64, 64), 2) * 4 == forward_flops("S", (128, 128, 128), 1)


def test_counting_h_does_not_materialise_weights():
    # A fresh interpreter so earlier tests' allocations don't hide the peak. H in fp32 is 5.8 GB.
    code = (
        "from stunet_scale.models import forward_flops; from stunet_scale.tracking import peak_rss_bytes; "
        "forward_flops('H'); print(peak_rss_bytes() // 1024)"
    )
    peak_kb = int(subprocess.check_output([sys.executable, "-c", code], text=True).strip().splitlines()[-1])
    assert peak_kb < 1_500_000, f"peak RSS {peak_kb / 1e6:.2f} GB while counting H"
