"""A small downstream task for transfer studies: demo phantoms as an nnU-Net v2 raw dataset.

What a team that fine-tunes a TotalSegmentator-pretrained STU-Net typically has: a handful of
labelled scans of its own, a label set of its own, acquired differently from the pretraining data.
Here that is

* **labels**: six structures, grouped differently from TotalSegmentator's classes
  (``GROUPS``: the two kidneys are one class "kidneys", the five lung lobes one class "lungs", the
  aorta and the inferior vena cava one class "great_vessels", every vertebra and the sacrum one
  class "spine"; liver and spleen as they are). A pretraining class map may lack some of them
  (``totalseg-major`` has no vertebrae: there the spine was background);
* **acquisition**: thinner in-plane spacing (1.3-1.7 mm) and 2.5-4 mm slices, and an abdominal field
  of view (the phantom's top and bottom ~15% are cut off, so the lungs and the pelvis are truncated),
  unlike the demo pretraining set (``stunet_scale.data.ingest.demo``: whole torso, ~2.2 mm in-plane);
* **modality** (``modality="mr"``): an MR-like image instead of CT. Tissue intensities are remapped
  by a non-monotonic curve of HU (fat bright, water-like tissue mid-grey, bone and air dark, organ
  contrasts reordered), times a smooth bias field, with Rician noise; float32, channel name "MR",
  so ``prepare`` treats it as non-CT (nonzero crop) and the z-score normalisation applies as for any
  MR dataset. ``modality="ct"`` keeps the phantom's HU (int16, channel "CT").

Layout (nnU-Net v2 raw): ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz`` (uint8, values
= the order of ``GROUPS`` after background), ``dataset.json``, and ``splits_final.json`` in nnU-Net's
own format (a list of folds, each ``{"train": [...], "val": [...]}``; one fold here): the first
``train_cases`` cases are the labelled training set, the others held-out validation cases. Files are
stored RAS (identity direction), byte-for-byte reproducible for a seed. Cases come from
``stunet_scale.data.ingest.demo.phantom`` with their own random streams (``[seed, 7001, i]``), so no case is
one of the pretraining phantoms.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np

from .sources import NNUNET_SPLITS_FILE

log = logging.getLogger("stunet_scale.demo")

# downstream class -> the TotalSegmentator mask names merged into it (absent names are skipped)
GROUPS: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidneys": ("kidney_left", "kidney_right"),
    "lungs": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
              "lung_lower_lobe_right"),
    "great_vessels": ("aorta", "inferior_vena_cava"),
    "spine": ("vertebrae_*", "sacrum"),  # "*": every mask name with that prefix
}
MODALITIES = ("ct", "mr")

# MR-like contrast: signal (0..1) as a function of CT HU, piecewise linear and deliberately not
# monotonic (fat brightest, soft tissue mid-grey with its order changed, enhancing blood mid-bright,
# cortical bone and air dark), roughly a T1-weighted look.
_MR_HU = np.array([-1024.0, -600.0, -200.0, -100.0, -30.0, 0.0, 30.0, 50.0, 70.0, 150.0, 300.0, 500.0, 1200.0, 3071.0])
_MR_SIGNAL = np.array([0.0, 0.02, 0.80, 0.95, 0.55, 0.30, 0.42, 0.60, 0.36, 0.70, 0.55, 0.18, 0.08, 0.05])


def mr_like(ct: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An MR-like float32 image from a CT (HU) volume: remapped contrast x bias field + Rician noise."""
    signal = np.interp(ct.astype(np.float32), _MR_HU, _MR_SIGNAL).astype(np.float32)
    # smooth multiplicative bias field (coil sensitivity): +-~25% over the field of view
    shape = ct.shape
    axes = [((np.arange(n) + 0.5) / n - 0.5) for n in shape]
    bias = np.ones(shape, np.float32)
    for k, a in enumerate(axes):
        freq, phase = rng.uniform(0.5, 1.2), rng.uniform(0, 2 * np.pi)
        b = 1.0 + 0.12 * np.cos(2 * np.pi * freq * a + phase)
        bias *= b.reshape([-1 if j == k else 1 for j in range(3)]).astype(np.float32)
    signal *= bias
    sigma = 0.025
    noisy = np.sqrt((signal + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    return (1000.0 * noisy).astype(np.float32)


def _case_geometry(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float], float]:
    """(phantom shape, spacing, z fraction cut off at each end): an abdominal CT/MR field of view."""
    sxy = float(rng.uniform(1.3, 1.7))
    sz = float(rng.uniform(2.5, 4.0))
    extent = (float(rng.uniform(170, 190)), float(rng.uniform(140, 155)), float(rng.uniform(230, 260)))
    shape = tuple(int(round(e / s)) for e, s in zip(extent, (sxy, sxy, sz)))
    return shape, (sxy, sxy, sz), float(rng.uniform(0.12, 0.18))


def downstream_case(rng: np.random.Generator, modality: str = "ct", version: str = "v2"):
    """(image, label uint8, spacing) of one downstream case."""
    from .demo import phantom

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    shape, spacing, cut = _case_geometry(rng)
    ct, masks = phantom(rng, shape, spacing, version)
    label = np.zeros(shape, np.uint8)
    for value, group in enumerate(GROUPS, 1):
        for pattern in GROUPS[group]:
            names = [n for n in masks if n.startswith(pattern[:-1])] if pattern.endswith("*") else [pattern]
            for name in names:
                m = masks.get(name)
                if m is not None:
                    label[m] = value
    lo, hi = int(round(cut * shape[2])), int(round((1 - cut) * shape[2]))
    ct, label = ct[:, :, lo:hi], label[:, :, lo:hi]
    image = mr_like(ct, rng) if modality == "mr" else ct
    return np.ascontiguousarray(image), np.ascontiguousarray(label), spacing


def _nifti_gz(data: np.ndarray, spacing) -> bytes:
    import nibabel as nib

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(data.shape) * np.asarray(spacing) / 2  # centred, RAS
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def write_downstream_dataset(out: str | Path, train_cases: int = 3, val_cases: int = 4, seed: int = 0,
                             modality: str = "ct") -> Path:
    """Write the downstream nnU-Net raw dataset under ``out`` (see the module docstring); returns ``out``.

    Idempotent: an ``out`` whose dataset.json records the same parameters is left as it is.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if train_cases < 1 or val_cases < 1:
        raise ValueError(f"need >= 1 training and >= 1 validation case, got {train_cases} and {val_cases}")
    out = Path(out)
    params = {"generator": "stunet_scale.data.ingest.demo_downstream", "train_cases": train_cases, "val_cases": val_cases,
              "seed": seed, "modality": modality}
    ds_path = out / "dataset.json"
    if ds_path.is_file() and (out / NNUNET_SPLITS_FILE).is_file():
        try:
            if json.loads(ds_path.read_text()).get("stunet_scale_demo") == params:
                return out
        except json.JSONDecodeError:
            pass
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    ids = [f"down_{i:03d}" for i in range(train_cases + val_cases)]
    for i, case in enumerate(ids):
        rng = np.random.default_rng([seed, 7001, i])
        image, label, spacing = downstream_case(rng, modality)
        (out / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(_nifti_gz(image, spacing))
        (out / "labelsTr" / f"{case}.nii.gz").write_bytes(_nifti_gz(label, spacing))
        present = [g for v, g in enumerate(GROUPS, 1) if (label == v).any()]
        log.info(f"{case}: {modality} {image.shape} at {np.round(spacing, 2).tolist()} mm, "
                 f"{'train' if i < train_cases else 'val'}, classes {present}")
    splits = [{"train": ids[:train_cases], "val": ids[train_cases:]}]
    (out / NNUNET_SPLITS_FILE).write_text(json.dumps(splits, indent=2) + "\n")
    dataset = {
        "channel_names": {"0": "CT" if modality == "ct" else "MR"},
        "labels": {"background": 0, **{g: k for k, g in enumerate(GROUPS, 1)}},
        "numTraining": len(ids),
        "file_ending": ".nii.gz",
        "name": f"demo downstream ({modality}, {len(GROUPS)} grouped classes)",
        "stunet_scale_demo": params,
    }
    ds_path.write_text(json.dumps(dataset, indent=2) + "\n")
    return out
