"""Geometry of `stunet_scale.data.ingest.preprocess`: RAS reorientation, resampling against nnU-Net's own
functions, the stored affine, the inverse mapping `predict` relies on, and foreground locations."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest

from stunet_scale.data.ingest import preprocess as pp

nnunet_resampling = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling")


def _all_orientations():
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            yield np.array([[perm[i], flips[i]] for i in range(3)])


def test_to_ras_matches_nibabel_for_all_48_orientations():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(4, 5, 6)).astype(np.float32)
    ras_aff = np.diag([0.8, 1.1, 3.0, 1.0])
    ras_aff[:3, 3] = [-10, 20, 5]
    for ornt in _all_orientations():
        file_data = pp.apply_ornt(data, ornt)
        file_aff = pp.ornt_affine(ras_aff, ornt, data.shape)
        can = nib.as_closest_canonical(nib.Nifti1Image(file_data, file_aff))
        r, aff, o = pp.to_ras(file_data, file_aff)
        assert np.array_equal(r, np.asarray(can.dataobj)) and np.allclose(aff, can.affine)
        assert np.array_equal(r, data) and np.allclose(aff, ras_aff)
        assert np.array_equal(pp.from_ras(r, o), file_data)
        # leading (channel) axes ride along
        stacked = np.stack([file_data, 2 * file_data])
        assert np.array_equal(pp.to_ras(stacked, file_aff)[0][1], 2 * data)


@pytest.mark.parametrize("new_shape", [(90, 100, 55), (33, 41, 25), (60, 70, 100)])
def test_image_resampling_equals_nnunet(new_shape):
    img = np.random.default_rng(1).normal(size=(60, 70, 40)).astype(np.float32)
    f = nnunet_resampling.resample_data_or_seg
    for method, order in (("cubic", 3), ("linear", 1)):
        ours = pp.resample_image(img, new_shape, method)
        ref = f(img[None], new_shape, False, axis=None, order=order, do_separate_z=False)[0]
        assert np.abs(ours - ref).max() < 1e-4
        ours = pp.resample_image(img, new_shape, method, separate=2)
        ref = f(img[None], new_shape, False, axis=2, order=order, do_separate_z=True, order_z=0)[0]
        assert np.abs(ours - ref).max() < 1e-4


def _blocks(shape=(60, 70, 40), n=20, seed=0):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    for c in range(1, n):
        x, y, z = rng.integers(5, shape[0] - 10), rng.integers(5, shape[1] - 10), rng.integers(5, shape[2] - 10)
        lab[x:x + rng.integers(2, 12), y:y + rng.integers(2, 12), z:z + rng.integers(1, 8)] = c
    return lab


@pytest.mark.parametrize("new_shape", [(47, 53, 40), (33, 41, 25), (77, 91, 52), (120, 140, 80)])
def test_label_resampling_equals_nnunet(new_shape):
    """Per-label linear = nnU-Net's resize_segmentation(order=1) bit for bit (argmax of the
    interpolated one-hot scores, exact ties to the nearest-neighbour label), also with separate z."""
    lab = _blocks()
    f = nnunet_resampling.resample_data_or_seg
    ours = pp.resample_labels(lab, new_shape, "linear")
    ref = f(lab[None].astype(np.int16), new_shape, True, axis=None, order=1, do_separate_z=False)[0]
    assert np.array_equal(ours, ref) and ours.dtype == lab.dtype
    ours = pp.resample_labels(lab, new_shape, "linear", separate=2)
    ref = f(lab[None].astype(np.int16), new_shape, True, axis=2, order=1, do_separate_z=True, order_z=0)[0]
    assert np.array_equal(ours, ref)
    nearest = pp.resample_labels(lab, new_shape, "nearest")
    assert nearest.dtype == lab.dtype and set(np.unique(nearest)) <= set(np.unique(lab))


def _phantom_labels(shape, spacing, seed=0):
    """The demo phantom's 117 TotalSegmentator v2 masks merged (higher label wins) on a RAS grid."""
    from stunet_scale.data.class_maps import load_class_map
    from stunet_scale.data.ingest.demo import phantom

    image, masks = phantom(np.random.default_rng(seed), shape, spacing, "v2")
    lab = np.zeros(shape, np.uint8)
    for k, name in enumerate(load_class_map("totalseg-v2").labels[1:], start=1):
        if name in masks:
            lab[masks[name]] = k
    return image, lab


# nnU-Net decides separate-z itself from the spacings here: near-isotropic (none), thick slices on the
# last axis, thick slices on the first axis (in file order, stored LPS: the RAS array is flipped)
@pytest.mark.parametrize("spacing, separate, file_ornt", [
    ((2.2, 2.2, 2.9), None, [[0, 1], [1, 1], [2, 1]]),
    ((2.05, 2.05, 6.6), 2, [[0, -1], [1, -1], [2, 1]]),
    ((6.6, 2.05, 2.05), 0, [[0, 1], [1, 1], [2, 1]]),
])
def test_prepare_labels_equal_nnunet_resample_to_shape(spacing, separate, file_ornt):
    """``prepare``'s label path with its default (``stored_case``: RAS, body crop, per-label linear)
    against nnU-Net v2's own seg resampling, ``resample_data_or_seg_to_shape(is_seg=True, order=1,
    order_z=0, force_separate_z=None)`` (its plans' ``resampling_fn_seg``), on the same RAS-cropped
    array to the same grid, on the demo phantom's 117-class anatomy.

    Tolerance: at most 1e-5 of the voxels may differ (measured: 0, here and on the real CT sample).
    Both take the argmax of linearly interpolated one-hot scores with exact ties to the nearest
    neighbour, but ours accumulates the scores in float32 and skimage in float64, so a voxel whose two
    best scores differ by less than float32 rounding (~1e-7) could go either way."""
    ornt = np.asarray(file_ornt)
    n = [int(round(190 / s)) for s in spacing]  # a ~19 cm cube of torso
    ras_img, ras_lab = _phantom_labels(tuple(n), spacing)
    file_img, file_lab = pp.apply_ornt(ras_img, pp.invert_ornt(ornt)), pp.apply_ornt(ras_lab, pp.invert_ornt(ornt))
    affine = pp.ornt_affine(np.diag([*spacing, 1.0]), pp.invert_ornt(ornt), n)
    geom, _, ours = pp.stored_case(file_img, affine, [1.5, 1.5, 1.5], "body", file_lab)
    assert geom.separate_axis == separate and ours.dtype == np.uint8 and list(ours.shape) == geom.shape
    cropped = pp.crop(pp.apply_ornt(file_lab, np.asarray(geom.ornt)), geom.crop_box)
    assert np.array_equal(pp.apply_ornt(file_lab, np.asarray(geom.ornt)), ras_lab)
    ref = nnunet_resampling.resample_data_or_seg_to_shape(
        cropped[None].astype(np.float32), geom.shape, spacing, [1.5, 1.5, 1.5], is_seg=True, order=1, order_z=0,
        force_separate_z=None)[0]
    assert len(np.unique(ref)) > 20  # the phantom's organs are there
    assert np.count_nonzero(ours != ref) <= 1e-5 * ours.size


def test_prepare_labels_equal_nnunet_on_real_ct(shared_dir):
    """The same on the real TotalSegmentator CT (117 masks, 3 mm -> 1.5 mm) when ../shared has it."""
    from stunet_scale.data.ingest.sources import load_case, open_source

    src = shared_dir / "data" / "totalseg_sample"
    if not (src / "s0001" / "ct.nii.gz").exists():
        pytest.skip("no TotalSegmentator sample in ../shared")
    ds = open_source(src)
    case = load_case(ds.cases[0], ds)
    geom, _, ours = pp.stored_case(case.image, case.affine, [1.5, 1.5, 1.5], "body", case.label)
    cropped = pp.crop(pp.apply_ornt(case.label, np.asarray(geom.ornt)), geom.crop_box)
    ref = nnunet_resampling.resample_data_or_seg_to_shape(
        cropped[None].astype(np.float32), geom.shape, pp.voxel_spacing(np.asarray(geom.ras_affine)), [1.5, 1.5, 1.5],
        is_seg=True, order=1, order_z=0, force_separate_z=None)[0]
    assert len(np.unique(ref)) > 30
    assert np.count_nonzero(ours != ref) <= 1e-5 * ours.size


def test_separate_axis_rule():
    assert pp.separate_axis([0.8, 0.8, 5.0], [1.5, 1.5, 1.5]) == 2
    assert pp.separate_axis([1.0, 1.0, 2.5], [1.5, 1.5, 1.5]) is None
    assert pp.separate_axis([1.5, 1.5, 1.5], [1.0, 1.0, 4.0]) == 2  # anisotropic target
    assert pp.separate_axis([0.24, 1.25, 1.25], [1.5, 1.5, 1.5]) is None  # two coarse axes tie


@pytest.mark.parametrize("z_spacing", [2.5, 3.5])
def test_stored_affine_places_voxels_in_world_coordinates(z_spacing):
    """Resample a volume whose value is its world x/y/z coordinate: linear interpolation reproduces
    a linear function exactly, so the stored affine must predict every interior stored voxel. With
    thick slices (3.5 / 0.9 > 3) z is resampled with nearest: off by at most half a source slice."""
    shape = (40, 30, 12)
    ras = np.array([[0.9, 0, 0, -20.0], [0, 1.1, 0, 7.0], [0, 0, z_spacing, 100.0], [0, 0, 0, 1]])
    ornt = np.array([[1, -1], [2, 1], [0, -1]])  # stored on disk in another axis order
    file_aff = pp.ornt_affine(ras, ornt, shape)
    file_shape = pp.apply_ornt(np.zeros(shape), ornt).shape
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in file_shape], indexing="ij"), -1)
    world = ijk @ file_aff[:3, :3].T + file_aff[:3, 3]
    box = [[3, 35], [2, 28], [1, 11]]
    g = pp.plan_geometry(file_shape, file_aff, box, [1.5, 1.5, 1.5])
    assert g.cropped_shape == [32, 26, 10] and g.shape == [19, 19, round(10 * z_spacing / 1.5)]
    assert g.separate_axis == (2 if z_spacing == 3.5 else None)
    stored = pp.to_stored_grid(np.moveaxis(world, -1, 0), g, "image", "linear")
    sijk = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), -1)
    expect = sijk @ np.asarray(g.affine)[:3, :3].T + np.asarray(g.affine)[:3, 3]
    inner = tuple(slice(2, n - 2) for n in g.shape)  # edge voxels are clamped (mode edge)
    err = np.abs(np.moveaxis(stored, 0, -1)[inner] - expect[inner]).max(axis=(0, 1, 2))
    assert err[:2].max() < 1e-3
    assert err[2] < (1e-3 if g.separate_axis is None else 0.5 * z_spacing + 1e-3)
    assert np.allclose(pp.voxel_spacing(np.asarray(g.affine)), g.spacing)


def test_restore_to_original_roundtrip():
    rng = np.random.default_rng(3)
    lab = np.zeros((50, 44, 20), np.uint8)
    for c in range(1, 6):
        x, y, z = rng.integers(5, 30), rng.integers(5, 25), rng.integers(2, 12)
        lab[x:x + 14, y:y + 12, z:z + 6] = c
    aff = pp.ornt_affine(np.diag([1.2, 1.2, 3.0, 1.0]), np.array([[0, -1], [2, 1], [1, -1]]), (50, 44, 20))
    file_lab = pp.apply_ornt(lab, np.array([[0, -1], [2, 1], [1, -1]]))
    ras, _, _ = pp.to_ras(file_lab, aff)
    box = pp.bbox_of(ras > 0)
    g = pp.plan_geometry(file_lab.shape, aff, box, [1.5, 1.5, 1.5])
    stored = pp.to_stored_grid(file_lab, g, "labels")
    back = pp.restore_to_original(stored, g, "labels")
    assert back.shape == file_lab.shape and back.dtype == file_lab.dtype
    fg = (back > 0) | (file_lab > 0)
    assert (back[fg] == file_lab[fg]).mean() > 0.9  # a 1.2 / 3 mm -> 1.5 mm -> back roundtrip
    # without resampling the roundtrip is exact (crop + reorientation only)
    g2 = pp.plan_geometry(file_lab.shape, aff, box, pp.voxel_spacing(g.ras_affine))
    assert np.array_equal(pp.restore_to_original(pp.to_stored_grid(file_lab, g2, "labels"), g2.to_dict()), file_lab)
    # probabilities (channels first) go back too
    probs = np.stack([(stored == c).astype(np.float32) for c in range(6)])
    back_p = pp.restore_to_original(probs, g, "probabilities")
    assert back_p.shape == (6, *file_lab.shape)
    assert (back_p.argmax(0)[fg] == file_lab[fg]).mean() > 0.9


def test_foreground_locations_follow_nnunet():
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    lab = np.zeros((120, 120, 120), np.uint8)
    lab[:100, :100, :100] = 1  # 1,000,000 voxels: 1 % = 10,000 rows
    lab[100:, :, :] = 2  # 288,000 voxels: 10,000 rows
    lab[0, 110:, 110:] = 3  # 100 voxels: all of them
    rows, ranges = pp.foreground_locations(lab, seed=5)
    ref = DefaultPreprocessor._sample_foreground_locations(lab, [1, 2, 3], seed=1234)
    for c in (1, 2, 3):
        lo, hi = ranges[c]
        assert hi - lo == len(ref[c])
        part = rows[lo:hi]
        assert (part[:, 0] == c).all() and (lab[part[:, 1], part[:, 2], part[:, 3]] == c).all()
        assert len(np.unique(part[:, 1:], axis=0)) == len(part)  # without replacement
    assert rows.dtype == np.int32 and list(ranges) == [1, 2, 3]
    assert np.array_equal(pp.foreground_locations(lab, seed=5)[0], rows)  # deterministic


def test_crop_modes():
    img = np.full((20, 20, 20), -1000, np.int16)
    img[5:15, 6:12, 2:18] = 40
    lab = np.zeros_like(img, dtype=np.uint8)
    lab[3, 3, 3] = 1
    assert pp.crop_box(img, None, "body") == [[5, 15], [6, 12], [2, 18]]
    assert pp.crop_box(img, lab, "body") == [[3, 15], [3, 12], [2, 18]]
    assert pp.crop_box(img, None, "nonzero") == [[0, 20], [0, 20], [0, 20]]
    assert pp.crop_box(img, None, "none") == [[0, 20], [0, 20], [0, 20]]
    assert pp.crop_box(np.full((4, 4, 4), -1000), None, "body") == [[0, 4], [0, 4], [0, 4]]  # nothing: keep all


def test_affine_checks():
    a = np.diag([1.5, 1.5, 3.0, 1.0])
    assert pp.orthonormality_error(a) == 0
    sheared = a.copy()
    sheared[0, 1] = 0.2
    assert pp.orthonormality_error(sheared) > 1e-2
    assert pp.affines_close(a, a + 1e-6)
    shifted = a.copy()
    shifted[0, 3] += 0.5
    assert not pp.affines_close(a, shifted)
    flipped = a.copy()
    flipped[0, 0] = -1.5
    assert not pp.affines_close(a, flipped)
