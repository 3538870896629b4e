"""`stunet-scale evaluate`: per-class Dice paired by class name (stunet_scale/evaluate.py). Fast: tiny NIfTIs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stunet_scale.cli import main
from stunet_scale.evaluate import EvaluationError, dice, evaluate, evaluate_case, mean_over_largest

SHAPE = (12, 10, 8)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
NAMES = ["background", "liver", "spleen", "kidney_left", "aorta"]  # prediction value k = NAMES[k]


def _masks() -> dict[str, np.ndarray]:
    m = {n: np.zeros(SHAPE, bool) for n in NAMES[1:]}
    m["liver"][0:6, 0:6, 0:6] = True  # 216 voxels
    m["spleen"][7:11, 0:4, 0:4] = True  # 64
    m["kidney_left"][7:10, 6:9, 4:7] = True  # 27
    return m  # aorta: empty


def _save(data: np.ndarray, path: Path, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), affine), str(path))
    return path


def _totalseg_case(root: Path, masks: dict[str, np.ndarray], affine=AFFINE) -> Path:
    for n, m in masks.items():
        _save(m, root / "segmentations" / f"{n}.nii.gz", affine)
    _save(np.zeros(SHAPE), root / "segmentations" / "brain.nii.gz", affine)  # a class the model lacks
    return root


def _label_map(masks: dict[str, np.ndarray], names=NAMES) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    for n, m in masks.items():
        lab[m] = names.index(n)
    return lab


def _export_dir(root: Path, names=NAMES) -> Path:
    """An export folder as `stunet-scale export` lays it out: label names in hf/config.json."""
    (root / "hf").mkdir(parents=True, exist_ok=True)
    (root / "hf" / "config.json").write_text(json.dumps({"labels": {str(k): n for k, n in enumerate(names)}}))
    return root


def test_dice_convention():
    a, e = np.array([1, 1, 0, 0], bool), np.zeros(4, bool)
    assert dice(a, a) == 1.0
    assert math.isnan(dice(e, e))  # both empty: nothing to score
    assert dice(a, e) == 0.0  # reference empty, prediction not: a false positive
    assert dice(e, a) == 0.0
    assert dice(a, np.array([1, 0, 1, 0], bool)) == 0.5


def test_perfect_prediction_scores_one_and_empty_classes_are_nan(tmp_path):
    masks = _masks()
    case = _totalseg_case(tmp_path / "s0001", masks)
    pred = _save(_label_map(masks), tmp_path / "pred.nii.gz")
    r = evaluate_case(pred, case, _export_dir(tmp_path / "export"))
    assert r.dice == {"liver": 1.0, "spleen": 1.0, "kidney_left": 1.0, "aorta": r.dice["aorta"]}
    assert math.isnan(r.dice["aorta"])  # empty in both
    assert r.reference_voxels == {"liver": 216, "spleen": 64, "kidney_left": 27, "aorta": 0}
    assert r.unmatched["reference_only"] == ["brain"]
    assert r.volumes["liver"] == pytest.approx(216 * 1.5 * 1.5 * 2.0)
    assert r.to_json()["dice"]["aorta"] is None


def test_permuted_label_map_is_caught_by_names(tmp_path):
    masks = _masks()
    case = _totalseg_case(tmp_path / "s0001", masks)
    # the network's value for liver is written where the spleen is and vice versa
    swapped = ["background", "spleen", "liver", "kidney_left", "aorta"]
    pred = _save(_label_map(masks, swapped), tmp_path / "pred.nii.gz")
    r = evaluate_case(pred, case, NAMES)  # an explicit list of names works too
    assert r.dice["liver"] == 0.0 and r.dice["spleen"] == 0.0 and r.dice["kidney_left"] == 1.0
    # a false positive where the reference is empty scores 0, not NaN
    lab = _label_map(masks)
    lab[0, 9, 7] = NAMES.index("aorta")
    r = evaluate_case(_save(lab, tmp_path / "fp.nii.gz"), case, NAMES)
    assert r.dice["aorta"] == 0.0


def test_nnunet_reference_is_paired_by_name_not_value(tmp_path):
    masks = _masks()
    # the reference numbers its classes differently from the prediction
    ref_names = ["background", "aorta", "kidney_left", "liver", "spleen"]
    raw = tmp_path / "Dataset001_X"
    ref = _save(_label_map(masks, ref_names), raw / "labelsTr" / "c1.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"labels": {n: k for k, n in enumerate(ref_names)},
                                                  "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    pred = _save(_label_map(masks), tmp_path / "pred" / "c1.nii.gz")
    r = evaluate_case(pred, ref, NAMES)  # dataset.json found above labelsTr/
    assert r.dice["liver"] == r.dice["spleen"] == r.dice["kidney_left"] == 1.0
    # the folder form pairs cases by file name; the labels.json predict writes is the default
    (tmp_path / "pred" / "labels.json").write_text(json.dumps({"labels": {str(k): n for k, n in enumerate(NAMES)}}))
    ev = evaluate(tmp_path / "pred", raw / "labelsTr")
    assert [c.case for c in ev.cases] == ["c1"] and ev.mean() == 1.0
    # predict on one file writes <case>.labels.json beside it instead
    (tmp_path / "pred" / "labels.json").rename(tmp_path / "pred" / "c1.labels.json")
    assert evaluate(tmp_path / "pred", raw / "labelsTr").mean() == 1.0


def test_geometry_mismatch_names_both_files_and_the_fix(tmp_path):
    masks = _masks()
    case = _totalseg_case(tmp_path / "s0001", masks)
    moved = AFFINE.copy()
    moved[:3, 3] = [3.0, 0.0, 0.0]  # two voxels off
    pred = _save(_label_map(masks), tmp_path / "moved.nii.gz", moved)
    with pytest.raises(EvaluationError, match="geometry mismatch") as e:
        evaluate_case(pred, case, NAMES)
    assert "moved.nii.gz" in str(e.value) and "s0001" in str(e.value) and "stunet-scale predict" in str(e.value)
    small = _save(np.zeros((12, 10, 7)), tmp_path / "small.nii.gz")
    with pytest.raises(EvaluationError, match="shape"):
        evaluate_case(small, case, NAMES)


def test_mean_over_largest():
    d = {"a": 1.0, "b": 0.5, "c": 0.0, "d": math.nan, "e": 0.2}
    v = {"a": 100.0, "b": 50.0, "c": 10.0, "d": 0.0, "e": 1.0}
    assert mean_over_largest(d, v, k=2) == 0.75
    assert mean_over_largest(d, v, k=10) == pytest.approx((1 + 0.5 + 0 + 0.2) / 4)  # d is absent: not a candidate
    assert math.isnan(mean_over_largest({"d": math.nan}, {"d": 0.0}))


def test_cli_exit_codes_table_and_json(tmp_path, capsys):
    masks = _masks()
    case = _totalseg_case(tmp_path / "s0001", masks)
    pred = _save(_label_map(masks), tmp_path / "pred.nii.gz")
    export = _export_dir(tmp_path / "export")
    out = tmp_path / "res" / "dice.json"
    assert main(["evaluate", str(pred), str(case), "--labels", str(export), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "liver" in text and "mean dice" in text
    res = json.loads(out.read_text())
    assert res["mean_dice"] == 1.0 and res["mean_dice_per_class"]["aorta"] is None
    assert res["largest_10"] == ["liver", "spleen", "kidney_left"]
    assert res["cases"][0]["dice"]["liver"] == 1.0
    # --goal: the quickstart's closing line; a missed goal exits 1
    assert main(["evaluate", str(pred), str(case), "--labels", str(export), "--goal", "0.75"]) == 0
    assert "goal: mean Dice over the 10 largest classes present >= 0.75: met (1.0000)" in capsys.readouterr().out
    lm = _label_map(masks)
    lm[lm == lm.max()] = 0  # one of the three classes predicted nowhere: mean 2/3
    worse = _save(lm, tmp_path / "worse.nii.gz")
    assert main(["evaluate", str(worse), str(case), "--labels", str(export), "--goal", "0.75"]) == 1
    assert "NOT met (0.6667)" in capsys.readouterr().out
    # usage errors: no label names, a label file without labels, another grid, a missing argument
    assert main(["evaluate", str(pred), str(case)]) == 2
    (tmp_path / "bad.json").write_text("{}")
    assert main(["evaluate", str(pred), str(case), "--labels", str(tmp_path / "bad.json")]) == 2
    other = _save(np.zeros((5, 5, 5)), tmp_path / "other.nii.gz")
    assert main(["evaluate", str(other), str(case), "--labels", str(export / "hf" / "config.json")]) == 2
    assert "geometry mismatch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(pred)])
    assert e.value.code == 2


def test_surface_metrics_use_the_files_anisotropic_spacing_and_per_class_tolerance(tmp_path):
    masks = _masks()
    case = _totalseg_case(tmp_path / "s0001", masks)
    lab = _label_map(masks)
    lab[lab == NAMES.index("liver")] = 0
    lab[0:6, 0:6, 1:7] = NAMES.index("liver")  # the liver one slice (2 mm) deeper along z
    lab[0, 9, 7] = NAMES.index("aorta")  # a false positive where the reference is empty
    pred = _save(lab, tmp_path / "pred.nii.gz")
    tol = tmp_path / "tol.json"
    tol.write_text(json.dumps({"default": 1.0, "liver": 2.0}))
    r = evaluate_case(pred, case, NAMES, nsd_tolerance=tol)
    from stunet_scale.surface_metrics import class_metrics

    spacing = (1.5, 1.5, 2.0)
    liver = class_metrics(lab == 1, masks["liver"], spacing, 2.0)
    assert r.spacing == list(spacing)
    assert r.metrics["hd95"]["liver"] == pytest.approx(liver["hd95"]) and liver["hd95"] == pytest.approx(2.0)
    assert r.metrics["nsd"]["liver"] == pytest.approx(liver["nsd"]) and liver["nsd"] == 1.0  # within 2 mm everywhere
    assert evaluate_case(pred, case, NAMES, nsd_tolerance=1.0).metrics["nsd"]["liver"] < 1.0  # 1 mm is not enough
    assert r.metrics["hd95"]["spleen"] == 0.0 and r.metrics["nsd"]["spleen"] == 1.0
    # one-sided miss: dice 0, nsd 0, hd95 inf ("inf" in JSON); both empty would be NaN
    assert (r.dice["aorta"], r.metrics["nsd"]["aorta"], r.metrics["hd95"]["aorta"]) == (0.0, 0.0, math.inf)
    assert r.to_json()["hd95"]["aorta"] == "inf"
    with pytest.raises(EvaluationError, match="liver"):
        evaluate_case(pred, case, NAMES, nsd_tolerance={"liver": -1})
    with pytest.raises(EvaluationError, match="nope.json"):
        evaluate_case(pred, case, NAMES, nsd_tolerance=str(tmp_path / "nope.json"))


def test_folder_in_parallel_writes_json_csv_and_boxplot(tmp_path, capsys):
    import csv

    masks = _masks()
    preds = tmp_path / "pred"
    for i in range(3):
        _totalseg_case(tmp_path / "ref" / f"s{i:04d}", masks)
        lab = _label_map(masks)
        if i == 2:
            lab[lab == NAMES.index("spleen")] = 0  # spleen missed in one case: hd95 inf there
        _save(lab, preds / f"s{i:04d}.nii.gz")
    (preds / "labels.json").write_text(json.dumps({"labels": {str(k): n for k, n in enumerate(NAMES)}}))
    serial = evaluate(preds, tmp_path / "ref")
    out = tmp_path / "res" / "result.json"
    assert main(["evaluate", str(preds), str(tmp_path / "ref"), "--workers", "2", "--out", str(out)]) == 0
    assert "hd95" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res == json.loads(json.dumps(serial.to_json()))  # same numbers as one process, same case order
    assert [c["case"] for c in res["cases"]] == ["s0000", "s0001", "s0002"]
    assert res["mean_dice_per_class"]["spleen"] == pytest.approx(2 / 3)
    assert res["mean_hd95_per_class"]["spleen"] == 0.0 and res["hd95_infinite_per_class"]["spleen"] == 1
    rows = list(csv.DictReader((tmp_path / "res" / "result.csv").open()))
    assert len(rows) == 3 * 4 and rows[0].keys() >= {"case", "class", "dice", "hd95", "nsd"}
    miss = next(r for r in rows if r["case"] == "s0002" and r["class"] == "spleen")
    assert (miss["dice"], miss["hd95"], miss["nsd"]) == ("0.0", "inf", "0.0")
    assert next(r for r in rows if r["class"] == "aorta")["hd95"] == ""  # both empty: not scored
    assert (tmp_path / "res" / "result_boxplot.png").stat().st_size > 1000
    assert main(["evaluate", str(preds), str(tmp_path / "ref"), "--metrics", "dice"]) == 0
    assert "hd95" not in capsys.readouterr().out
