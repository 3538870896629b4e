"""Dice / HD95 / NSD of ``stunet_scale.surface_metrics`` against maintained implementations on the
same inputs: MONAI's ``compute_hausdorff_distance`` / ``compute_surface_dice`` / ``DiceMetric``
(same border definition: equal to float precision) and DeepMind's ``surface-distance`` (surfel-based
borders: agrees on the empty-mask conventions and closely on values). Both are test-only oracles."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from stunet_scale import surface_metrics as sm

torch = pytest.importorskip("torch")


def _monai():
    metrics = pytest.importorskip("monai.metrics")
    return metrics


def _onehot(mask: np.ndarray):
    return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))


def _monai_values(pred, ref, spacing, tol):
    m = _monai()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks; the values are what we compare
        hd = float(m.compute_hausdorff_distance(_onehot(pred), _onehot(ref), percentile=95, spacing=list(spacing))[0, 0])
        nsd = float(m.compute_surface_dice(_onehot(pred), _onehot(ref), [tol], spacing=list(spacing))[0, 0])
        dice = float(m.DiceMetric(include_background=False, ignore_empty=False)(_onehot(pred), _onehot(ref))[0, 0])
    return dice, hd, nsd


def _blob(shape, centre, radii, rng=None, noise=0.0):
    grid = np.indices(shape, dtype=np.float64)
    r = sum(((g - c) / rad) ** 2 for g, c, rad in zip(grid, centre, radii))
    if noise:
        r = r + noise * rng.standard_normal(shape)
    return r <= 1.0


SPACINGS = [(1.0, 1.0, 1.0), (0.8, 0.8, 5.0), (1.5, 0.7, 3.0)]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_monai_on_random_blobs(spacing, seed):
    rng = np.random.default_rng(seed)
    shape = (40, 36, 24)
    ref = _blob(shape, (20, 18, 12), (10, 8, 6), rng, noise=0.15)
    pred = _blob(shape, (20 + rng.integers(-3, 4), 18 + rng.integers(-3, 4), 12 + rng.integers(-2, 3)),
                 (9, 9, 5), rng, noise=0.15)
    pred[2:5, 2:5, 2:4] = True  # a far false-positive island: moves HD95 away from the bulk
    for tol in (1.0, 2.5):
        d, hd, n = _monai_values(pred, ref, spacing, tol)
        ours = sm.class_metrics(pred, ref, spacing, tol)
        assert ours["dice"] == pytest.approx(d, abs=1e-6)
        assert ours["hd95"] == pytest.approx(hd, rel=1e-5)
        assert ours["nsd"] == pytest.approx(n, abs=1e-6)
        assert sm.hd95(pred, ref, spacing) == ours["hd95"] and sm.nsd(pred, ref, spacing, tol) == ours["nsd"]


def test_anisotropic_spacing_changes_the_distance_along_its_axis():
    ref = np.zeros((20, 20, 20), bool)
    ref[5:15, 5:15, 5:15] = True
    pred = np.roll(ref, 2, axis=2)  # 2 voxels along the thick axis
    assert sm.hd95(pred, ref, (1, 1, 5)) == pytest.approx(10.0)
    assert sm.hd95(pred, ref, (5, 5, 1)) == pytest.approx(2.0)
    assert sm.hd95(pred, ref, (1, 1, 5)) == pytest.approx(_monai_values(pred, ref, (1, 1, 5), 1.0)[1])


def test_crop_margin_keeps_masks_touching_the_array_edge_exact():
    ref = np.zeros((12, 12, 12), bool)
    ref[0:6, 0:12, 3:9] = True  # touches three faces of the array
    pred = np.zeros_like(ref)
    pred[1:7, 0:11, 4:12] = True
    d, hd, n = _monai_values(pred, ref, (1.2, 0.9, 2.0), 1.5)
    ours = sm.class_metrics(pred, ref, (1.2, 0.9, 2.0), 1.5)
    assert (ours["dice"], ours["hd95"], ours["nsd"]) == pytest.approx((d, hd, n), rel=1e-6)


def test_empty_mask_conventions_against_both_oracles(monkeypatch):
    a = np.zeros((10, 10, 10), bool)
    a[2:5, 2:5, 2:5] = True
    e = np.zeros_like(a)
    sp = (1.0, 2.0, 3.0)
    # both empty: nothing to score
    assert all(math.isnan(v) for v in sm.class_metrics(e, e, sp).values())
    # one empty: Dice 0, NSD 0, HD95 inf (either side)
    for pred, ref in ((a, e), (e, a)):
        ours = sm.class_metrics(pred, ref, sp)
        assert ours == {"dice": 0.0, "hd95": math.inf, "nsd": 0.0}
        d, hd, n = _monai_values(pred, ref, sp, 2.0)
        assert (d, n) == (0.0, 0.0) and math.isnan(hd)  # MONAI: NaN HD, where we say inf (documented)
    sd = pytest.importorskip("surface_distance")
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)  # surface-distance 0.1 still spells numpy 1's alias
    for pred, ref in ((a, e), (e, a)):
        dists = sd.compute_surface_distances(ref, pred, sp)
        assert sd.compute_robust_hausdorff(dists, 95) == math.inf
        assert sd.compute_surface_dice_at_tolerance(dists, 2.0) == 0.0
    assert math.isnan(sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(e, e, sp), 2.0))


def test_close_to_surface_distance_on_smooth_shapes(monkeypatch):
    sd = pytest.importorskip("surface_distance")
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)
    sp = (0.8, 0.8, 2.5)
    ref = _blob((48, 48, 20), (24, 24, 10), (14, 12, 5))
    pred = _blob((48, 48, 20), (26, 23, 10), (13, 13, 5))
    dists = sd.compute_surface_distances(ref, pred, sp)
    ours = sm.class_metrics(pred, ref, sp, 2.0)
    # surfels sit on voxel faces, our borders on voxel centres: within about one voxel / a few percent
    assert ours["hd95"] == pytest.approx(sd.compute_robust_hausdorff(dists, 95), abs=max(sp))
    assert ours["nsd"] == pytest.approx(sd.compute_surface_dice_at_tolerance(dists, 2.0), abs=0.08)
    assert ours["dice"] == pytest.approx(sd.compute_dice_coefficient(ref, pred), abs=1e-9)


def test_label_map_metrics_equal_per_class_masks_and_skip_ignore():
    rng = np.random.default_rng(3)
    ref = np.zeros((30, 30, 16), np.int64)
    ref[3:12, 4:14, 2:8] = 1
    ref[15:27, 10:25, 6:14] = 2
    ref[0:3, 0:3, 0:3] = 9  # ignore label: whatever is predicted there counts for no class
    pred = ref.copy()
    pred[ref == 9] = 2
    pred[rng.random(ref.shape) < 0.02] = 1
    sp = (1.0, 1.3, 3.0)
    got = sm.label_map_metrics(pred, ref, [1, 2, 3], sp, [1.0, 3.0, 2.0], ignore_label=9)
    clean = np.where(ref == 9, 0, pred)
    assert got[1] == sm.class_metrics(clean == 1, ref == 1, sp, 1.0)
    assert got[2] == sm.class_metrics(clean == 2, ref == 2, sp, 3.0)
    assert all(math.isnan(v) for v in got[3].values())
    assert all(math.isnan(v) for v in sm.label_map_metrics(pred, ref, [1], sp, skip=[1])[1].values())


def test_bad_inputs_name_the_problem():
    a = np.ones((4, 4, 4), bool)
    with pytest.raises(ValueError, match="spacing"):
        sm.hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        sm.nsd(a, a, (1, 1, 1), -1.0)


def test_border_distances_equal_the_distance_transform_formulation():
    from scipy import ndimage

    rng = np.random.default_rng(7)
    ref = _blob((30, 26, 14), (15, 13, 7), (9, 8, 5), rng, noise=0.2)
    pred = _blob((30, 26, 14), (16, 12, 7), (8, 9, 4), rng, noise=0.2)
    sp = (0.7, 1.1, 2.5)
    d_pr, d_rp = sm.distances(pred, ref, sp)
    border = lambda m: m & ~ndimage.binary_erosion(m, border_value=0)  # noqa: E731 - full array, no crop
    pb, rb = border(pred), border(ref)
    assert np.allclose(d_pr, ndimage.distance_transform_edt(~rb, sampling=sp)[pb], atol=1e-9)
    assert np.allclose(d_rp, ndimage.distance_transform_edt(~pb, sampling=sp)[rb], atol=1e-9)
