"""`stunet-scale bench prepare` runs both pipelines and reports what it measured (slow: it starts
nnU-Net's fingerprint/plan/preprocess, whose process pools import torch)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("nnunetv2")


@pytest.mark.slow
def test_bench_prepare_reports_both_pipelines(tmp_path, capsys):
    from stunet_scale.cli import main
    from stunet_scale.data.demo import write_demo_dataset

    raw = write_demo_dataset(tmp_path / "raw", cases=1, seed=2)
    assert main(["bench", "prepare", str(raw), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cases"] == 1 and r["class_map"] == "totalseg-v2"
    for side in ("ours_default", "ours_nnunet_settings", "nnunet"):
        assert r[side]["seconds_per_case"] > 0 and r[side]["voxels"] > 0 and r[side]["bytes_per_voxel"] > 0
    assert r["nnunet"]["version"] and r["nnunet"]["preprocess_seconds"] > 0
    # same cases, same 1.5 mm target: nnU-Net's nonzero crop = ours with nnU-Net settings
    assert r["ours_nnunet_settings"]["voxels"] == r["nnunet"]["voxels"]
    # the goal is at most half of nnU-Net's bytes; bytes do not depend on machine load
    # (int16 + uint8 + zstd vs float32 + int8 npz: ~0.24x measured on demo data)
    assert r["bytes_per_voxel_ratio"]["default_vs_nnunet"] <= 0.5
    assert isinstance(r["goal_met"], bool)
