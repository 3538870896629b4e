"""`stunet-scale bench data`: runs end to end on a small store and reports the documented keys."""

from __future__ import annotations

import json
import subprocess
import sys

import torch


def test_bench_data_reports_ours_and_nnunet(prepared_demo):
    out = subprocess.run(
        [sys.executable, "-m", "stunet_scale", "bench", "data", str(prepared_demo), "--json", "--patch", "64",
         "--patches", "4", "--nnunet-patches", "2"],
        capture_output=True, text=True, timeout=300, check=True).stdout
    r = json.loads(out)
    for key in ("cpu_side_patches_per_s_per_core", "cpu_full_aug_patches_per_s_per_core", "nnunet_patches_per_s_per_core"):
        assert r[key] > 0, key
    assert r["cpu_side_patches_per_s_per_core"] > r["cpu_full_aug_patches_per_s_per_core"]
    assert r["cpu_full_aug_vs_nnunet"] == r["cpu_full_aug_patches_per_s_per_core"] / r["nnunet_patches_per_s_per_core"]
    assert "gpu_aug_ms_per_batch" in r and r["threads"] == 1 and r["initial_patch"] == [102, 102, 102]
    if not torch.cuda.is_available():
        assert r["gpu_aug_ms_per_batch"] is None  # the documented null without a GPU, not 0 or NaN
