"""The sample plan: every sample a pure function of (seed, global index); nnU-Net's oversampling rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stunet_scale.config import AugmentationConfig
from stunet_scale.data.stream.plan import (
    PlanCase,
    SamplePlan,
    counter_rng,
    forced_foreground,
    origin_bounds,
    resolve_origin,
)

PATCH, INITIAL = [32, 32, 32], [52, 52, 52]


def _case(cid, shape=(80, 70, 60), labels=(1, 2, 3), counts=(50, 5, 500), split="train"):
    starts = np.cumsum([0, *counts[:-1]])
    return PlanCase(cid, tuple(shape), split, np.array(labels, np.int64), np.array(starts, np.int64),
                    np.array(counts, np.int64))


def _plan(cases=None, seed=0, global_batch=2, **kw):
    cases = cases or [_case("a"), _case("b", labels=(2,), counts=(7,)), _case("c", labels=(), counts=())]
    return SamplePlan(cases, seed=seed, global_batch=global_batch, patch=PATCH, initial=INITIAL,
                      aug_cfg=kw.pop("aug_cfg", AugmentationConfig()), **kw)


def _same(a, b):
    assert (a.index, a.case, a.forced_fg, a.fg_label, a.fg_row, a.random_origin) == \
        (b.index, b.case, b.forced_fg, b.fg_label, b.fg_row, b.random_origin)
    assert a.aug.keys() == b.aug.keys()
    for k in a.aug:
        np.testing.assert_array_equal(a.aug[k], b.aug[k])


def test_counter_rng_is_keyed_by_seed_index_and_stream():
    a = counter_rng(0, 5, 1).random(4)
    np.testing.assert_array_equal(a, counter_rng(0, 5, 1).random(4))
    for other in (counter_rng(1, 5, 1), counter_rng(0, 6, 1), counter_rng(0, 5, 2)):
        assert not np.allclose(a, other.random(4))
    counter_rng(-3, 2**70, 0).random()  # any Python int is accepted (masked to 64 bits)


def test_sample_is_a_pure_function_of_seed_and_index():
    p1, p2 = _plan(), _plan()
    forward = [p1.sample(i) for i in range(60)]
    backward = [p2.sample(i) for i in reversed(range(60))][::-1]  # order of evaluation does not matter
    for a, b in zip(forward, backward):
        _same(a, b)
    other_seed = [_plan(seed=1).sample(i) for i in range(60)]
    assert [s.random_origin for s in forward] != [s.random_origin for s in other_seed]


def test_nnunet_oversampling_rule_on_the_global_batch():
    # nnU-Net: not j < round(b * (1 - p)); with batch 2 the second sample is forced
    assert [forced_foreground(j, 2, 0.33) for j in range(2)] == [False, True]
    assert sum(forced_foreground(j, 8, 0.33) for j in range(8)) == 3
    assert sum(forced_foreground(j, 16, 0.33) for j in range(16)) == 5
    plan = _plan(global_batch=8)
    share = np.mean([plan.sample(i).forced_fg for i in range(800)])
    assert share == pytest.approx(3 / 8)
    # the forced set of a step does not depend on how the batch is split over ranks
    for world in (1, 2, 4, 8):
        forced = sorted(i for r in range(world) for i in plan.micro_batch_indices(3, r, world, 0, 8 // world)
                        if plan.sample(i).forced_fg)
        assert forced == [3 * 8 + 5, 3 * 8 + 6, 3 * 8 + 7]


def test_forced_samples_pick_classes_uniformly_among_present_ones():
    case = _case("a", labels=(1, 2, 3), counts=(50, 5, 500))
    plan = _plan([case], global_batch=2)
    forced = [plan.sample(2 * i + 1) for i in range(3000)]
    assert all(s.forced_fg for s in forced)
    labels = np.array([s.fg_label for s in forced])
    freq = np.array([(labels == k).mean() for k in (1, 2, 3)])
    # class-balanced per case, whatever the class sizes (5 vs 500 stored voxels)
    assert np.all(np.abs(freq - 1 / 3) < 0.04), freq
    for s in forced:  # the row lies in that class's range of fg_locations
        k = list(case.fg_labels).index(s.fg_label)
        assert case.fg_starts[k] <= s.fg_row < case.fg_starts[k] + case.fg_counts[k]
    rows = np.array([s.fg_row for s in forced if s.fg_label == 3])
    assert len(np.unique(rows)) > 300  # voxels spread over the stored locations
    # random (non-forced) samples carry no class; a case without foreground falls back to random
    assert all(plan.sample(2 * i).fg_row == -1 for i in range(50))
    empty = _plan([_case("e", labels=(), counts=())])
    assert all(empty.sample(2 * i + 1).fg_row == -1 and empty.sample(2 * i + 1).forced_fg for i in range(20))


def test_rank_slices_partition_the_global_batch_for_any_world_size():
    plan = _plan(global_batch=8)
    for world, micro in ((1, 2), (2, 2), (4, 2), (8, 1)):
        accum = 8 // (world * micro)
        for step in (0, 7):
            got = [i for r in range(world) for a in range(accum)
                   for i in plan.micro_batch_indices(step, r, world, a, micro)]
            assert sorted(got) == plan.global_indices(step)
    with pytest.raises(ValueError, match="global_batch"):
        plan.rank_positions(0, 3)


def test_random_origins_follow_nnunet_bounds_and_foreground_centres_the_patch():
    shape = (80, 70, 20)  # z smaller than the patch: padded on both sides
    lbs, ubs = origin_bounds(shape, PATCH, INITIAL)
    plan = _plan([_case("a", shape=shape)])
    origins = np.array([plan.sample(i).random_origin for i in range(0, 400, 2)])
    assert np.all(origins >= lbs) and np.all(origins <= ubs)
    assert all(origins[:, d].min() == lbs[d] and origins[:, d].max() == ubs[d] for d in range(2))
    # the final patch (centre crop of the initial one) stays inside the volume along axes that fit
    off = INITIAL[0] // 2 - PATCH[0] // 2
    assert origins[:, 0].min() + off >= 0 and origins[:, 0].max() + off + PATCH[0] <= shape[0]
    spec = plan.sample(1)
    origin = resolve_origin(spec, shape, INITIAL, PATCH, fg_voxel=(40, 35, 10))
    assert origin[:2] == [40 - INITIAL[0] // 2, 35 - INITIAL[1] // 2]  # voxel at the centre
    assert origin[2] == max(lbs[2], 10 - INITIAL[2] // 2)


def test_case_weighting_uniform_split_and_class_rarity():
    cases = [_case("a", labels=(1,), counts=(5,)), _case("b", labels=(1,), counts=(5,)),
             _case("c", labels=(1, 2), counts=(5, 5), split="extra")]
    n = 3000
    freq = lambda plan: np.bincount([plan.sample(i).case for i in range(n)], minlength=3) / n  # noqa: E731
    assert np.allclose(freq(_plan(cases)), 1 / 3, atol=0.03)
    split = _plan(cases, case_weighting="split", train_splits=("train", "extra"))
    assert np.allclose(freq(split), [0.25, 0.25, 0.5], atol=0.03)
    weighted = _plan(cases, case_weighting="split", train_splits=("train", "extra"), split_weights=(3, 1))
    assert np.allclose(freq(weighted), [0.375, 0.375, 0.25], atol=0.03)
    # class 2 only in case c: class-balanced drawing gives c half the draws (class 1 spread over 3 cases)
    rarity = _plan(cases, case_weighting="class_rarity")
    assert np.allclose(rarity.weights, [1 / 6, 1 / 6, 2 / 3])
    assert np.allclose(freq(rarity), [1 / 6, 1 / 6, 2 / 3], atol=0.03)


def test_augmentation_draws_match_nnunet_probabilities_and_stay_put_when_one_is_off():
    plan = _plan()
    aug = [plan.sample(i).aug for i in range(4000)]
    rate = lambda key, test: np.mean([test(a[key]) for a in aug])  # noqa: E731
    assert rate("rotation", lambda v: np.any(v != 0)) == pytest.approx(0.2, abs=0.025)
    assert rate("scale", lambda v: v != 1) == pytest.approx(0.2, abs=0.025)
    assert rate("spatial", bool) == pytest.approx(1 - 0.8 * 0.8, abs=0.025)
    assert rate("noise_std", lambda v: v > 0) == pytest.approx(0.1, abs=0.02)
    assert rate("blur_sigma", lambda v: v.max() > 0) == pytest.approx(0.1, abs=0.02)  # .2 x per-channel .5
    assert rate("lowres", lambda v: v[0] > 0) == pytest.approx(0.125, abs=0.02)
    assert rate("gamma", lambda v: v[0] > 0) == pytest.approx(0.3, abs=0.025)
    assert rate("mirror", lambda v: v[0]) == pytest.approx(0.5, abs=0.03)
    angles = np.concatenate([a["rotation"] for a in aug if np.any(a["rotation"])])
    assert np.abs(angles).max() <= np.radians(30) and np.abs(angles).max() > np.radians(29)
    scales = np.array([float(a["scale"]) for a in aug if a["scale"] != 1])
    assert 0.7 <= scales.min() and scales.max() <= 1.4
    # switching rotation and mirroring off changes nothing else (fixed draw slots, separate streams)
    off = _plan(aug_cfg=dataclasses.replace(AugmentationConfig(), rotation_p=0.0, mirror=False))
    for i in range(200):
        a, b = plan.sample(i), off.sample(i)
        assert (a.case, a.random_origin, a.fg_row) == (b.case, b.random_origin, b.fg_row)
        for k in ("scale", "noise_std", "blur_sigma", "gamma", "contrast"):
            np.testing.assert_array_equal(a.aug[k], b.aug[k])
        assert not b.aug["mirror"].any() and not np.any(b.aug["rotation"])
    disabled = _plan(aug_cfg=dataclasses.replace(AugmentationConfig(), enabled=False))
    assert not any(disabled.sample(i).spatial for i in range(100))


def test_fingerprint_tracks_cases_and_settings():
    assert _plan().fingerprint == _plan().fingerprint
    assert _plan().fingerprint != _plan(seed=1).fingerprint
    assert _plan().fingerprint != _plan(cases=[_case("a"), _case("b")]).fingerprint
    # same labels and counts, rows stored elsewhere: forced samples would read other voxels
    moved = _case("a")
    moved.fg_starts[:] += 1
    base = [_case("b", labels=(2,), counts=(7,)), _case("c", labels=(), counts=())]
    assert _plan(cases=[_case("a"), *base]).fingerprint != _plan(cases=[moved, *base]).fingerprint
