"""`stunet-scale predict`: input geometry restored exactly, logits mapped back correctly, CLI behaviour."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_fixtures import ellipsoid_phantom, oblique_lps_affine, rotation, write_source

from stunet_scale.cli import main
from stunet_scale.export import export
from stunet_scale.export.spec import ModelSpec
from stunet_scale.models import ModelConfig
from stunet_scale.predict import logits_to_labels, predict


class Threshold(torch.nn.Module):
    """A stand-in network: foreground where the normalised intensity exceeds ``level``.

    With it, any error in reorientation, resampling or the way back shows up as a misplaced object.
    """

    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def forward(self, x):
        return torch.cat([self.level - x[:, :1], x[:, :1] - self.level], 1)


def threshold_spec(spacing=(1.5, 1.5, 1.5), crop="none", axis_order="ras_xyz") -> ModelSpec:
    model = dataclasses.asdict(ModelConfig(size=None, base_width=2, blocks_per_stage=1, num_classes=2).resolved())
    return ModelSpec(model=model, spacing=list(spacing), patch_size=[32, 32, 32], crop=crop, axis_order=axis_order,
                     labels=["background", "ellipsoid"])


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("axis_order", ["ras_xyz", "ras_zyx"])
def test_oblique_anisotropic_lps_input_round_trips(tmp_path, axis_order):
    shape = (70, 60, 24)
    affine = oblique_lps_affine(spacing=(0.9, 1.2, 4.0))
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    image, truth = ellipsoid_phantom(shape, affine, (25, 35, 12), (18, 12, 25))
    ref = nib.Nifti1Image(image, affine)
    ref.set_qform(affine, code=1)
    ref.set_sform(affine, code=2)
    nib.save(ref, str(tmp_path / "ct.nii.gz"))
    # mid-level between the two intensities, in z-score units of (almost exactly) the resampled image
    level = (200.0 - image.mean()) / image.std()
    spec = threshold_spec(axis_order=axis_order)
    result = predict("threshold", tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", network=Threshold(level),
                     spec=spec, device="cpu")
    assert result["written"] == [str(tmp_path / "seg.nii.gz")] and not result["failed"]
    out = nib.load(str(tmp_path / "seg.nii.gz"))
    assert out.shape == shape and out.get_data_dtype() == np.uint8
    assert np.array_equal(out.affine, ref.affine)
    assert np.allclose(out.get_qform(), ref.get_qform()) and np.allclose(out.get_sform(), ref.get_sform())
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    seg = np.asarray(out.dataobj).astype(bool)
    assert _dice(seg, truth) > 0.98  # through 0.9x1.2x4 mm -> 1.5 mm -> back
    centre = np.argwhere(truth).mean(0)
    assert np.abs(np.argwhere(seg).mean(0) - centre).max() < 0.5  # voxels of the input grid
    for axis in range(3):
        assert _dice(seg, np.flip(truth, axis)) < 0.9  # the phantom is asymmetric enough to catch flips
    labels = json.loads((tmp_path / "seg.labels.json").read_text())
    assert labels["labels"] == {"0": "background", "1": "ellipsoid"}


def test_reorientation_alone_is_exact(tmp_path):
    # Spacing already the model's, axes permuted and flipped (P, S, L): nothing is interpolated, so the
    # prediction must equal thresholding the input voxel for voxel.
    spacing = (1.5, 1.5, 1.5)
    perm = np.zeros((3, 3))
    perm[1, 0], perm[2, 1], perm[0, 2] = -1, 1, -1  # voxel axes -> (P, S, L)
    affine = np.eye(4)
    affine[:3, :3] = perm @ np.diag(spacing)
    affine[:3, 3] = (4.0, -7.0, 2.0)
    assert nib.aff2axcodes(affine) == ("P", "S", "L")
    image = np.random.RandomState(1).normal(0, 1, size=(23, 31, 17)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "x.nii.gz"))
    predict("threshold", tmp_path / "x.nii.gz", tmp_path / "y.nii.gz", network=Threshold(0.0),
            spec=threshold_spec(spacing), device="cpu")
    seg = np.asarray(nib.load(str(tmp_path / "y.nii.gz")).dataobj)
    expected = ((image - image.mean(dtype=np.float64)) / image.std(dtype=np.float64)) > 0
    assert np.array_equal(seg.astype(bool), expected)


def test_logits_to_labels_matches_trilinear_interpolation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 9, 7, 11, generator=gen)
    out_shape = (20, 13, 30)
    ref = F.interpolate(logits[None], size=out_shape, mode="trilinear", align_corners=False)[0].argmax(0)
    got = logits_to_labels(logits, out_shape, max_bytes=2 * 20 * 13 * 30 * 4)  # two classes per chunk
    assert got.dtype == torch.uint8 and tuple(got.shape) == out_shape
    assert torch.equal(got.long(), ref)
    assert torch.equal(logits_to_labels(logits, (9, 7, 11)), logits.argmax(0).to(torch.uint8))


def test_thick_slice_logits_are_resampled_back_as_nnunet_does():
    # Back to a 0.8 x 0.8 x 2.5 mm grid, nnU-Net resamples probabilities linearly in-plane and with
    # nearest along the thick axis (order_z=0); trilinear everywhere disagrees at every slice border.
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    from stunet_scale.predict import _resample_logits

    logits = torch.randn(4, 21, 19, 33, generator=torch.Generator().manual_seed(1))
    out_shape = [40, 36, 20]
    theirs = resample_data_or_seg_to_shape(logits.numpy(), out_shape, [1.5, 1.5, 1.5], [0.8, 0.8, 2.5],
                                           is_seg=False, order=1, order_z=0, force_separate_z=None)
    ours = _resample_logits(logits, out_shape, separate=2)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
    assert torch.equal(logits_to_labels(logits, out_shape, separate=2, max_bytes=40 * 36 * 20 * 4).long(),
                       torch.from_numpy(theirs).argmax(0))
    trilinear = F.interpolate(logits[None], size=out_shape, mode="trilinear", align_corners=False)[0]
    assert np.abs(trilinear.numpy() - theirs).max() > 0.1  # the test would see the old rule


def test_body_crop_keeps_air_as_background(tmp_path):
    # Air around the body is outside the crop the training statistics covered: it must come back as 0.
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.full((40, 40, 20), -1000.0, dtype=np.float32)
    image[8:32, 10:30, 2:18] = 40.0
    image[14:20, 15:22, 6:12] = 300.0
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "ct.nii.gz"))
    spec = threshold_spec(spacing=(2.0, 2.0, 2.0), crop="body")
    body = image[8:32, 10:30, 2:18]
    level = (170.0 - body.mean()) / body.std()
    predict("threshold", tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", network=Threshold(level), spec=spec,
            device="cpu")
    seg = np.asarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj)
    assert np.array_equal(seg.astype(bool), image == 300.0)


def test_trailing_singleton_axes_are_squeezed_as_prepare_does(tmp_path):
    # [x, y, z, 1, 1] is one 3-D volume (some converters write 5-D headers): predict reads it through
    # prepare's reader (sources.read_nifti), which squeezes every trailing singleton, not only a 4th.
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    image = np.random.RandomState(3).normal(0, 1, size=(12, 10, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(image[..., None, None], affine), str(tmp_path / "five_d.nii.gz"))
    assert nib.load(str(tmp_path / "five_d.nii.gz")).shape == (12, 10, 8, 1, 1)
    result = predict("threshold", tmp_path / "five_d.nii.gz", tmp_path / "seg.nii.gz", network=Threshold(0.0),
                     spec=threshold_spec(), device="cpu")
    assert not result["failed"] and result["written"] == [str(tmp_path / "seg.nii.gz")]
    seg = np.asarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj)
    expected = ((image - image.mean(dtype=np.float64)) / image.std(dtype=np.float64)) > 0
    assert seg.shape == (12, 10, 8) and np.array_equal(seg.astype(bool), expected)


def test_header_defects_are_reported_per_case_by_file(tmp_path, capsys):
    # prepare's header checks (qform != sform) apply to predict too; the case fails by name, the rest run
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    image = np.random.RandomState(4).normal(0, 1, size=(10, 10, 8)).astype(np.float32)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "in" / "good.nii.gz"))
    bad = nib.Nifti1Image(image, affine)
    bad.set_qform(np.diag([-1.5, 1.5, 1.5, 1.0]), code=1)
    bad.set_sform(affine, code=1)
    nib.save(bad, str(tmp_path / "in" / "bad.nii.gz"))
    result = predict("threshold", tmp_path / "in", tmp_path / "out", network=Threshold(0.0), spec=threshold_spec(),
                     device="cpu")
    assert result["written"] == [str(tmp_path / "out" / "good.nii.gz")]
    (msg,) = result["failed"].values()
    assert list(result["failed"]) == [str(tmp_path / "in" / "bad.nii.gz")]
    assert msg.startswith(str(tmp_path / "in" / "bad.nii.gz")) and "qform" in msg
    assert "bad.nii.gz: the header's geometry is ambiguous" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from stunet_scale.data.ingest.demo import make_demo_store
    from stunet_scale.data.store import open_store

    return open_store(make_demo_store(tmp_path_factory.mktemp("norm"), cases=1, seed=3, format="zarr"))


@pytest.mark.parametrize("mode", ["zscore", "zscore_stored", "ct"])
def test_normalisation_equals_the_training_path(demo_store, mode):
    # Training and validation normalise a stored int16 case with the manifest's statistics
    # (readers.CaseHandle.norm + transforms.normalize_into); predict, given the same array (and, for
    # zscore, the original file it computes nnU-Net's statistics from), must produce the same
    # float32 values bit for bit (same statistics, epsilon, rounding and order of operations).
    from stunet_scale.data.ingest.sources import read_nifti
    from stunet_scale.data.stream.readers import CaseHandle
    from stunet_scale.data.stream.transforms import normalize_into
    from stunet_scale.export.model_input import normalize
    from stunet_scale.export.spec import manifest_intensity_stats

    (cid,) = demo_store.case_ids()
    handle = CaseHandle(demo_store, cid, mode, 1)
    stored = demo_store.case(cid).image[...]
    assert stored.dtype == np.int16
    trained = torch.empty((1, *stored.shape), dtype=torch.float32)
    normalize_into(trained, torch.from_numpy(stored[None]), torch.from_numpy(handle.norm))
    stats = manifest_intensity_stats(demo_store.manifest) if mode == "ct" else None
    spec = dataclasses.replace(threshold_spec(crop="nonzero" if mode == "zscore" else "body"),
                               normalization="ct" if mode == "ct" else "zscore", intensity_stats=stats)
    original = read_nifti(demo_store.root.parent / "raw" / cid / "ct.nii.gz", "image").data[None]
    ours = normalize(stored[None].astype(np.float32), spec, original=original.astype(np.float32))
    assert ours.dtype == np.float32 and np.array_equal(ours, trained.numpy())
    if mode == "zscore_stored":  # the stored crop's own statistics: zero mean, unit std
        assert abs(float(ours.mean())) < 1e-3 and abs(float(ours.std()) - 1) < 1e-3
    if mode == "zscore":  # nnU-Net's: the original image over its nonzero box (air included)
        img = original[0].astype(np.float64)
        box = [np.flatnonzero((img != 0).any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        region = img[box[0][0]:box[0][-1] + 1, box[1][0]:box[1][-1] + 1, box[2][0]:box[2][-1] + 1]
        np.testing.assert_allclose(handle.norm[0, 2], 1 / region.std(), rtol=1e-6)
        np.testing.assert_allclose(handle.norm[0, 3], -region.mean() / region.std(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    source, _, _ = write_source(root / "ckpt.pth")
    export(source, root / "export", formats=["safetensors"], log=lambda *a: None)
    return root / "export"


def test_cli_predict_folder_classes_and_a_broken_case(tmp_path, exported, capsys):
    affine = oblique_lps_affine(spacing=(2.0, 2.0, 3.0))
    (tmp_path / "in").mkdir()
    for case, centre in (("a", (12, 14, 8)), ("b", (16, 10, 9))):
        image, _ = ellipsoid_phantom((30, 28, 18), affine, centre, (14, 10, 12))
        nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "in" / f"{case}_0000.nii.gz"))
    (tmp_path / "in" / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b truncated")
    rc = main(["predict", str(exported), str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu",
               "--classes", "liver", "2", "--mirror", "--step-size", "0.75"])
    captured = capsys.readouterr()
    assert rc == 1 and "broken_0000.nii.gz: cannot read NIfTI" in captured.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "b.nii.gz", "labels.json"]
    labels = json.loads((tmp_path / "out" / "labels.json").read_text())["labels"]
    assert labels == {"0": "background", "1": "liver", "2": "spleen"}
    for case in ("a", "b"):
        out = nib.load(str(tmp_path / "out" / f"{case}.nii.gz"))
        assert out.shape == (30, 28, 18) and np.allclose(out.affine, affine)
        assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_predict_rejects_unknown_classes_and_bad_inputs(tmp_path, exported, capsys):
    image = np.zeros((8, 8, 8, 2), dtype=np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "four_d.nii.gz"))
    assert main(["predict", str(exported), str(tmp_path / "four_d.nii.gz"), str(tmp_path / "o.nii.gz"),
                 "--device", "cpu", "--classes", "livr"]) == 1
    assert "did you mean liver" in capsys.readouterr().err
    assert main(["predict", str(exported), str(tmp_path / "four_d.nii.gz"), str(tmp_path / "o.nii.gz"),
                 "--device", "cpu"]) == 1
    assert "expected a 3-D image" in capsys.readouterr().err
    nan = np.ones((8, 8, 8), dtype=np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    assert main(["predict", str(exported), str(tmp_path / "nan.nii.gz"), str(tmp_path / "o.nii.gz"), "--device", "cpu"]) == 1
    assert "NaN" in capsys.readouterr().err and not (tmp_path / "o.nii.gz").exists()


def test_multichannel_model_reads_nnunet_channel_files(tmp_path):
    from stunet_scale.export import load_pretrained

    source, _, _ = write_source(tmp_path / "ckpt.pth")
    model = load_pretrained(source, in_channels=2, deep_supervision=False)
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) @ np.block([[rotation(1, 90), np.zeros((3, 1))], [np.zeros((1, 3)), 1]])
    (tmp_path / "in").mkdir()
    for c in range(2):
        nib.save(nib.Nifti1Image(np.random.RandomState(c).normal(size=(20, 18, 16)).astype(np.float32), affine),
                 str(tmp_path / "in" / f"pet_ct_{c:04d}.nii.gz"))
    result = predict("in-memory", tmp_path / "in", tmp_path / "out", network=model, spec=model.spec, device="cpu")
    assert result["written"] == [str(tmp_path / "out" / "pet_ct.nii.gz")]
    assert nib.load(result["written"][0]).shape == (20, 18, 16)
    (tmp_path / "in" / "pet_ct_0001.nii.gz").unlink()
    from stunet_scale.predict import PredictError

    with pytest.raises(PredictError, match="takes 2 channel"):
        predict("in-memory", tmp_path / "in", tmp_path / "out2", network=model, spec=model.spec, device="cpu")


def test_ct_normalisation_uses_the_dataset_statistics():
    from stunet_scale.export.model_input import normalize

    spec = dataclasses.replace(threshold_spec(), normalization="ct", intensity_stats={
        "mean": 100.0, "std": 50.0, "percentile_00_5": -200.0, "percentile_99_5": 400.0})
    x = np.array([[[[-1000.0, 100.0, 150.0, 2000.0]]]], dtype=np.float32)
    assert np.allclose(normalize(x, spec), [[[[-6.0, 0.0, 1.0, 6.0]]]])


@pytest.mark.gpu
def test_cuda_auto_precision_agrees_with_cpu_fp32(tmp_path, exported):
    # On CUDA, precision="auto" runs the network under bf16 (fp16 without bf16) autocast; the labels
    # must match the fp32 CPU reference except where two classes' logits nearly tie (a few voxels).
    affine = oblique_lps_affine(spacing=(1.5, 1.7, 2.5))
    image, _ = ellipsoid_phantom((56, 48, 30), affine, (28, 22, 14), (22, 16, 20))
    image += np.random.RandomState(1).normal(0, 25, size=image.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "ct.nii.gz"))
    segs = {}
    for device in ("cpu", "cuda"):
        predict(exported, tmp_path / "ct.nii.gz", tmp_path / f"{device}.nii.gz", device=device, precision="auto")
        segs[device] = np.asarray(nib.load(str(tmp_path / f"{device}.nii.gz")).dataobj)
    assert segs["cpu"].shape == segs["cuda"].shape == image.shape
    assert len(np.unique(segs["cpu"])) > 1  # a constant map would agree trivially
    disagree = float((segs["cpu"] != segs["cuda"]).mean())
    assert disagree < 0.01, disagree
