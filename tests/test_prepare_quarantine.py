"""Every quarantine reason code of `stunet-scale prepare`, each from a synthetic bad file.

Tiny 16^3 cases in the TotalSegmentator layout (3 mask files, the other classes recorded as
missing) and one nnU-Net raw dataset; each bad case sits next to good ones, which must still be
prepared. Rows 20-22 of the README's Reliability checks.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stunet_scale.data.ingest.prepare import prepare_dataset
from stunet_scale.data.ingest.sources import REASONS

AFF = np.diag([2.0, 2.0, 2.0, 1.0])
MASKS = ("liver", "spleen", "kidney_left")


def _img(data, affine=AFF, qcode=1, scode=1, qaffine=None):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=scode)
    img.set_qform(affine if qaffine is None else qaffine, code=qcode)
    return img


def _save(img, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _good_case(root: Path, cid: str, shape=(16, 16, 16)):
    ct = np.zeros(shape, np.int16)
    ct[2:-2, 2:-2, 2:-2] = 40
    _save(_img(ct), root / cid / "ct.nii.gz")
    for k, name in enumerate(MASKS):
        m = np.zeros(shape, np.uint8)
        m[3 + 3 * k:6 + 3 * k, 4:10, 4:10] = 1
        _save(_img(m), root / cid / "segmentations" / f"{name}.nii.gz")


def _totalseg_dataset(root: Path, bad: dict) -> Path:
    """Three good cases plus one per entry of ``bad`` (case id -> function damaging that case)."""
    for cid in ("g1", "g2", "g3"):
        _good_case(root, cid)
    for cid, damage in bad.items():
        _good_case(root, cid)
        damage(root / cid)
    return root


def _mask(case: Path, name="liver") -> Path:
    return case / "segmentations" / f"{name}.nii.gz"


def _truncate(path: Path, keep: float = 0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _not_gzip(path: Path):
    path.write_bytes(gzip.decompress(path.read_bytes()))


def _bad_crc(path: Path):
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0xFF  # inside the gzip trailer's CRC32: only a full read to the end notices
    path.write_bytes(bytes(raw))


def _ct(case: Path) -> Path:
    return case / "ct.nii.gz"


DAMAGES = {
    "io_truncated": (lambda c: _truncate(_ct(c)), "IO_CORRUPT", "ct.nii.gz"),
    "io_notgzip": (lambda c: _not_gzip(_ct(c)), "IO_CORRUPT", "ct.nii.gz"),
    "io_crc": (lambda c: _bad_crc(_mask(c)), "IO_CORRUPT", "segmentations/liver.nii.gz"),
    "io_header": (lambda c: _ct(c).write_bytes(gzip.compress(b"\x00" * 100)), "IO_CORRUPT", "ct.nii.gz"),
    "missing_image": (lambda c: _ct(c).unlink(), "MISSING_IMAGE", "ct.nii.gz"),
    "missing_label": (lambda c: [p.unlink() for p in (c / "segmentations").iterdir()] and (c / "segmentations").rmdir(),
                      "MISSING_LABEL", "segmentations"),
    "image_4d": (lambda c: _save(_img(np.zeros((16, 16, 16, 2), np.int16)), _ct(c)), "IMAGE_4D", "ct.nii.gz"),
    "image_2d": (lambda c: _save(_img(np.zeros((16, 16), np.int16)), _ct(c)), "IMAGE_2D", "ct.nii.gz"),
    "shear": (lambda c: _save(_img(np.zeros((16, 16, 16), np.int16), affine=np.array(
        [[2.0, 0.3, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]), qcode=0), _ct(c)), "NON_ORTHONORMAL", "ct.nii.gz"),
    "qsform": (lambda c: _save(_img(np.zeros((16, 16, 16), np.int16), qaffine=np.diag([-2.0, 2.0, 2.0, 1.0])), _ct(c)),
               "QFORM_SFORM_MISMATCH", "ct.nii.gz"),
    "shape": (lambda c: _save(_img(np.zeros((16, 16, 15), np.uint8)), _mask(c)), "SHAPE_MISMATCH", "segmentations/liver.nii.gz"),
    "affine": (lambda c: _save(_img(np.zeros((16, 16, 16), np.uint8), affine=AFF + np.array(
        [[0, 0, 0, 5.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])), _mask(c, "spleen")), "AFFINE_MISMATCH",
               "segmentations/spleen.nii.gz"),
    "nan": (lambda c: _save(_img(np.where(np.arange(16**3).reshape(16, 16, 16) == 7, np.nan, 0).astype(np.float32)), _ct(c)),
            "NONFINITE", "ct.nii.gz"),
    "inf": (lambda c: _save(_img(np.where(np.arange(16**3).reshape(16, 16, 16) == 9, np.inf, 0).astype(np.float32)), _ct(c)),
            "NONFINITE", "ct.nii.gz"),
    "mask_nan": (lambda c: _save(_img(np.full((16, 16, 16), np.nan, np.float32)), _mask(c)), "NONFINITE",
                 "segmentations/liver.nii.gz"),
    "nonintegral": (lambda c: _save(_img(np.full((16, 16, 16), 0.5, np.float32)), _mask(c)), "LABEL_NON_INTEGRAL",
                    "segmentations/liver.nii.gz"),
    "outofrange": (lambda c: _save(_img(np.full((16, 16, 16), 2, np.uint8)), _mask(c, "kidney_left")), "LABEL_OUT_OF_RANGE",
                   "segmentations/kidney_left.nii.gz"),
    "negative": (lambda c: _save(_img(np.full((16, 16, 16), -1, np.int16)), _mask(c)), "LABEL_OUT_OF_RANGE",
                 "segmentations/liver.nii.gz"),
}


@pytest.fixture(scope="module")
def quarantined(tmp_path_factory):
    root = _totalseg_dataset(tmp_path_factory.mktemp("bad_raw"), {cid: d[0] for cid, d in DAMAGES.items()})
    out = tmp_path_factory.mktemp("bad_out")
    result = prepare_dataset(root, out, classes="totalseg-v2", spacing=2.0, format="zarr")
    lines = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    return result, {q["id"]: q for q in lines}, out


@pytest.mark.parametrize("cid", sorted(DAMAGES))
def test_each_defect_is_quarantined_with_its_reason(quarantined, cid):
    _, q, _ = quarantined
    _, code, file = DAMAGES[cid]
    assert cid in q, f"{cid} was not quarantined"
    assert q[cid]["reason"] == code, q[cid]
    assert q[cid]["file"] == f"{cid}/{file}", q[cid]
    assert q[cid]["message"] and set(q[cid]) >= {"id", "reason", "message", "file"}


def test_good_cases_survive_and_the_budget_decides_the_exit_code(quarantined):
    result, q, out = quarantined
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["cases"]) == ["g1", "g2", "g3"]
    assert set(q) == set(DAMAGES)
    assert result["exit_code"] == 1  # 18 of 21 quarantined > 5 %
    assert manifest["quarantine"]["count"] == len(DAMAGES)
    assert set(manifest["quarantine"]["reasons"]) <= set(REASONS)
    # the masks that are not in the folder are missing classes, not background
    g1 = manifest["cases"]["g1"]
    labels = manifest["class_map"]["labels"]
    assert labels.index("pancreas") in g1["missing_classes"]
    assert labels.index("liver") not in g1["missing_classes"] and labels.index("liver") in g1["present_classes"]


def test_quarantine_budget_allows_a_pass(tmp_path):
    root = _totalseg_dataset(tmp_path / "raw", {"bad": lambda c: _truncate(_ct(c))})
    r = prepare_dataset(root, tmp_path / "out", classes="totalseg-v2", spacing=2.0, format="zarr", max_quarantine_fraction=0.5)
    assert r["exit_code"] == 0 and r["quarantined"] == 1


def test_background_only_case_is_prepared_not_quarantined(tmp_path):
    """Empty masks are counted, not a defect: the case is stored with no foreground rows."""
    from stunet_scale.data.store import iter_wds_cases, open_store

    def empty_masks(case: Path):
        for p in (case / "segmentations").iterdir():
            _save(_img(np.zeros((16, 16, 16), np.uint8)), p)

    root = _totalseg_dataset(tmp_path / "raw", {"empty": empty_masks})
    r = prepare_dataset(root, tmp_path / "out", classes="totalseg-v2", spacing=2.0)
    assert r["exit_code"] == 0 and r["quarantined"] == 0 and r["ok"] == 4
    store = open_store(tmp_path / "out")
    case = store.case("empty")
    assert case.fg_locations.shape == (0, 4) and case.present_classes == [] and case.meta["intensity"]["foreground"] is None
    assert case.meta["intensity"]["std"] >= 0 and store.intensity["foreground"]["num_samples"] == 30_000
    wds_case = [c for c in iter_wds_cases(store.wds_shard_paths(), store.manifest) if c.case_id == "empty"][0]
    assert wds_case.fg_locations.shape == (0, 4)


def test_meta_csv_lists_a_case_without_folder(tmp_path):
    root = _totalseg_dataset(tmp_path / "raw", {})
    (root / "meta.csv").write_bytes("\ufeffimage_id;split\ng1;train\ng2;val\ng3;test\nghost;train\n".encode())
    r = prepare_dataset(root, tmp_path / "out", classes="totalseg-v2", spacing=2.0, format="zarr", max_quarantine_fraction=0.5)
    q = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(x["id"], x["reason"]) for x in q] == [("ghost", "MISSING_IMAGE")]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {c: e["split"] for c, e in m["cases"].items()} == {"g1": "train", "g2": "val", "g3": "test"}
    assert r["exit_code"] == 0


@pytest.mark.parametrize("bad", ["validation", "Train", "tset"])
def test_meta_csv_split_typo_stops_the_run(tmp_path, bad):
    # A split outside train/val/test would silently become a new split (and the case would be missing
    # from the one it was meant for): meta.csv is dataset-level, so the run stops before any case.
    from stunet_scale.cli import main
    from stunet_scale.data.ingest.sources import DatasetError

    root = _totalseg_dataset(tmp_path / "raw", {})
    (root / "meta.csv").write_bytes(f"\ufeffimage_id;split\ng1;train\ng2;{bad}\ng3;test\n".encode())
    with pytest.raises(DatasetError) as e:
        prepare_dataset(root, tmp_path / "out", classes="totalseg-v2", spacing=2.0, format="zarr")
    msg = str(e.value)
    assert "meta.csv line 3" in msg and "'g2'" in msg and repr(bad) in msg and "train, val, test" in msg
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert main(["prepare", str(root), str(tmp_path / "out2"), "--classes", "totalseg-v2"]) == 2


def _nnunet_dataset(root: Path, bad_label: np.ndarray | None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = {"background": 0, "liver": 1, "spleen": 2}
    (root / "dataset.json").write_text(json.dumps(
        {"labels": labels, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 3}))
    for i in range(3):
        ct = np.full((16, 16, 16), 30, np.int16)
        _save(_img(ct), root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        lab = np.zeros((16, 16, 16), np.uint8)
        lab[4:8, 4:8, 4:8] = 1
        lab[9:12, 4:8, 4:8] = 2
        if i == 2 and bad_label is not None:
            lab = bad_label
        _save(_img(lab), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    return root


def test_nnunet_label_defects(tmp_path):
    bad = np.zeros((16, 16, 16), np.uint8)
    bad[1, 1, 1] = 7  # dataset.json has 0..2
    root = _nnunet_dataset(tmp_path / "raw", bad)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    prepare_dataset(root, tmp_path / "out", spacing=2.0, format="zarr", max_quarantine_fraction=1.0)
    q = {x["id"]: x for x in map(json.loads, (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines())}
    assert q["case_002"]["reason"] == "LABEL_OUT_OF_RANGE" and "7" in q["case_002"]["message"]
    assert q["case_001"]["reason"] == "MISSING_LABEL"


def test_unexpected_errors_are_quarantined_not_fatal(tmp_path, monkeypatch):
    from stunet_scale.data.ingest import prepare as prep

    root = _totalseg_dataset(tmp_path / "raw", {})
    real = prep.preprocess_case

    def flaky(loaded, *a, **k):
        if loaded.case_id == "g2":
            raise MemoryError("synthetic")
        return real(loaded, *a, **k)

    monkeypatch.setattr(prep, "preprocess_case", flaky)
    r = prepare_dataset(root, tmp_path / "out", classes="totalseg-v2", spacing=2.0, format="zarr", max_quarantine_fraction=0.5)
    q = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(x["id"], x["reason"]) for x in q] == [("g2", "PREPARE_ERROR")] and "MemoryError" in q[0]["message"]
    assert r["ok"] == 2
    # such a case is retried by the next run (the defect was not in the input)
    monkeypatch.setattr(prep, "preprocess_case", real)
    r = prepare_dataset(root, tmp_path / "out", classes="totalseg-v2", spacing=2.0, format="zarr")
    assert r["ok"] == 3 and r["quarantined"] == 0 and r["prepared"] == 1 and r["skipped"] == 2


def test_worker_that_dies_twice_is_quarantined(tmp_path, monkeypatch):
    root = _totalseg_dataset(tmp_path / "raw", {})
    monkeypatch.setenv("STUNET_SCALE_PREPARE_CRASH", "g2")
    r = prepare_dataset(root, tmp_path / "out", classes="totalseg-v2", spacing=2.0, format="zarr", workers=2,
                        max_quarantine_fraction=0.5)
    q = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(x["id"], x["reason"]) for x in q] == [("g2", "WORKER_CRASHED")]
    assert r["ok"] == 2


def test_quarantined_val_or_test_case_fails_the_run_unless_allowed(tmp_path, caplog):
    """Issue 13: a quarantined val/test case shrinks the evaluation set silently; prepare exits 1
    naming it and the flag, even when the quarantine budget would allow it."""
    from stunet_scale.cli import main

    root = _totalseg_dataset(tmp_path / "raw", {"bad": lambda c: _truncate(_ct(c))})
    (root / "meta.csv").write_bytes("\ufeffimage_id;split\ng1;train\ng2;train\ng3;train\nbad;val\n".encode())
    r = prepare_dataset(root, tmp_path / "out", classes="totalseg-v2", spacing=2.0, format="zarr", max_quarantine_fraction=0.5)
    assert r["exit_code"] == 1 and r["quarantined_eval"] == ["bad"]
    assert "bad (val: IO_CORRUPT)" in caplog.text and "--allow-quarantined-eval" in caplog.text
    assert main(["prepare", str(root), str(tmp_path / "out"), "--classes", "totalseg-v2", "--spacing", "2", "--format", "zarr",
                 "--max-quarantine-fraction", "0.5"]) == 1
    assert main(["prepare", str(root), str(tmp_path / "out"), "--classes", "totalseg-v2", "--spacing", "2", "--format", "zarr",
                 "--max-quarantine-fraction", "0.5", "--allow-quarantined-eval"]) == 0
    # a quarantined train case is still only counted against the budget
    (root / "meta.csv").write_bytes("\ufeffimage_id;split\ng1;val\ng2;train\ng3;test\nbad;train\n".encode())
    r = prepare_dataset(root, tmp_path / "out2", classes="totalseg-v2", spacing=2.0, format="zarr", max_quarantine_fraction=0.5)
    assert r["exit_code"] == 0 and r["quarantined_eval"] == []
