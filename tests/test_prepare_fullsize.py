"""`prepare` at real TotalSegmentator size (issue 17), checked on moderate sizes.

A full-size case (512x512x400-1000, 117 masks) is a benchmark (`stunet-scale bench prepare
--full-size`), not a test. Here: the native-order mask merge equals the plain merge voxel for voxel
(overlaps, ignored classes, float masks, empty-mask shortcut), the gzip decoders agree and verify
CRCs, and the slab-wise steps give the same numbers in bounded memory.
"""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stunet_scale.data.ingest import preprocess as pp
from stunet_scale.data.ingest import sources
from stunet_scale.data.ingest.sources import CaseError, load_case, open_source

SHAPE = (40, 36, 30)
AFF = np.diag([1.5, 1.5, 2.0, 1.0])


def _write(path: Path, data: np.ndarray, affine=AFF, mtime: int = 0) -> None:
    """A .nii.gz as nibabel writes it, with a chosen gzip mtime (headers differ, payloads do not)."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=mtime))


def _blob(rng, lo, hi) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.random(tuple(h - low for low, h in zip(lo, hi))) < 0.8
    return m


def _case(root: Path, rng) -> dict[str, np.ndarray]:
    """One case in the TotalSegmentator layout: overlapping masks, empty ones with different gzip
    headers, a float32 mask, and v2 `heart` (no class in the stunet map: the ignore label)."""
    _write(root / "c1" / "ct.nii.gz", rng.integers(-1000, 1000, SHAPE).astype(np.int16))
    masks = {
        "liver": _blob(rng, (5, 5, 5), (25, 25, 20)),
        "spleen": _blob(rng, (20, 20, 10), (35, 33, 28)),  # overlaps the liver: the higher label wins
        "heart": _blob(rng, (0, 0, 0), (22, 15, 12)),  # ignored, written first: map classes overwrite it
        "aorta": _blob(rng, (10, 2, 0), (14, 6, 30)),
        "pancreas": np.zeros(SHAPE, np.uint8),
        "stomach": np.zeros(SHAPE, np.uint8),
        "kidney_left": np.zeros(SHAPE, np.uint8),
    }
    for i, (name, m) in enumerate(masks.items()):
        data = m.astype(np.float32) if name == "aorta" else m
        _write(root / "c1" / "segmentations" / f"{name}.nii.gz", data, mtime=1000 + i)
    return masks


def _plain_merge(ds, masks: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """The merge rule, written the obvious way (C order, boolean masks)."""
    label = np.zeros(SHAPE, np.uint8)
    overlap = 0
    order = [(ds.ignore_label, n) for n in sorted(masks) if n in ds.ignored_source_names or
             (n not in ds.mask_names and n not in ds.background_source_names)]
    order += [(k, n) for k, n in enumerate(ds.mask_names) if n in masks]
    for k, n in order:
        m = np.ascontiguousarray(masks[n]) > 0
        overlap += int(np.count_nonzero(label[m]))
        label[m] = k
    return label, overlap


@pytest.mark.parametrize("threads", [1, 3])
def test_native_order_merge_equals_plain_merge(tmp_path, threads):
    rng = np.random.default_rng(5)
    masks = _case(tmp_path, rng)
    ds = open_source(tmp_path, classes="stunet")
    loaded = load_case(ds.cases[0], ds, threads)
    ref, overlap = _plain_merge(ds, masks)
    assert loaded.ignored_masks == ["heart"]
    assert np.array_equal(loaded.label, ref) and loaded.overlap_voxels == overlap > 0
    assert ds.ignore_label in np.unique(loaded.label)  # heart voxels no map class claims
    assert len(loaded.input_sha256) == 1 + len(masks)  # every file hashed, the skipped empty ones too


def test_empty_mask_shortcut_still_checks_each_file(tmp_path):
    """Empty masks with the same payload are decoded once; one with a different grid is still caught,
    and a corrupt copy of the empty stream is still IO_CORRUPT."""
    rng = np.random.default_rng(1)
    _case(tmp_path, rng)
    seg = tmp_path / "c1" / "segmentations"
    moved = AFF.copy()
    moved[0, 3] = 9.0
    _write(seg / "kidney_right.nii.gz", np.zeros(SHAPE, np.uint8), affine=moved)
    ds = open_source(tmp_path, classes="stunet")
    with pytest.raises(CaseError) as e:
        load_case(ds.cases[0], ds)
    assert e.value.code == "AFFINE_MISMATCH" and "kidney_right" in e.value.message
    _write(seg / "kidney_right.nii.gz", np.zeros(SHAPE, np.uint8), mtime=77)
    raw = bytearray((seg / "kidney_right.nii.gz").read_bytes())
    raw[-6] ^= 0xFF  # CRC: payload differs from the good empty stream, so it is decoded and rejected
    (seg / "kidney_right.nii.gz").write_bytes(bytes(raw))
    with pytest.raises(CaseError) as e:
        load_case(ds.cases[0], ds)
    assert e.value.code == "IO_CORRUPT" and "kidney_right" in e.value.message


def test_gzip_decoders_agree_and_verify_crc():
    data = np.random.default_rng(0).integers(0, 2, 200_000).astype(np.uint8).tobytes()
    a, b = gzip.compress(data, mtime=1), gzip.compress(data, mtime=2)
    assert a != b and bytes(sources.gzip_payload(a)) == bytes(sources.gzip_payload(b))
    bad = bytearray(a)
    bad[-6] ^= 0xFF
    decoders = {"stdlib": gzip.decompress}
    for name, mod in (("isal", "isal.igzip"), ("zlib-ng", "zlib_ng.gzip_ng")):
        try:
            decoders[name] = __import__(mod, fromlist=["decompress"]).decompress
        except ImportError:
            pass
    for name, fn in decoders.items():
        assert fn(a) == data, name
        with pytest.raises((OSError, EOFError)):
            fn(bytes(bad))
        with pytest.raises((OSError, EOFError)):
            fn(a[:-100])
    for role in ("image", "mask"):
        assert sources.gunzip(a, role) == data
    assert sources.gzip_payload(b"\x1f\x8b\x08\x08" + b"\x00" * 6 + b"no terminator") is None


def test_slab_wise_spline_is_identical_and_bounded(monkeypatch):
    """The slab-wise cubic resampling equals the whole-volume one bit for bit, with a peak far below
    the whole-volume float64 temporaries."""
    rng = np.random.default_rng(2)
    img = np.asfortranarray(rng.normal(0, 300, (90, 80, 120)).astype(np.int16))
    shape = [47, 43, 64]
    monkeypatch.setattr(pp, "ZOOM_SLAB_VOXELS", 10**9)
    tracemalloc.start()
    whole = pp.resample_image(img, shape, "cubic")
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    monkeypatch.setattr(pp, "ZOOM_SLAB_VOXELS", 64 * 1024)
    tracemalloc.start()
    slabs = pp.resample_image(img, shape, "cubic")
    slab_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(whole, slabs) and slabs.dtype == np.float32
    # measured 35 vs 9.5 bytes per input voxel
    assert whole_peak > 25 * img.size and slab_peak < 12 * img.size, (whole_peak / img.size, slab_peak / img.size)


def test_slab_statistics_match_numpy(monkeypatch):
    rng = np.random.default_rng(3)
    img = np.asfortranarray(rng.normal(-200, 400, (50, 40, 60)).astype(np.int16))
    img[:3] = 0  # a nonzero box smaller than the volume
    ref = pp.crop(img, pp.bbox_of(img != 0)).astype(np.float32).astype(np.float64)
    one = pp.nonzero_zscore_stats(img)[0]
    assert (one["mean"], one["std"]) == (float(ref.mean()), float(ref.std()))  # one slab: numpy's own numbers
    monkeypatch.setattr(pp, "STATS_SLAB_VOXELS", 5000)
    many = pp.nonzero_zscore_stats(img)[0]
    assert many["box"] == one["box"]
    assert many["mean"] == pytest.approx(one["mean"], rel=1e-12) and many["std"] == pytest.approx(one["std"], rel=1e-12)


def test_load_case_memory_is_bounded_by_the_window(tmp_path):
    """Peak memory of the merge: the CT, the label map and at most threads + 1 decoded masks in flight,
    not one per mask file (30 non-empty masks here)."""
    rng = np.random.default_rng(4)
    shape = (64, 64, 48)
    _write(tmp_path / "c1" / "ct.nii.gz", rng.integers(-1000, 1000, shape).astype(np.int16))
    from stunet_scale.data.class_maps import load_class_map

    names = load_class_map("totalseg-v2").foreground[:30]
    for i, name in enumerate(names):
        m = np.zeros(shape, np.uint8)
        m[i:i + 20, 10:40, 5:30] = 1
        _write(tmp_path / "c1" / "segmentations" / f"{name}.nii.gz", m)
    ds = open_source(tmp_path, classes="totalseg-v2")
    n = int(np.prod(shape))
    threads = 2
    tracemalloc.start()
    loaded = load_case(ds.cases[0], ds, threads)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert loaded.label.shape == shape and len(np.unique(loaded.label)) == 31
    # CT: decompressed bytes + its array (2 B/voxel each); label 1 B; threads + 1 masks of 1 B in flight,
    # + 2 B of slack. Measured 9.3 B/voxel; the merge before issue 17 (a window of 2 x threads masks,
    # each decoded and copied by nibabel, plus a C-order copy per mask) peaked at 13.6.
    budget = (2 * 2 + 1 + (threads + 1) + 2) * n
    assert peak < budget, (peak / n, budget / n)


def test_default_workers_rule():
    from stunet_scale.data.ingest.prepare import WORKER_MEMORY_BYTES, default_workers

    gib = 2**30
    assert WORKER_MEMORY_BYTES == 4 * gib
    assert default_workers(2, 22 * gib) == 2  # this VM: cores decide
    assert default_workers(64, 128 * gib) == 32  # memory decides
    assert default_workers(8, 3 * gib) == 1  # never below one
    assert default_workers() >= 1


def test_bench_full_size_command_reports_time_and_memory(tmp_path, capsys):
    """The full-size bench's own path on a tiny case (ours only: nnU-Net's side is the slow
    `tests/test_prepare_bench.py`); the 512x512x400/1000 numbers in the README come from this command."""
    import json

    from stunet_scale.bench.prepare import format_full_size_report
    from stunet_scale.cli import main

    assert main(["bench", "prepare", str(tmp_path / "raw"), "--full-size", "--shape", "48,40,36", "--spacing", "4",
                 "--no-nnunet", "--keep", str(tmp_path / "work"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["shape"] == [48, 40, 36] and r["cases"] == 1 and r["generated_upsample"] == 1
    o = r["ours"]
    assert o["cases"] == 1 and o["seconds_per_case"] > 0 and 50e6 < o["peak_rss_bytes"] < 4e9 and o["cpu_seconds_per_case"] > 0
    (stored,) = o["stored_shapes"].values()  # 4 mm -> 1.5 mm: at most 128x107x96 after the body crop
    assert all(0 < n <= m for n, m in zip(stored, [128, 107, 96])) and stored[2] == 96
    assert "nnunet" not in r and "peak RSS per worker <= 4 GB: yes" in format_full_size_report(r)
    assert main(["bench", "prepare"]) == 2  # no source and no --full-size
