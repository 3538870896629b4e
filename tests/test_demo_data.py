"""`stunet-scale demo-data`: the phantoms are in the exact TotalSegmentator layout."""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from stunet_scale.data.class_maps import detect_class_map, load_class_map
from stunet_scale.data.ingest.demo import META_HEADER, write_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "raw", cases=4, seed=3)


def test_layout_matches_totalsegmentator(demo):
    cases = sorted(p.name for p in demo.iterdir() if p.is_dir())
    assert cases == ["s0001", "s0002", "s0003", "s0004"]
    v2 = load_class_map("totalseg-v2")
    for c in cases:
        masks = sorted(p.name[: -len(".nii.gz")] for p in (demo / c / "segmentations").iterdir())
        assert masks == sorted(v2.foreground)  # every class has a file, empty or not, like the release
        assert detect_class_map(masks) == "totalseg-v2"
        ct = nib.load(demo / c / "ct.nii.gz")
        assert ct.get_data_dtype() == np.int16
        liver = nib.load(demo / c / "segmentations" / "liver.nii.gz")
        assert liver.get_data_dtype() == np.uint8 and liver.shape == ct.shape
        assert np.allclose(liver.affine, ct.affine)
        data = np.asanyarray(ct.dataobj)
        assert -1024 <= data.min() < -900 and data.max() > 500  # air and bone
        assert all(60 <= n <= 100 for n in ct.shape[:2]) or min(ct.shape) >= 20


def test_meta_csv_has_bom_semicolons_and_splits(demo):
    raw = (demo / "meta.csv").read_bytes()
    assert raw.startswith("\ufeff".encode())
    text = raw.decode("utf-8-sig")
    assert text.splitlines()[0] == META_HEADER
    rows = list(csv.DictReader(io.StringIO(text), delimiter=";"))
    assert [r["image_id"] for r in rows] == ["s0001", "s0002", "s0003", "s0004"]
    assert sorted(r["split"] for r in rows) == ["train", "train", "train", "val"]


def test_orientations_spacing_and_anatomy_vary(demo):
    codes, spacings = set(), []
    for c in sorted(p for p in demo.iterdir() if p.is_dir()):
        img = nib.load(c / "ct.nii.gz")
        codes.add("".join(nib.aff2axcodes(img.affine)))
        can = nib.as_closest_canonical(img)
        spacings.append(can.header.get_zooms())
        # anatomy is in patient coordinates: the right kidney is at larger x (RAS) than the left one
        r = np.asanyarray(nib.as_closest_canonical(nib.load(c / "segmentations" / "kidney_right.nii.gz")).dataobj)
        l_ = np.asanyarray(nib.as_closest_canonical(nib.load(c / "segmentations" / "kidney_left.nii.gz")).dataobj)
        assert np.argwhere(r)[:, 0].mean() > np.argwhere(l_)[:, 0].mean()
    assert "RAS" in codes and len(codes) >= 3  # non-RAS files are part of the demo
    ratios = [max(s) / min(s) for s in spacings]
    assert any(r > 3 for r in ratios)  # nnU-Net's separate-z path gets exercised
    # big enough for 64^3 training patches after resampling to 1.5 mm
    for s, c in zip(spacings, sorted(p for p in demo.iterdir() if p.is_dir())):
        shape = nib.as_closest_canonical(nib.load(c / "ct.nii.gz")).shape
        assert all(n * sp / 1.5 >= 80 for n, sp in zip(shape, s))


def test_reproducible_and_v1_names(tmp_path):
    a = write_demo_dataset(tmp_path / "a", cases=1, seed=5)
    b = write_demo_dataset(tmp_path / "b", cases=1, seed=5)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(a / "s0001" / "ct.nii.gz") == digest(b / "s0001" / "ct.nii.gz")
    assert digest(a / "s0001" / "segmentations" / "liver.nii.gz") == digest(b / "s0001" / "segmentations" / "liver.nii.gz")
    v1 = write_demo_dataset(tmp_path / "v1", cases=1, seed=5, classes="totalseg-v1")
    masks = [p.name[: -len(".nii.gz")] for p in (v1 / "s0001" / "segmentations").iterdir()]
    assert len(masks) == 104 and detect_class_map(masks) == "totalseg-v1"
    heart = np.asanyarray(nib.load(v1 / "s0001" / "segmentations" / "heart_ventricle_left.nii.gz").dataobj)
    assert heart.any()


def test_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stunet_scale", "demo-data", str(tmp_path / "d"), "--cases", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / "s0001" / "segmentations" / "spleen.nii.gz").is_file()
