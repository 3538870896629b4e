"""`stunet-scale transfer-study` end to end on a tiny budget (CPU, about a minute).

The whole command: demo pretraining (2 steps at 4 mm) -> `export` -> the downstream nnU-Net raw
dataset -> fine-tuning from the export and from scratch (4 steps each, validation every 2) -> PNG
and table. Checked: the files, the printed table, that the fine-tune run loaded every backbone
tensor of the export and re-initialised exactly the heads, that the scratch run loaded nothing and
is otherwise the identical config, and that validation ran on the held-out cases only.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO


def _study(tmp: Path) -> list[str]:
    return [
        "transfer-study", "--run-dir", str(tmp / "study"),
        "--pretrain-config", str(REPO / "configs" / "debug.yaml"), "--pretrain-cases", "2",
        "--pretrain-set", "schedule.max_steps=2", "--pretrain-set", "validation.enabled=false",
        "--pretrain-set", "tracking.enabled=false", "--pretrain-set", "data.spacing=[4.0,4.0,4.0]",
        "--config", str(REPO / "configs" / "transfer_study.yaml"),
        "--steps", "4", "--val-every", "2", "--train-cases", "2", "--val-cases", "1",
        "tracking.enabled=false", "tracking.log_every_steps=2",
    ]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    import io
    from contextlib import redirect_stdout

    from stunet_scale.cli import main

    tmp = tmp_path_factory.mktemp("transfer")
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(_study(tmp))
    assert code == 0, out.getvalue()
    return tmp / "study", out.getvalue()


def test_png_and_table_written_and_printed(study):
    root, printed = study
    png = root / "transfer_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (root / "transfer_table.md").read_text()
    assert "| fine-tuned from export |" in md and "| from scratch |" in md and "difference" in md
    assert md in printed
    result = json.loads((root / "transfer_table.json").read_text())
    for run in ("finetune", "scratch"):
        s = result["summary"][run]
        assert s["final_step"] == 4 and 0.0 <= s["final_dice"] <= 1.0 and 0.0 <= s["best_dice"] <= 1.0
        assert [p["step"] for p in result["curves"][run]] == [2, 4]
        # per-class Dice under the downstream dataset's names, not class_K
        assert set(s["final_per_class"]) == {"liver", "spleen", "kidneys", "lungs", "great_vessels", "spine"}
    assert result["difference"]["final_dice"] == pytest.approx(
        result["summary"]["finetune"]["final_dice"] - result["summary"]["scratch"]["final_dice"])
    rows = list(csv.DictReader((root / "transfer_table.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert result["pretrain"]["steps"] == 2 and result["wall_s"]["total"] > 0


def test_finetune_loads_backbone_and_reinitialises_head(study):
    from safetensors import safe_open

    root, _ = study
    export = root / "pretrain" / "export"
    with safe_open(str(export / "hf" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    heads = [k for k in keys if k.startswith("seg_outputs.")]
    assert heads
    init = json.loads((root / "transfer_table.json").read_text())["init_from"]
    assert init["present"]
    assert init["loaded_tensors"] == len(keys) - len(heads)  # every backbone tensor
    assert sorted(init["heads_reinitialised"]) == sorted(heads) and not init["other_skipped"]
    report = (root / "finetune" / "init_from_report.txt").read_text()
    assert "head re-initialised" in report and str(export.resolve()) in report
    assert not (root / "scratch" / "init_from_report.txt").exists()


def test_runs_differ_only_in_init_and_architecture_is_the_exports(study):
    root, _ = study
    ft = yaml.safe_load((root / "finetune" / "config.yaml").read_text())
    sc = yaml.safe_load((root / "scratch" / "config.yaml").read_text())
    assert ft["checkpoint"]["init_from"] and sc["checkpoint"]["init_from"] is None
    for cfg in (ft, sc):
        cfg.pop("run_dir")
        cfg["checkpoint"].pop("init_from")
    assert ft == sc
    spec = json.loads((root / "pretrain" / "export" / "hf" / "config.json").read_text())["spec"]
    for key in ("base_width", "blocks_per_stage", "width_multipliers", "in_channels"):
        assert ft["model"][key] == spec["model"][key]
    # the export stores (z, y, x) lists; the trainer runs in (x, y, z)
    assert ft["model"]["pool_strides"] == [s[::-1] for s in spec["model"]["pool_strides"]]
    assert ft["model"]["num_classes"] == 7 != spec["model"]["num_classes"]
    assert ft["data"]["spacing"] == [4.0, 4.0, 4.0] and ft["optim"]["backbone_lr_scale"] is not None


def test_validation_on_held_out_cases_only(study):
    from stunet_scale.data.ingest.sources import read_nnunet_splits

    root, _ = study
    split = read_nnunet_splits(root / "downstream" / "raw")
    assert len(split["train"]) == 2 and len(split["val"]) == 1 and not set(split["train"]) & set(split["val"])
    manifest = json.loads((root / "downstream" / "store" / "manifest.json").read_text())
    got = {c: m["split"] for c, m in manifest["cases"].items()}
    assert got == {**{c: "train" for c in split["train"]}, **{c: "val" for c in split["val"]}}
    assert manifest["source"]["splits_from"] == "splits_final.json (fold 0)"  # prepare read it


def test_downstream_generator_is_reproducible_and_mr_differs():
    from stunet_scale.data.ingest.demo_downstream import GROUPS, downstream_case

    a_img, a_lab, _ = downstream_case(np.random.default_rng([0, 7001, 0]), "ct")
    assert a_img.dtype == np.int16 and set(np.unique(a_lab)) == set(range(len(GROUPS) + 1))  # every class present
    mr, mr_lab, _ = downstream_case(np.random.default_rng([0, 7001, 0]), "mr")
    # the same seed gives the same anatomy whatever the modality
    assert np.array_equal(mr_lab, a_lab) and mr.dtype == np.float32 and mr.min() >= 0
    # another contrast: fat (around -100 HU) brighter than liver in MR, darker in CT
    fat = (a_img > -130) & (a_img < -70) & (a_lab == 0)
    liver = a_lab == 1
    assert a_img[fat].mean() < a_img[liver].mean() and mr[fat].mean() > mr[liver].mean()
