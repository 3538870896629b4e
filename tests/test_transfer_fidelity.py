"""Our exports compute, in the downstream tools, the function we trained (issue: faithful checkpoints).

A tiny STU-Net is trained for 300 steps by the real trainer (demo phantoms as an nnU-Net raw dataset
with 4 labels, prepared by `prepare`), with the release's conventions (anisotropic last
down-sampling, nnU-Net's z-score statistics), and exported. Then:

1. A network built, in nnU-Net's own conventions, from plans that mirror the released STU-Net plans
   (their plans.pkl: ``transpose_forward [0,1,2]``, ``ZScoreNormalization`` without mask,
   1.5 mm, pool strides ending in ``[1,1,2]``), loads our exported ``.pth`` unchanged and, through
   ``nnunetv2``'s preprocessor and predictor, computes the logits ``stunet-scale predict`` computes,
   on an LAS, anisotropic (0.8 x 0.8 x 2.5 mm) synthetic CT and on the shared real CT. The patch is
   32^3 instead of 128^3 (CPU time; the patch changes only the sliding window, the same on both sides).
2. Stock ``nnUNetv2_predict`` with our exported folder and ``stunet-scale predict`` agree on >= 99.5%
   of the voxels of the same CTs.

Each comparison has a control that must fail: the trained weights without the axis conversion.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import nnunetv2  # noqa: F401 - dev extra; a missing install must fail, not skip
import numpy as np
import pytest
import torch
from conftest import REPO, SHARED

from stunet_scale.export import export, load_pretrained
from stunet_scale.export.axes import TRAINING_AXIS_ORDER, TRANSFER_AXIS_ORDER, to_axis_order
from stunet_scale.export.checkpoint_io import read_weights, safe_torch_load
from stunet_scale.export.nnunet_network import STUNetForNNUNet
from stunet_scale.export.spec import RELEASED_POOL_STRIDES
from stunet_scale.predict import Runtime, network_logits, predict, read_case

# The release's five down-samplings end in [1, 1, 2] (z, y, x); the tiny model keeps that shape of
# pyramid with four stages: the last down-sampling halves x only. In the trainer's (x, y, z) order:
TINY_STRIDES_XYZ = [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 1, 1]]
STEPS = 300  # configs/debug.yaml: 6 epochs x 100 samples / batch 2


# A downstream-style label set with clear CT contrast, so that 300 steps give a model that decides:
# a model that has learned little has near-tied logits over much of a CT, and nnU-Net's fp16
# sliding-window accumulator then flips the arg-max there whatever the export does.
GROUPS = {
    "lung": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
             "lung_lower_lobe_right"),
    "bone": ("sacrum", "hip_left", "hip_right", "femur_left", "femur_right"),  # + every vertebra below
    "kidney": ("kidney_left", "kidney_right"),
    "aorta": ("aorta",),
}


def _few_label_dataset(root: Path, cases: int = 6) -> Path:
    """Demo phantoms as an nnU-Net raw dataset with 4 merged labels, on-disk RAS, 1.5-2 mm."""
    from stunet_scale.data.ingest.demo import phantom

    names = ["background", *GROUPS]
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(cases):
        rng = np.random.default_rng([11, i])
        spacing = (float(rng.uniform(1.5, 2.0)),) * 2 + (float(rng.uniform(1.5, 2.5)),)
        shape = tuple(int(round(e / s)) for e, s in zip((185.0, 150.0, 160.0), spacing))
        ct, masks = phantom(rng, shape, spacing, "v1")
        label = np.zeros(shape, np.uint8)
        for value, group in enumerate(GROUPS, 1):
            members = GROUPS[group] + (tuple(n for n in masks if n.startswith("vertebrae")) if group == "bone" else ())
            for n in members:
                if n in masks:
                    label[masks[n]] = value
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(ct, affine), str(root / "imagesTr" / f"case{i:02d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"case{i:02d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {n: k for k, n in enumerate(names)}, "numTraining": cases,
        "file_ending": ".nii.gz"}))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(export result, run dir): the real trainer, 300 steps on a prepared demo dataset, then `export`."""
    from stunet_scale.data.ingest.prepare import prepare_dataset
    from stunet_scale.train import EXIT_OK, main

    root = tmp_path_factory.mktemp("fidelity")
    raw = _few_label_dataset(root / "raw")
    # nnU-Net's nonzero crop (all of a CT): the model sees the air around the body as background
    done = prepare_dataset(raw, root / "store", format="zarr", crop="nonzero")
    assert done["exit_code"] == 0, done
    run = root / "run"
    code = main(["--config", str(REPO / "configs" / "debug.yaml"), f"run_dir={run}", f"data.root={root / 'store'}",
                 "data.class_map=dataset.json", f"model.num_classes={len(GROUPS) + 1}",
                 f"model.pool_strides={json.dumps(TINY_STRIDES_XYZ)}", "schedule.epochs=6",
                 "schedule.samples_per_epoch=100", f"checkpoint.every_steps={STEPS}", "validation.enabled=false",
                 "tracking.enabled=false", "tracking.log_every_steps=100", "augmentation.enabled=false"])
    assert code == EXIT_OK
    result = export(run, root / "export", log=lambda *a: None)
    return result, run


def _las_ct(path: Path) -> Path:
    """A phantom CT stored LAS (x flipped on disk) at 0.8 x 0.8 x 2.5 mm: nnU-Net's separate-z path."""
    from stunet_scale.data.ingest.demo import phantom
    from stunet_scale.data.ingest.preprocess import apply_ornt, invert_ornt, ornt_affine

    shape, spacing = (230, 190, 64), (0.8, 0.8, 2.5)
    ct, _ = phantom(np.random.default_rng(7), shape, spacing, "v1")
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = [-90.0, -70.0, -75.0]
    ornt = invert_ornt(nib.orientations.axcodes2ornt(("L", "A", "S")))
    affine = ornt_affine(ras, ornt, shape)
    assert nib.aff2axcodes(affine) == ("L", "A", "S")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(apply_ornt(ct, ornt)), affine), str(path))
    return path


def _cases(root: Path) -> list[tuple[str, Path, str]]:
    """(name, file, nnU-Net reader): the LAS CT always, the shared real CT (RAS, 3 mm) when present.
    A RAS file gives SimpleITK's (z, y, x) = (S, A, R), the arrays the release was trained on;
    for the LAS file NibabelIOWithReorient hands nnU-Net the same RAS (z, y, x) arrays."""
    cases = [("las", _las_ct(root / "las" / "las_0000.nii.gz"), "NibabelIOWithReorient")]
    real = SHARED / "data" / "totalseg_sample" / "s0001" / "ct.nii.gz"
    if real.is_file():
        (root / "real").mkdir(exist_ok=True)
        shutil.copy(real, root / "real" / "real_0000.nii.gz")
        cases.append(("real", root / "real" / "real_0000.nii.gz", "SimpleITKIO"))
    return cases


def _release_plans(spec, reader: str) -> tuple[dict, dict]:
    """Plans in nnU-Net's conventions mirroring the released STU-Net plans (see the module docstring), with the tiny
    model's widths and a 32^3 patch; dataset.json with generic label names."""
    arch = {k: spec.model[k] for k in ("size", "base_width", "blocks_per_stage", "width_multipliers",
                                         "pool_strides", "kernel_sizes")}
    resample = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    plans = {
        "dataset_name": "Dataset901_Release", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.5, 1.5, 1.5], "original_median_shape_after_transp": [128] * 3,
        "image_reader_writer": reader, "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [32, 32, 32], "median_image_size_in_voxels": [128] * 3, "spacing": [1.5, 1.5, 1.5],
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resample, "resampling_fn_seg_kwargs": {**resample, "is_seg": True, "order": 1},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {**resample, "order": 1},
            "architecture": {"network_class_name": "x", "arch_kwargs": arch, "_kw_requires_import": []},
            "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {}},
    }
    labels = {"background": 0, **{f"class_{k}": k for k in range(1, spec.num_classes)}}
    dataset = {"channel_names": {"0": "zscore"}, "labels": labels, "numTraining": 0, "file_ending": ".nii.gz"}
    return plans, dataset


def _nnunet_predictor(weights: dict, spec, reader: str):
    """nnU-Net v2's preprocessor and predictor (no TTA) for a network built from the release-like plans."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset = _release_plans(spec, reader)
    pm = PlansManager(plans)
    conf = pm.get_configuration("3d_fullres")
    net = STUNetForNNUNet(input_channels=1, num_classes=spec.num_classes, deep_supervision=False,
                          **conf.network_arch_init_kwargs)
    net.load_state_dict(weights, strict=True)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(net.eval(), pm, conf, [weights], dataset, "nnUNetTrainer", None)

    def preprocess(ct: Path) -> np.ndarray:
        data, _, _ = DefaultPreprocessor(verbose=False).run_case([str(ct)], None, pm, conf, dataset)
        return data

    def logits(data: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float()

    return preprocess, logits


def test_release_plans_network_in_nnunet_computes_our_logits(trained, tmp_path):
    result, _ = trained
    pth = result.out / "stunet" / "checkpoint_final.pth"
    exported = safe_torch_load(pth)["network_weights"]  # the file, unchanged
    spec = read_weights(pth).spec
    assert spec.axis_order == TRANSFER_AXIS_ORDER
    # the release's pyramid shape: the last down-sampling halves the last (x) array axis only
    assert spec.model["pool_strides"][-1] == RELEASED_POOL_STRIDES[-1] == [1, 1, 2]
    ours_net = load_pretrained(result.out, deep_supervision=False)
    rt = Runtime(device=torch.device("cpu"), autocast_dtype=None, progress=False)
    for k, (name, ct, reader) in enumerate(_cases(tmp_path)):
        nn_preprocess, nn_logits = _nnunet_predictor(exported, spec, reader)
        theirs_x = nn_preprocess(ct)
        theirs = nn_logits(theirs_x)
        image, affine, _ = read_case([ct])
        with torch.no_grad():
            ours, ours_x, _ = network_logits(ours_net, ours_net.spec, image, affine, rt)
        # Same network input: axis order, grid, z-score statistics (nnU-Net's nonzero box, before
        # resampling). Float rounding only: nnU-Net normalises before its skimage resampling, we after.
        assert theirs_x.shape == ours_x.shape, name
        assert np.abs(theirs_x - ours_x).max() < 1e-3, (name, np.abs(theirs_x - ours_x).max())
        # Same logits, to the precision of nnU-Net's sliding window, which accumulates logits and
        # Gaussian weights in fp16: where only the far tails of the Gaussian cover a voxel (image
        # corners) both sums are fp16 subnormals and lose digits, so the bound is on the 99.9th
        # percentile, plus the arg-max.
        scale = float(ours.abs().max())
        diff = (theirs - ours).abs().flatten()
        err = float(diff.kthvalue(int(0.999 * diff.numel())).values)
        print(f"{name}: input max diff {np.abs(theirs_x - ours_x).max():.2e}; logits |diff| 99.9th pct {err:.2e}, "
              f"max {float(diff.max()):.2e} (logit scale {scale:.1f})")
        agree = float((theirs.argmax(0) == ours.argmax(0)).float().mean())
        print(f"{name}: arg-max agreement {agree:.4%}")
        assert err < 1e-2 * scale, (name, err, scale)
        assert agree > 0.998, name  # near-ties within nnU-Net's fp16 rounding may flip
        assert len(torch.unique(ours.argmax(0))) >= 3, "a trained model, not one class everywhere"
        if k == 0:
            # Control: the trained (x, y, z) weights without the conversion compute something else.
            unconverted, _ = to_axis_order(dict(exported), spec, TRAINING_AXIS_ORDER)
            wrong = _nnunet_predictor(unconverted, spec, reader)[1](theirs_x)
            wrong_diff = (wrong - ours).abs().flatten()
            q99 = lambda d: float(d.kthvalue(int(0.99 * d.numel())).values)  # noqa: E731
            print(f"{name} control (weights left in training axes): logits |diff| 99th pct {q99(wrong_diff):.2e} "
                  f"vs {q99(diff):.2e} converted; arg-max agreement "
                  f"{float((wrong.argmax(0) == ours.argmax(0)).float().mean()):.4f}")
            assert q99(wrong_diff) > 0.02 * scale and q99(wrong_diff) > 20 * q99(diff), name


@pytest.mark.slow
def test_stock_nnunetv2_predict_agrees_with_ours(trained, tmp_path):
    result, _ = trained
    exe = shutil.which("nnUNetv2_predict", path=os.path.dirname(sys.executable)) or shutil.which("nnUNetv2_predict")
    assert exe is not None, "nnUNetv2_predict is neither next to this Python nor on PATH (reinstall nnunetv2)"
    env = dict(os.environ, nnUNet_results=str(result.out / "nnunet"), nnUNet_raw=str(tmp_path),
               nnUNet_preprocessed=str(tmp_path))
    plans = json.loads((result.nnunet_folder / "plans.json").read_text())
    assert plans["transpose_forward"] == [0, 1, 2]  # as the release: weights hold its (z, y, x) convention
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
    for name, ct, _ in _cases(tmp_path):
        cmd = [exe, "-i", str(ct.parent), "-o", str(tmp_path / f"nn_{name}"), "-d", "900", "-c", "3d_fullres",
               "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        predict(result.out, ct, tmp_path / f"ours_{name}.nii.gz", device="cpu")
        theirs = np.asarray(nib.load(str(tmp_path / f"nn_{name}" / f"{name}.nii.gz")).dataobj)
        ours_img = nib.load(str(tmp_path / f"ours_{name}.nii.gz"))
        ours = np.asarray(ours_img.dataobj)
        assert np.allclose(ours_img.affine, nib.load(str(ct)).affine)
        agreement = float((theirs == ours).mean())
        foreground = (theirs > 0) | (ours > 0)
        fg_agreement = float((theirs == ours)[foreground].mean())
        print(f"{name}: stock nnUNetv2_predict vs stunet-scale predict agree on {agreement:.4%} of voxels, "
              f"{fg_agreement:.4%} of the {int(foreground.sum())} voxels either calls foreground")
        assert foreground.mean() > 0.05, "a trained model, not background everywhere"
        assert agreement >= 0.995, (name, agreement)
        for axis in range(3):  # a flipped or transposed convention would cost far more
            assert (theirs == np.flip(ours, axis)).mean() < agreement - 0.02, (name, axis)


@pytest.mark.slow
def test_released_s_file_round_trips_bit_identical_and_predicts_identically(tmp_path):
    """A STU-Net-S file saved the way the official fork (nnU-Net v1) saves it -> load_pretrained and
    export -> the same tensors bit for bit, and the same prediction before and after."""
    from test_load_pretrained import released_like, write_v1_model

    sd = released_like("S", seed=3)
    write_v1_model(tmp_path / "small_ep4k.model", sd)
    model = load_pretrained(tmp_path / "small_ep4k.model")
    assert model.spec.axis_order == TRANSFER_AXIS_ORDER and model.config.pool_strides == RELEASED_POOL_STRIDES
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    result = export(tmp_path / "small_ep4k.model", tmp_path / "export", log=lambda *a: None)
    for rel in ("stunet/small_ep4k.model", "stunet/checkpoint_final.pth",
                "nnunet/Dataset900_STUNetS_stunet/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth"):
        obj = safe_torch_load(result.out / rel)
        again = obj.get("state_dict", obj.get("network_weights"))
        assert list(again) == list(sd), rel
        assert all(torch.equal(again[k], v) for k, v in sd.items()), rel
    assert read_weights(result.out).spec.model["pool_strides"] == RELEASED_POOL_STRIDES
    reloaded = load_pretrained(result.out)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in sd.items())
    # One 128^3 window (a 60x50x40 CT at 2 mm is smaller than the patch at 1.5 mm): same labels.
    from stunet_scale.data.ingest.demo import phantom

    ct, _ = phantom(np.random.default_rng(1), (60, 50, 40), (2.0, 2.0, 2.0), "v1")
    nib.save(nib.Nifti1Image(ct, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    predict(tmp_path / "small_ep4k.model", tmp_path / "ct.nii.gz", tmp_path / "before.nii.gz", device="cpu")
    predict(result.out, tmp_path / "ct.nii.gz", tmp_path / "after.nii.gz", device="cpu")
    before = np.asarray(nib.load(str(tmp_path / "before.nii.gz")).dataobj)
    after = np.asarray(nib.load(str(tmp_path / "after.nii.gz")).dataobj)
    assert np.array_equal(before, after)


def test_init_from_a_released_file_continues_in_the_trainers_axes(tmp_path):
    """`checkpoint.init_from` (continuing pretraining from a released file): the trainer's model runs
    in RAS (x, y, z) with the recipe's strides; the release's (z, y, x) kernels arrive reversed, and
    a model whose strides differ from the checkpoint's is told so in the report."""
    from test_load_pretrained import released_like, write_v1_model

    from stunet_scale.config import load_config
    from stunet_scale.export import initialize_from_pretrained
    from stunet_scale.models import build_stunet

    sd = released_like("S", seed=4)
    write_v1_model(tmp_path / "small_ep4k.model", sd)
    recipe = load_config(REPO / "configs" / "pretrain" / "totalseg_stunet_s.yaml")
    model = build_stunet(recipe.model)
    report = initialize_from_pretrained(model, tmp_path / "small_ep4k.model")
    key = "conv_blocks_context.1.0.conv1.weight"
    assert torch.equal(model.state_dict()[key], sd[key].permute(0, 1, 4, 3, 2))
    assert any("converted from ras_zyx to ras_xyz" in n for n in report.notes)
    assert not any("pool strides differ" in n for n in report.notes)
    # The same weights in a 5 x [2,2,2] model: they load, but the report says the function differs.
    iso = build_stunet("S")
    report = initialize_from_pretrained(iso, tmp_path / "small_ep4k.model")
    assert any("pool strides differ" in n for n in report.notes)
    # Round trip: the trainer's weights exported again are the released tensors, bit for bit.
    released = read_weights(tmp_path / "small_ep4k.model").spec
    trained = dataclasses.replace(released, axis_order=TRAINING_AXIS_ORDER,
                                  model={**released.model, "pool_strides": recipe.model.pool_strides})
    back, spec = to_axis_order(dict(model.state_dict()), trained, TRANSFER_AXIS_ORDER)
    assert spec.model["pool_strides"] == RELEASED_POOL_STRIDES
    assert all(torch.equal(back[k], v) for k, v in sd.items())
