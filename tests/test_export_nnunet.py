"""The exported nnU-Net v2 folder runs in an unmodified nnunetv2 (PyPI), with our preprocessing.

nnU-Net imports our network class by the name in plans.json, reads the image with its own
NibabelIOWithReorient, applies plans' transpose / z-score / resampling, predicts, and writes the
segmentation back in the input geometry. We check (1) its preprocessing produces our network input
on an oblique, anisotropic, LPS image, and (2) its full predictor agrees with `stunet-scale predict`.
"""

from __future__ import annotations

import json

import nibabel as nib

# nnunetv2 is in the dev extra: a missing install must fail these tests, not skip them quietly
# (a skip would hide that the exported folder was never run through nnU-Net's own predictor).
import nnunetv2  # noqa: F401
import numpy as np
import pytest
import torch
from export_fixtures import ellipsoid_phantom, oblique_lps_affine, write_source

from stunet_scale.export import export
from stunet_scale.export.checkpoint_io import read_weights
from stunet_scale.export.model_input import preprocess
from stunet_scale.predict import predict, read_case


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    source, _, _ = write_source(root / "ckpt.pth")
    result = export(source, root / "export", formats=["nnunet", "safetensors"], log=lambda *a: None)
    shape = (48, 40, 30)
    affine = oblique_lps_affine(spacing=(1.1, 1.4, 2.5))
    image, _ = ellipsoid_phantom(shape, affine, (20, 22, 14), (20, 14, 25))
    image += np.random.RandomState(0).normal(0, 20, size=shape).astype(np.float32)
    (root / "in").mkdir()
    nib.save(nib.Nifti1Image(image, affine), str(root / "in" / "case_0000.nii.gz"))
    return root, result, affine


def _plans(folder):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(json.loads((folder / "plans.json").read_text()))
    return plans, plans.get_configuration("3d_fullres"), json.loads((folder / "dataset.json").read_text())


def test_nnunet_preprocessing_equals_ours(case):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    root, result, _ = case
    plans, conf, dataset = _plans(result.nnunet_folder)
    theirs, _, _ = DefaultPreprocessor(verbose=False).run_case(
        [str(root / "in" / "case_0000.nii.gz")], None, plans, conf, dataset)
    spec = read_weights(result.out).spec
    image, affine, _ = read_case([root / "in" / "case_0000.nii.gz"])
    ours, _ = preprocess(image, affine, spec)
    assert theirs.shape == ours.shape  # same axis order, same resampled grid
    # nnU-Net z-scores before resampling (and with skimage), we after: a few hundredths of a std apart.
    assert np.abs(theirs - ours).max() < 0.1 and np.abs(theirs - ours).mean() < 0.02
    for axis in (1, 2, 3):
        assert np.abs(theirs - np.flip(ours, axis)).mean() > 0.2  # a wrong orientation would show


def test_stock_nnunet_predictor_runs_the_folder(case):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    root, result, affine = case
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(result.nnunet_folder), use_folds=(0,))
    assert type(predictor.network).__name__ == "STUNetForNNUNet"
    assert predictor.allowed_mirroring_axes == (1, 2)  # trained flips of x, y = axes 2, 1 in (z, y, x)
    predictor.predict_from_files_sequential([[str(root / "in" / "case_0000.nii.gz")]], [str(root / "nnunet_case")],
                                            save_probabilities=False, overwrite=True)
    theirs_img = nib.load(str(root / "nnunet_case.nii.gz"))
    assert theirs_img.shape == (48, 40, 30) and np.allclose(theirs_img.affine, affine)
    predict(result.out, root / "in", root / "ours", device="cpu")
    theirs = np.asarray(theirs_img.dataobj)
    ours = np.asarray(nib.load(str(root / "ours" / "case.nii.gz")).dataobj)
    counts = np.bincount(ours.ravel(), minlength=4)
    assert (counts[:3] > 0.1 * ours.size).all(), "the test model must not predict one class everywhere"
    agreement = (theirs == ours).mean()
    # The random test model has many near-ties that nnU-Net's fp16 logit accumulation flips; a geometry
    # error (flip, transpose, shift) costs far more than that.
    assert agreement > 0.85, agreement
    for axis in range(3):
        assert (theirs == np.flip(ours, axis)).mean() < agreement - 0.2


@pytest.mark.slow
def test_nnunetv2_predict_command_finds_the_dataset_id(case, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    root, result, affine = case
    # The console script sits next to this interpreter (a venv need not be on PATH, as in CI).
    exe = shutil.which("nnUNetv2_predict", path=os.path.dirname(sys.executable)) or shutil.which("nnUNetv2_predict")
    assert exe is not None, "nnUNetv2_predict is neither next to this Python nor on PATH (reinstall nnunetv2)"
    env = dict(os.environ, nnUNet_results=str(result.out / "nnunet"), nnUNet_raw=str(tmp_path),
               nnUNet_preprocessed=str(tmp_path))
    cmd = [exe, "-i", str(root / "in"), "-o", str(tmp_path / "pred"), "-d", "900", "-c", "3d_fullres", "-f", "0",
           "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = nib.load(str(tmp_path / "pred" / "case.nii.gz"))
    assert out.shape == (48, 40, 30) and np.allclose(out.affine, affine)
