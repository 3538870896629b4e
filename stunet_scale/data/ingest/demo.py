"""`stunet-scale demo-data`: synthetic CT phantoms in the exact TotalSegmentator layout.

Each case is a torso phantom built in patient coordinates (mm, RAS: +x = patient's right,
+y = anterior, +z = superior), a contrast-enhanced CT scaled to the field of view: fat, muscle, organs
with their HU and texture, contrast-filled vessels, bone with cortex, blur and noise (``phantom``).
Cases differ in size, spacing (in-plane ~2 mm, slices 2.5-7 mm, some
anisotropic beyond nnU-Net's 3x threshold), on-disk axis order and flips (RAS, LPS, LAS, permuted,
slightly oblique), so the preprocessing paths that matter are all exercised.

``OUT/demo.json`` records the generator version and the arguments, written last: asking for the same
dataset again finds it up to date and writes nothing (the quickstart calls ``demo-data`` every time),
and a dataset from an older generator is written anew.

The layout is the real one: ``OUT/sXXXX/ct.nii.gz`` (int16 HU), ``OUT/sXXXX/segmentations/<class>
.nii.gz`` (uint8, one per class of the chosen TotalSegmentator map, empty when the phantom lacks the
structure, exactly like the released dataset) and ``OUT/meta.csv`` (``;``-separated with a BOM and
the v2.0.1 header, train/val/test splits). Output is byte-for-byte reproducible for a given seed.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..class_maps import load_class_map
from .preprocess import ornt_affine

log = logging.getLogger("stunet_scale.demo")

# Bump when phantom() or the file layout changes: an existing demo dataset is then regenerated.
GENERATOR_VERSION = 2
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


def _field(rng: np.random.Generator, shape, spacing, scale_mm: float) -> np.ndarray:
    """Smooth random field with unit std and features of ~``scale_mm``: organ texture, fat strands,
    vessel trees (two fields near zero at once trace tubes)."""
    from scipy.ndimage import zoom

    coarse = [max(2, int(np.ceil(n * s / scale_mm)) + 1) for n, s in zip(shape, spacing)]
    f = zoom(rng.standard_normal(coarse).astype(np.float32), [n / c for n, c in zip(shape, coarse)], order=3,
             grid_mode=True, mode="grid-wrap")[: shape[0], : shape[1], : shape[2]]
    return (f - f.mean()) / max(float(f.std()), 1e-6)


# Contrast phase of a case: HU of blood in the aorta / the veins, and of the enhancing organs.
PHASES = {
    "arterial": dict(aorta=(260, 340), vein=(70, 110), liver=(65, 80), spleen=(95, 120), cortex=(170, 220), medulla=(70, 100), pancreas=(100, 125)),
    "venous": dict(aorta=(140, 180), vein=(130, 170), liver=(95, 120), spleen=(105, 125), cortex=(150, 180), medulla=(130, 160), pancreas=(80, 100)),
}


def phantom(rng: np.random.Generator, shape, spacing, version: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """HU volume (int16) and {class name: bool mask} on a RAS grid of ``shape`` x ``spacing`` mm.

    A contrast-enhanced torso CT scaled to the field of view: skin, subcutaneous fat of a per-case
    thickness, a muscle wall, visceral fat with strands; lungs with vessel trees and visible fissures
    between the lobes; a heart with myocardium around contrast-filled chambers; liver, spleen,
    kidneys (cortex brighter than medulla, sinus fat at the hilum), pancreas, stomach with an
    air-fluid level, gallbladder, bladder, colon and small bowel; aorta and vena cava in the case's
    contrast phase (arterial or portal venous); vertebrae, ribs, hips, sacrum and femurs with cortex
    and marrow; paraspinal, psoas and gluteal muscles. Masks are the structures' true extents; the
    image gets the scanner's blur (partial-volume edges), texture and correlated noise of a
    per-case level. Structures are painted in order, so masks never overlap.
    """
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
    ext = np.asarray(shape) * np.asarray(spacing)
    axes = [((np.arange(n) + 0.5) * s - e / 2).astype(np.float32) for n, s, e in zip(shape, spacing, ext)]
    X, Y, Z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    ax, ay, h = 0.45 * ext[0] * rng.uniform(0.93, 1.0), 0.37 * ext[1] * rng.uniform(0.9, 1.0), ext[2]
    j = lambda lo=0.9, hi=1.1: rng.uniform(lo, hi)  # noqa: E731 - per-structure size / position jitter
    phase = {k: rng.uniform(*v) for k, v in PHASES["arterial" if rng.random() < 0.4 else "venous"].items()}
    tex = _field(rng, shape, spacing, 6.0)  # fine texture shared by parenchyma and fat
    full = np.ones(shape, dtype=bool)

    def ring(t):  # the body's cross-section shrunk by t mm
        return ((X / (ax - t)) ** 2 + (Y / (ay - t)) ** 2 <= 1.0) & full

    fat_t = rng.uniform(0.06, 0.16) * ax  # habitus: subcutaneous fat thickness
    body, under_skin, inside_fat, cavity = ring(0), ring(2), ring(2 + fat_t), ring(2 + fat_t + 0.07 * ax)
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[body] = 30.0  # skin
    img[under_skin] = -100.0 + 12.0 * tex[under_skin]
    img[inside_fat] = 50.0 + 6.0 * tex[inside_fat]  # muscle wall
    strands = _field(rng, shape, spacing, 10.0)
    img[cavity] = np.where(np.abs(strands[cavity]) < 0.15, -40.0, -95.0) + 10.0 * tex[cavity]  # visceral fat
    label = np.zeros(shape, dtype=np.int16)  # painted structure index (0 = none): masks never overlap
    names: list[str] = []

    def paint(name, mask, hu, claim=True):
        """Paint ``hu`` (number or array over the whole grid) where ``mask``, inside the body."""
        m = mask & body & ((label == 0) if claim else full)
        img[m] = hu[m] if isinstance(hu, np.ndarray) else hu
        if name is not None:
            names.append(name)
            label[m] = len(names)
        return m

    # skeleton first: it wins where soft tissue would touch it
    spine_y = -0.58 * ay * j(0.95, 1.05)
    rv = 0.1 * ax
    verts = ["sacrum", "vertebrae_L5", "vertebrae_L4", "vertebrae_L3", "vertebrae_L2", "vertebrae_L1", "vertebrae_T12",
             "vertebrae_T11", "vertebrae_T10", "vertebrae_T9", "vertebrae_T8", "vertebrae_T7", "vertebrae_T6",
             "vertebrae_T5", "vertebrae_T4", "vertebrae_T3", "vertebrae_T2", "vertebrae_T1"]
    height, disc = 0.14 * h * j(0.95, 1.05), 0.025 * h
    canal_c, canal_r = (0.0, spine_y - rv - 0.045 * ax), 0.045 * ax
    bones = np.zeros(shape, dtype=bool)
    z = -0.5 * h + 0.02 * h
    for name in verts:
        if z + height > 0.5 * h:
            break
        zs = (Z >= z) & (Z <= z + height)
        vbody = _cylinder_z(X, Y, Z, (0.0, spine_y), rv, z, z + height)
        canal = ((X - canal_c[0]) ** 2 + (Y - canal_c[1]) ** 2 <= canal_r**2)
        arch = ((X - canal_c[0]) ** 2 + (Y - canal_c[1]) ** 2 <= (canal_r + 0.03 * ax) ** 2) & ~canal & zs
        spinous = (np.abs(X) <= 0.025 * ax) & (Y < canal_c[1]) & (Y > canal_c[1] - 0.2 * ay) & (Z >= z + 0.2 * height) & (Z <= z + 0.9 * height)
        if name == "sacrum":
            vbody = _ellipsoid(X, Y, Z, (0.0, spine_y - 0.05 * ay, z + 0.5 * height), (0.3 * ax, 0.12 * ay, 0.6 * height))
        bones |= paint(name, vbody | arch | spinous, 250.0)
        paint(None, _cylinder_z(X, Y, Z, (0.0, spine_y), rv, z + height, z + height + disc), 85.0)  # disc
        z += height + disc
    canal_all = (X - canal_c[0]) ** 2 + (Y - canal_c[1]) ** 2 <= canal_r**2
    paint(None, canal_all, 10.0)  # CSF
    cord = (X - canal_c[0]) ** 2 + (Y - canal_c[1]) ** 2 <= (0.5 * canal_r) ** 2
    paint("spinal_cord" if version == "v2" else None, cord & (Z > -0.2 * h), 38.0, claim=False)
    # pelvis: iliac wings as curved plates, femurs with head and shaft
    zp = -0.36 * h
    for side, sx in (("left", -1), ("right", 1)):
        outer = _ellipsoid(X, Y, Z, (sx * 0.5 * ax, -0.2 * ay, zp), (0.3 * ax * j(), 0.38 * ay, 0.12 * h))
        inner = _ellipsoid(X, Y, Z, (sx * 0.43 * ax, -0.12 * ay, zp + 0.02 * h), (0.26 * ax, 0.34 * ay, 0.12 * h))
        bones |= paint(f"hip_{side}", outer & ~inner & (Y < 0.15 * ay), 260.0)
        fc = (sx * 0.52 * ax, 0.05 * ay)
        femur = _ellipsoid(X, Y, Z, (*fc, -0.47 * h), (0.09 * ax, 0.09 * ax, 0.05 * h)) | _cylinder_z(X, Y, Z, (sx * 0.6 * ax, 0.0), 0.07 * ax, -0.6 * h, -0.47 * h)
        bones |= paint(f"femur_{side}", femur, 200.0)
    # ribs: sloping bands in the chest wall, numbered upwards from the lowest in the field of view
    zr, k = 0.02 * h, 12
    while zr < 0.5 * h and k >= 1:
        dz = Z - (zr - 0.15 * (Y + ay))  # ribs run downwards from back to front
        band = (np.abs(dz) <= 0.018 * h) & ring(2 + fat_t) & ~ring(2 + fat_t + 0.05 * ax) & (Y < 0.7 * ay)
        for side, sx in (("left", -1), ("right", 1)):
            bones |= paint(f"rib_{side}_{k}", band & (sx * X > 0.08 * ax), 300.0)
        zr, k = zr + 0.075 * h, k - 1
    # cortex: the outer ~3 mm of every bone (thicker than most real cortex, so that it survives
    # 2-4 mm voxels and the blur as it does in real CT), marrow inside; distance in mm, spacing-aware
    cortex = bones & (distance_transform_edt(bones, sampling=spacing) <= 3.0)
    img[cortex] = 1150.0 + 80.0 * tex[cortex]
    img[bones & ~cortex] += 40.0 * tex[bones & ~cortex]

    # muscles with fat marbling
    muscle = 52.0 + 8.0 * tex - 70.0 * (strands > 1.6)
    for side, sx in (("left", -1), ("right", 1)):
        paint(f"autochthon_{side}", _ellipsoid(X, Y, Z, (sx * 0.14 * ax, spine_y - 0.33 * ay, 0.0), (0.12 * ax, 0.13 * ay, 0.6 * h)), muscle)
        psoas_c = (sx * (0.16 + 0.25 * np.clip(-Z / h - 0.05, 0, 1)) * ax, spine_y + 0.05 * ay)
        psoas = ((X - psoas_c[0]) / (0.09 * ax)) ** 2 + ((Y - psoas_c[1]) / (0.12 * ay)) ** 2 <= 1.0
        paint(f"iliopsoas_{side}", psoas & (Z < -0.02 * h) & (Z > -0.45 * h), muscle)
        paint(f"gluteus_maximus_{side}", _ellipsoid(X, Y, Z, (sx * 0.45 * ax, -0.7 * ay, -0.42 * h), (0.35 * ax, 0.25 * ay, 0.12 * h)), muscle)

    # thorax: heart, great vessels, lungs with lobes, esophagus
    zd = 0.02 * h * j(0.5, 1.5)  # diaphragm dome height
    aorta_c = (-0.1 * ax, spine_y + rv + 0.09 * ax)
    blood_a, blood_v = phase["aorta"] + 12.0 * tex, phase["vein"] + 10.0 * tex
    paint("aorta", _cylinder_z(X, Y, Z, aorta_c, 0.075 * ax, -0.3 * h, 0.5 * h), blood_a)
    paint("inferior_vena_cava", _cylinder_z(X, Y, Z, (0.14 * ax, spine_y + rv + 0.1 * ax), 0.07 * ax, -0.3 * h, 0.12 * h), blood_v)
    esoph = _cylinder_z(X, Y, Z, (-0.03 * ax, spine_y + rv + 0.06 * ax), 0.045 * ax, 0.0, 0.5 * h)
    paint("esophagus", esoph, 40.0 + 6.0 * tex)
    paint(None, _cylinder_z(X, Y, Z, (-0.03 * ax, spine_y + rv + 0.06 * ax), 0.012 * ax, 0.0, 0.5 * h), -900.0, claim=False)
    hc, hr = (-0.12 * ax * j(), 0.22 * ay, 0.2 * h), (0.3 * ax * j(), 0.42 * ay, 0.13 * h)
    heart = _ellipsoid(X, Y, Z, hc, hr)
    cavity_h = _ellipsoid(X, Y, Z, hc, [r * 0.72 for r in hr])
    left, upper = X < hc[0], Z >= hc[2]
    if version == "v2":
        paint("heart", heart, np.where(cavity_h, np.where(left, blood_a, blood_v), 110.0 + 8.0 * tex))
    else:  # v1: myocardium and the four chambers
        paint("heart_myocardium", heart & ~cavity_h, 110.0 + 8.0 * tex)
        for name, m, blood in (("heart_ventricle_left", left & ~upper, blood_a), ("heart_atrium_left", left & upper, blood_a),
                               ("heart_ventricle_right", ~left & ~upper, blood_v), ("heart_atrium_right", ~left & upper, blood_v)):
            paint(name, cavity_h & m, blood)
    paint(None, _ellipsoid(X, Y, Z, hc, [r * 1.15 for r in hr]) & (Z > zd), -85.0 + 8.0 * tex)  # mediastinal fat
    t1, t2 = _field(rng, shape, spacing, 9.0), _field(rng, shape, spacing, 9.0)
    lung_hu = np.where((np.abs(t1) < 0.2) & (np.abs(t2) < 0.2), -80.0, -860.0 + 25.0 * tex)  # parenchyma, vessels
    for side, sx in (("left", -1), ("right", 1)):
        lc = (sx * 0.45 * ax, 0.0, 0.3 * h)
        lung = _ellipsoid(X, Y, Z, lc, (0.36 * ax * j(), 0.72 * ay, 0.3 * h)) & cavity & (Z > zd + 0.04 * h * (1 - (X / ax) ** 2))
        # oblique fissure: the lower lobe is posterior-inferior; the horizontal one splits off the middle lobe
        oblique = (Z - lc[2]) + 0.6 * (Y - 0.1 * ay) * h / ay * 0.5
        lower = lung & (oblique < 0)
        fissure = lung & (np.abs(oblique) < 1.0)
        if side == "left":
            paint("lung_lower_lobe_left", lower, lung_hu)
            paint("lung_upper_lobe_left", lung & ~lower, lung_hu)
        else:
            middle = lung & ~lower & (Z < lc[2] + 0.05 * h)
            fissure |= lung & ~lower & (np.abs(Z - lc[2] - 0.05 * h) < 1.0)
            paint("lung_lower_lobe_right", lower, lung_hu)
            paint("lung_middle_lobe_right", middle, lung_hu)
            paint("lung_upper_lobe_right", lung & ~lower & ~middle, lung_hu)
        img[fissure & (label > 0)] = -720.0  # a thin denser line, partial-volumed by the blur below

    # abdomen: organs in the cavity below the diaphragm
    below = Z <= zd + 0.05 * h
    hv1, hv2 = _field(rng, shape, spacing, 12.0), _field(rng, shape, spacing, 12.0)
    liver_hu = phase["liver"] + 7.0 * tex + 45.0 * ((np.abs(hv1) < 0.1) & (np.abs(hv2) < 0.1))  # hepatic veins
    paint("gallbladder", _ellipsoid(X, Y, Z, (0.3 * ax, 0.45 * ay, -0.1 * h), (0.08 * ax * j(), 0.11 * ay, 0.05 * h)), 8.0 + 4.0 * tex)
    paint("liver", _ellipsoid(X, Y, Z, (0.4 * ax * j(0.95, 1.05), 0.08 * ay, 0.0), (0.45 * ax * j(), 0.62 * ay, 0.14 * h * j())) & below & cavity, liver_hu)
    paint("spleen", _ellipsoid(X, Y, Z, (-0.6 * ax, -0.25 * ay, 0.02 * h), (0.17 * ax * j(), 0.3 * ay, 0.09 * h)) & cavity, phase["spleen"] + 8.0 * tex)
    sc, sr = (-0.3 * ax * j(), 0.35 * ay, 0.0), (0.22 * ax * j(), 0.3 * ay, 0.08 * h)
    stomach = _ellipsoid(X, Y, Z, sc, sr) & cavity & below
    lumen = _ellipsoid(X, Y, Z, sc, [r - 2.5 for r in sr])
    level = sc[1] + sr[1] * rng.uniform(0.2, 0.5)  # supine: gas rises anteriorly (+y)
    paint("stomach", stomach, np.where(lumen, np.where(Y > level, -950.0, 15.0 + 5.0 * tex), 75.0 + 6.0 * tex))
    pan = _ellipsoid(X, Y, Z, (-0.08 * ax, 0.02 * ay, -0.08 * h), (0.32 * ax, 0.09 * ay, 0.035 * h)) & (strands > -1.2)
    paint("pancreas", pan, phase["pancreas"] + 12.0 * tex)
    for side, sx in (("left", -1), ("right", 1)):
        kc, kr = (sx * 0.36 * ax, spine_y + 0.12 * ay, -0.12 * h * j()), (0.12 * ax * j(), 0.17 * ay, 0.085 * h)
        sinus = _ellipsoid(X, Y, Z, (kc[0] - sx * 0.08 * ax, kc[1] + 0.04 * ay, kc[2]), (0.06 * ax, 0.06 * ay, 0.04 * h))
        kidney = _ellipsoid(X, Y, Z, kc, kr) & ~sinus
        medulla = _ellipsoid(X, Y, Z, kc, [0.6 * r for r in kr])
        paint(f"kidney_{side}", kidney, np.where(medulla, phase["medulla"], phase["cortex"]) + 10.0 * tex)
        paint(None, sinus, -60.0 + 10.0 * tex)
    paint("urinary_bladder", _ellipsoid(X, Y, Z, (0.0, 0.35 * ay, -0.4 * h), (0.17 * ax * j(), 0.24 * ay, 0.065 * h)), 6.0 + 4.0 * tex)
    # colon: a frame of gas and stool; small bowel: fluid-filled loops with enhancing walls in what is left
    colon_path = (((np.abs(X) - 0.55 * ax) ** 2 + (Y - 0.15 * ay) ** 2 <= (0.1 * ax) ** 2) & (Z > -0.3 * h) & (Z < -0.02 * h)) | \
                 (((Z + 0.02 * h) ** 2 / (0.07 * h) ** 2 + (Y - 0.4 * ay) ** 2 / (0.15 * ay) ** 2 <= 1) & (np.abs(X) < 0.6 * ax))
    paint("colon", colon_path & cavity & below, np.where(tex > 0.6, -900.0, 25.0 + 15.0 * tex))
    loops = cavity & (Z < -0.04 * h) & (Z > -0.33 * h) & (Y > -0.2 * ay) & (np.abs(strands) > 0.3)
    paint("small_bowel", loops, np.where(np.abs(strands) < 0.55, 120.0, 20.0) + 8.0 * tex)

    masks = {name: label == k + 1 for k, name in enumerate(names)}
    # scanner: in-plane PSF and slice profile (partial-volume edges), then correlated noise
    img = gaussian_filter(img, sigma=(0.5, 0.5, 0.45))
    sigma_n = rng.uniform(8.0, 22.0) / np.sqrt(max(1.0, spacing[2] / 2.5))
    noise = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=(0.6, 0.6, 0.3))
    img += noise * (sigma_n / max(float(noise.std()), 1e-6))
    img[~body & (img < -900)] = -1000.0 + rng.normal(0.0, 3.0, size=int((~body & (img < -900)).sum()))
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16), masks


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
                       shape: Sequence[tuple[int, int]] | None = None, spacing: float = 1.5, upsample: int = 1) -> Path:
    """Write ``cases`` phantom CTs in the TotalSegmentator layout under ``out``; returns ``out``.

    ``classes`` is ``totalseg-v2`` (117 mask files per case, v2 names) or ``totalseg-v1`` (104).
    ``shape``: per-axis (lo, hi) voxel counts, each case's size drawn uniformly in them, at
    isotropic ``spacing`` mm (benchmark-sized volumes, e.g. ``parse_shape_range("260-300,210-250,
    240-300")``). Default: the small mixed-spacing cases (~80-97 voxels in-plane) the tests use,
    reproducible byte for byte for a given seed and generator version.
    ``upsample`` (with ``shape``): build the phantom on a grid ``upsample`` times coarser and repeat
    each voxel to the requested shape. The phantom needs ~140 bytes per voxel (15 GB for 512x512x400),
    so a 512x512x1000 case is only feasible this way (``bench prepare --full-size``); its files have
    the full size and the 117 masks, with blockier edges and a CT that compresses much better (512x512x1000
    with ``upsample=2``: 84 MB of gzip for 524 MB; 512x512x400 built directly: 103 MB for 210 MB), so
    its gunzip is cheaper than a real scan's. 512x512x1000 with ``upsample=2``: 9 min, 4.9 GB peak.
    """
    if classes not in ("totalseg-v1", "totalseg-v2"):
        raise ValueError(f"classes must be totalseg-v1 or totalseg-v2, got {classes!r}")
    if shape is not None and (len(shape) != 3 or not spacing > 0):
        raise ValueError(f"shape needs three (lo, hi) ranges and spacing > 0, got {shape!r}, {spacing!r}")
    version = "v2" if classes.endswith("v2") else "v1"
    cmap = load_class_map(classes)
    out = Path(out)
    if upsample < 1 or (upsample > 1 and shape is None):
        raise ValueError(f"upsample must be >= 1 and needs shape, got {upsample!r}")
    record = {"generator_version": GENERATOR_VERSION, "cases": cases, "seed": seed, "classes": classes,
              "shape": [list(r) for r in shape] if shape is not None else None, "spacing": spacing if shape is not None else None}
    if upsample > 1:  # only then, so existing demo datasets stay current
        record["upsample"] = upsample
    if demo_is_current(out, record):
        log.info(f"{out}: demo dataset up to date (demo.json), nothing written")
        return out
    (out / "demo.json").unlink(missing_ok=True)  # a half-rewritten dataset is never taken as current
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
        if upsample > 1:
            coarse = tuple(-(-n // upsample) for n in case_shape)
            ct, masks = phantom(rng, coarse, tuple(s * upsample for s in case_spacing), version)
        else:
            ct, masks = phantom(rng, case_shape, case_spacing, version)

        def grow(a: np.ndarray, shape=case_shape) -> np.ndarray:
            """Coarse phantom array -> the case's grid, each voxel repeated ``upsample`` times per axis."""
            if upsample == 1:
                return a
            return np.repeat(np.repeat(np.repeat(a, upsample, 0), upsample, 1), upsample, 2)[: shape[0], : shape[1], : shape[2]]
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
        def to_file(a, ornt=ornt):
            return np.ascontiguousarray(apply_ornt(a, ornt))

        qcode = 0 if i % 4 == 1 else 1  # like the real dataset, some files carry only an sform
        case_dir = out / case_id
        seg_dir = case_dir / "segmentations"
        seg_dir.mkdir(parents=True, exist_ok=True)
        (case_dir / "ct.nii.gz").write_bytes(_nifti_bytes(to_file(grow(ct)), file_aff, qcode))
        del ct
        empty = _nifti_bytes(to_file(np.zeros(case_shape, np.uint8)), file_aff, qcode)
        for name in cmap.foreground:
            m = masks.get(name)
            data = _nifti_bytes(to_file(grow(m.astype(np.uint8))), file_aff, qcode) if m is not None and m.any() else empty
            (seg_dir / f"{name}.nii.gz").write_bytes(data)
        age = int(rng.integers(25, 85))
        lines.append(f"{case_id};{age};{'mf'[i % 2]};demo;ct abdomen-thorax;{splits[i]};Phantom;Synthetic;120;no_pathology;")
        log.info(f"{case_id}: {case_shape} at {np.round(case_spacing, 2).tolist()} mm, stored as {''.join(codes)}"
                 f"{f' tilted {tilt} deg' if tilt else ''}, split {splits[i]}")
    (out / "meta.csv").write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode("utf-8"))
    (out / "demo.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def demo_is_current(out: Path, record: dict) -> bool:
    """``out`` holds a complete demo dataset written by this generator with these arguments."""
    try:
        return json.loads((Path(out) / "demo.json").read_text()) == record
    except (OSError, ValueError):
        return False


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
