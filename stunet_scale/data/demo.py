"""`stunet-scale demo-data`: synthetic CT phantoms in the exact TotalSegmentator layout.

Each case is a torso phantom built in patient coordinates (mm, RAS: +x = patient's right,
+y = anterior, +z = superior): a body (fat rim around soft tissue), lungs split into lobes, heart,
liver, spleen, kidneys, stomach, aorta, vena cava, a vertebral column, hips and femurs, each with a
CT-like HU value plus noise. Cases differ in size, spacing (in-plane ~2 mm, slices 2.5-7 mm, some
anisotropic beyond nnU-Net's 3x threshold), on-disk axis order and flips (RAS, LPS, LAS, permuted,
slightly oblique), so the preprocessing paths that matter are all exercised.

The layout is the real one: ``OUT/sXXXX/ct.nii.gz`` (int16 HU), ``OUT/sXXXX/segmentations/<class>
.nii.gz`` (uint8, one per class of the chosen TotalSegmentator map, empty when the phantom lacks the
structure, exactly like the released dataset) and ``OUT/meta.csv`` (``;``-separated with a BOM and
the v2.0.1 header, train/val/test splits). Output is byte-for-byte reproducible for a given seed.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .class_maps import load_class_map
from .preprocess import ornt_affine

log = logging.getLogger("stunet_scale.demo")

META_HEADER = "image_id;age;gender;institute;study_type;split;manufacturer;scanner_model;kvp;pathology;pathology_location"

# (axis codes of the file, rotation about z in degrees): the on-disk orientation per case, cycled
ORIENTATIONS = [
    (("R", "A", "S"), 0.0),
    (("L", "P", "S"), 0.0),
    (("L", "A", "S"), 0.0),
    (("S", "R", "A"), 0.0),
    (("R", "A", "S"), 3.0),
    (("P", "L", "I"), 0.0),
    (("A", "S", "L"), 0.0),
    (("L", "P", "I"), 2.0),
]


def _splits(n: int) -> list[str]:
    """~75/12.5/12.5 train/val/test; at least one val case from 2 cases on."""
    n_test = int(round(0.125 * n))
    n_val = max(1 if n >= 2 else 0, int(round(0.125 * n)))
    return ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test


def _ellipsoid(X, Y, Z, c, r):
    return ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 <= 1.0


def _cylinder_z(X, Y, Z, c, radius, z0, z1):
    return (((X - c[0]) ** 2 + (Y - c[1]) ** 2) <= radius**2) & (Z >= z0) & (Z <= z1)


def phantom(rng: np.random.Generator, shape, spacing, version: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """HU volume (int16) and {class name: bool mask} on a RAS grid of ``shape`` x ``spacing`` mm."""
    ext = np.asarray(shape) * np.asarray(spacing)
    axes = [(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(shape, spacing, ext)]
    X, Y, Z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    ax, ay, h = 0.45 * ext[0] * rng.uniform(0.95, 1.0), 0.37 * ext[1] * rng.uniform(0.92, 1.0), ext[2]
    j = lambda: rng.uniform(0.9, 1.1)  # noqa: E731 - per-structure size jitter
    full = np.ones(tuple(shape), dtype=bool)
    body = ((X / ax) ** 2 + (Y / ay) ** 2 <= 1.0) & full
    inner = ((X / (ax - 9)) ** 2 + (Y / (ay - 9)) ** 2 <= 1.0) & full
    S: dict[str, np.ndarray] = {}
    hu: dict[str, float] = {}

    def add(name, mask, value):
        S[name] = mask & body
        hu[name] = value

    # lungs: upper 45% of the FOV, split into lobes by height
    zl = 0.05 * h
    for side, sx in (("left", -1), ("right", 1)):
        lung = _ellipsoid(X, Y, Z, (sx * 0.45 * ax, 0.05 * ay, 0.3 * h), (0.35 * ax * j(), 0.7 * ay, 0.28 * h)) & (Z > zl)
        if side == "left":
            add("lung_upper_lobe_left", lung & (Z > 0.3 * h), -850)
            add("lung_lower_lobe_left", lung & (Z <= 0.3 * h), -860)
        else:
            add("lung_upper_lobe_right", lung & (Z > 0.38 * h), -850)
            add("lung_middle_lobe_right", lung & (Z > 0.24 * h) & (Z <= 0.38 * h) & (Y > 0), -845)
            add("lung_lower_lobe_right", lung & ((Z <= 0.24 * h) | ((Z <= 0.38 * h) & (Y <= 0))), -860)
    heart = _ellipsoid(X, Y, Z, (-0.1 * ax, 0.25 * ay, 0.22 * h), (0.3 * ax * j(), 0.4 * ay, 0.12 * h))
    if version == "v2":
        add("heart", heart, 45)
    else:  # v1 has the chambers instead of one heart
        add("heart_ventricle_left", heart & (X < -0.1 * ax) & (Z < 0.22 * h), 140)
        add("heart_ventricle_right", heart & (X >= -0.1 * ax) & (Z < 0.22 * h), 135)
        add("heart_atrium_left", heart & (X < -0.1 * ax) & (Z >= 0.22 * h), 130)
        add("heart_atrium_right", heart & (X >= -0.1 * ax) & (Z >= 0.22 * h), 125)
    add("liver", _ellipsoid(X, Y, Z, (0.38 * ax, 0.1 * ay, 0.0), (0.45 * ax * j(), 0.6 * ay, 0.13 * h * j())), 60)
    add("gallbladder", _ellipsoid(X, Y, Z, (0.28 * ax, 0.45 * ay, -0.08 * h), (0.08 * ax, 0.1 * ay, 0.04 * h)), 10)
    add("spleen", _ellipsoid(X, Y, Z, (-0.6 * ax, -0.25 * ay, 0.02 * h), (0.18 * ax * j(), 0.3 * ay, 0.08 * h)), 50)
    add("stomach", _ellipsoid(X, Y, Z, (-0.32 * ax, 0.35 * ay, 0.02 * h), (0.22 * ax * j(), 0.3 * ay, 0.07 * h)), 25)
    add("pancreas", _ellipsoid(X, Y, Z, (-0.1 * ax, 0.0, -0.08 * h), (0.3 * ax, 0.1 * ay, 0.03 * h)), 40)
    for side, sx in (("left", -1), ("right", 1)):
        add(f"kidney_{side}", _ellipsoid(X, Y, Z, (sx * 0.35 * ax, -0.4 * ay, -0.12 * h), (0.12 * ax * j(), 0.18 * ay, 0.08 * h)), 160)
        add(f"hip_{side}", _ellipsoid(X, Y, Z, (sx * 0.55 * ax, -0.15 * ay, -0.4 * h), (0.25 * ax, 0.35 * ay, 0.07 * h)), 650)
        add(f"femur_{side}", _cylinder_z(X, Y, Z, (sx * 0.5 * ax, 0.05 * ay), 0.1 * ax, -0.5 * h, -0.44 * h), 900)
        add(f"autochthon_{side}", _ellipsoid(X, Y, Z, (sx * 0.15 * ax, -0.82 * ay, -0.1 * h), (0.1 * ax, 0.12 * ay, 0.3 * h)), 50)
    add("urinary_bladder", _ellipsoid(X, Y, Z, (0.0, 0.35 * ay, -0.38 * h), (0.18 * ax, 0.25 * ay, 0.06 * h)), 10)
    add("aorta", _cylinder_z(X, Y, Z, (-0.08 * ax, -0.3 * ay), 0.07 * ax, -0.3 * h, 0.32 * h), 280)
    add("inferior_vena_cava", _cylinder_z(X, Y, Z, (0.12 * ax, -0.25 * ay), 0.06 * ax, -0.3 * h, 0.1 * h), 170)
    add("esophagus", _cylinder_z(X, Y, Z, (-0.02 * ax, -0.45 * ay), 0.04 * ax, 0.05 * h, 0.5 * h), 30)
    # vertebral column: 28 mm bodies with 5 mm discs, named from the sacrum upwards
    names = ["sacrum", "vertebrae_L5", "vertebrae_L4", "vertebrae_L3", "vertebrae_L2", "vertebrae_L1",
             "vertebrae_T12", "vertebrae_T11", "vertebrae_T10", "vertebrae_T9", "vertebrae_T8", "vertebrae_T7",
             "vertebrae_T6", "vertebrae_T5", "vertebrae_T4", "vertebrae_T3", "vertebrae_T2", "vertebrae_T1"]
    z = -0.5 * h + 5
    for name in names:
        if z + 28 > 0.5 * h:
            break
        add(name, _cylinder_z(X, Y, Z, (0.0, -0.62 * ay), 0.11 * ax, z, z + 28), 700 if name != "sacrum" else 600)
        z += 33
    if version == "v2":
        # deliberately grazes the vertebral bodies: the overlap rule (higher label wins) gets exercised
        add("spinal_cord", _cylinder_z(X, Y, Z, (0.0, -0.74 * ay), 0.05 * ax, -0.2 * h, 0.45 * h), 35)

    img = np.where(body, -100.0, -1000.0)  # fat, air
    img = np.where(inner, 40.0, img)  # muscle / soft tissue
    for name, mask in S.items():
        img[mask] = hu[name]
    img += rng.normal(0.0, 18.0, size=img.shape)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16), S


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, qform_code: int) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=qform_code)
    img.header.set_xyzt_units("mm", "sec")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def parse_shape_range(text: str) -> list[tuple[int, int]]:
    """``"260-300,210-250,240-300"`` (or ``"128,128,128"``) -> [(260, 300), (210, 250), (240, 300)]."""
    axes = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"shape must be three comma-separated sizes or LO-HI ranges, got {text!r}") from None
        if not 8 <= a <= b:
            raise ValueError(f"shape range {part!r}: need 8 <= LO <= HI")
        axes.append((a, b))
    if len(axes) != 3:
        raise ValueError(f"shape needs three axes (x,y,z), got {text!r}")
    return axes


def write_demo_dataset(out: str | Path, cases: int = 8, seed: int = 0, classes: str = "totalseg-v2",
                       shape: Sequence[tuple[int, int]] | None = None, spacing: float = 1.5) -> Path:
    """Write ``cases`` phantom CTs in the TotalSegmentator layout under ``out``; returns ``out``.

    ``classes`` is ``totalseg-v2`` (117 mask files per case, v2 names) or ``totalseg-v1`` (104).
    ``shape``: per-axis (lo, hi) voxel counts, each case's size drawn uniformly in them, at
    isotropic ``spacing`` mm (benchmark-sized volumes, e.g. ``parse_shape_range("260-300,210-250,
    240-300")``). Default: the small mixed-spacing cases (~80-97 voxels in-plane) the tests use,
    unchanged byte for byte.
    """
    if classes not in ("totalseg-v1", "totalseg-v2"):
        raise ValueError(f"classes must be totalseg-v1 or totalseg-v2, got {classes!r}")
    if shape is not None and (len(shape) != 3 or not spacing > 0):
        raise ValueError(f"shape needs three (lo, hi) ranges and spacing > 0, got {shape!r}, {spacing!r}")
    version = "v2" if classes.endswith("v2") else "v1"
    cmap = load_class_map(classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = _splits(cases)
    lines = [META_HEADER]
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        case_id = f"s{i + 1:04d}"
        if shape is None:
            sxy = float(rng.uniform(2.0, 2.4))
            # every third case has thick slices (> 3x the in-plane spacing: nnU-Net's separate-z path)
            sz = float(3.2 * sxy if i % 3 == 2 else rng.uniform(2.5, 4.0))
            nxy = int(rng.integers(80, 97))
            case_shape = (nxy, int(nxy * rng.uniform(0.92, 1.0)), int(round(rng.uniform(150, 200) / sz)))
            case_spacing = (sxy, sxy, sz)
        else:  # benchmark-sized: drawn from the same per-case generator, so still reproducible
            case_shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in shape)
            case_spacing = (float(spacing),) * 3
        ct, masks = phantom(rng, case_shape, case_spacing, version)
        # RAS grid centred at a random origin, then stored in this case's on-disk orientation
        ras_aff = np.diag([*case_spacing, 1.0])
        ras_aff[:3, 3] = -np.asarray(case_shape) * np.asarray(case_spacing) / 2 + rng.uniform(-20, 20, 3)
        codes, tilt = ORIENTATIONS[i % len(ORIENTATIONS)]
        import nibabel as nib

        from .preprocess import apply_ornt, invert_ornt

        ornt = invert_ornt(nib.orientations.axcodes2ornt(codes))  # RAS voxel axes -> file axes
        if tilt:
            t = np.deg2rad(tilt)
            rot = np.eye(4)
            rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
            ras_aff = rot @ ras_aff
        file_aff = ornt_affine(ras_aff, ornt, case_shape)
        to_file = lambda a: np.ascontiguousarray(apply_ornt(a, ornt))  # noqa: E731
        qcode = 0 if i % 4 == 1 else 1  # like the real dataset, some files carry only an sform
        case_dir = out / case_id
        seg_dir = case_dir / "segmentations"
        seg_dir.mkdir(parents=True, exist_ok=True)
        (case_dir / "ct.nii.gz").write_bytes(_nifti_bytes(to_file(ct), file_aff, qcode))
        empty = _nifti_bytes(np.zeros(to_file(ct).shape, np.uint8), file_aff, qcode)
        for name in cmap.foreground:
            m = masks.get(name)
            data = _nifti_bytes(to_file(m.astype(np.uint8)), file_aff, qcode) if m is not None and m.any() else empty
            (seg_dir / f"{name}.nii.gz").write_bytes(data)
        age = int(rng.integers(25, 85))
        lines.append(f"{case_id};{age};{'mf'[i % 2]};demo;ct abdomen-thorax;{splits[i]};Phantom;Synthetic;120;no_pathology;")
        log.info(f"{case_id}: {case_shape} at {np.round(case_spacing, 2).tolist()} mm, stored as {''.join(codes)}"
                 f"{f' tilted {tilt} deg' if tilt else ''}, split {splits[i]}")
    (out / "meta.csv").write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode("utf-8"))
    return out


def make_demo_store(root: str | Path, cases: int = 4, seed: int = 0, classes: str = "stunet", **prepare_options) -> Path:
    """Demo raw data under ``root/raw`` prepared into ``root/prepared``; returns the prepared dir.

    The one-liner for test fixtures and notebooks (4 cases take a few seconds on one core).
    ``prepare_options`` go to ``prepare_dataset`` (e.g. ``format="zarr"``, ``spacing=2.0``).
    """
    from .prepare import prepare_dataset

    root = Path(root)
    raw = write_demo_dataset(root / "raw", cases=cases, seed=seed)
    result = prepare_dataset(raw, root / "prepared", classes=classes, **prepare_options)
    if result["exit_code"] != 0:
        raise RuntimeError(f"demo prepare failed: {result}")
    return root / "prepared"
