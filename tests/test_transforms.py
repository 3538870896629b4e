"""Batched augmentation: geometry, nnU-Net semantics per transform, batch invariance, device parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stunet_scale.data.stream import counter_noise, patch_geometry, raw_batch, transforms
from stunet_scale.data.stream import plan as sample_plan

P, S = [16, 16, 16], [27, 27, 27]
DS = [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
NORM = np.array([[-np.inf, np.inf, 0.01, 0.5]], np.float32)


@pytest.fixture(scope="module")
def initial():
    rng = np.random.default_rng(0)
    img = rng.integers(-1000, 1000, (1, *S)).astype(np.int16)
    # blocky labels so nearest/linear label resampling has real regions
    lab = np.kron(rng.integers(0, 6, (4, 4, 4)), np.ones((7, 7, 7)))[:S[0], :S[1], :S[2]].astype(np.uint8)
    return img, lab


def _params(**kw):
    p = sample_plan.identity_params(1)
    for k, v in kw.items():
        p[k] = np.asarray(v)
    if "rotation" in kw or "scale" in kw:
        p["spatial"] = np.array(True)
    return p


def _run(initial, params_list, patch=P, init=S, **kw):
    img, lab = initial
    raw = raw_batch.raw_from_initial_patches([img] * len(params_list), [lab] * len(params_list), params_list,
                                     [NORM] * len(params_list), patch, init)
    return transforms.augment_batch(raw, patch=patch, initial=init, ds_strides=DS, **kw)


def _crop(a, off=None):
    off = off or patch_geometry.crop_offset(P, S)
    return a[..., off[0]:off[0] + P[0], off[1]:off[1] + P[1], off[2]:off[2] + P[2]]


def test_initial_patch_size_is_nnunets():
    assert patch_geometry.initial_patch_size([128] * 3, 30) == [205, 205, 205]
    assert patch_geometry.initial_patch_size([128] * 3, 30, rotation_enabled=False) == [150, 150, 150]
    nn = pytest.importorskip("nnunetv2.training.data_augmentation.compute_initial_patch_size")
    rot = (-math.radians(30), math.radians(30))
    for patch in ([96, 160, 160], [64, 96, 112], [40, 200, 80]):
        assert patch_geometry.initial_patch_size(patch, 30) == list(nn.get_patch_size(patch, rot, rot, rot, (0.85, 1.25)))


def test_identity_crop_mirror_and_spatial_paths_agree(initial):
    img, lab = initial
    ref = _crop(img[0].astype(np.float32) * 0.01 + 0.5)
    ident = _params(rotation=[0, 0, 0])  # spatial path with an identity affine
    x, t = _run(initial, [sample_plan.identity_params(1), ident])
    np.testing.assert_allclose(x[0, 0].numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(x[1, 0].numpy(), ref, atol=1e-4)
    assert torch.equal(t[0][0, 0], torch.from_numpy(_crop(lab).astype(np.int64)))
    assert torch.equal(t[0][0], t[0][1])
    mir = [True, False, True]
    x, t = _run(initial, [_params(mirror=mir), _params(mirror=mir, rotation=[0, 0, 0])])
    flipped = np.flip(ref, axis=(0, 2))
    np.testing.assert_allclose(x[0, 0].numpy(), flipped, atol=1e-5)
    np.testing.assert_allclose(x[1, 0].numpy(), flipped, atol=1e-4)
    assert torch.equal(t[0][0], t[0][1])


def test_rotation_and_scaling_geometry_is_exact(initial):
    img, lab = initial
    # 90 degrees about axis 0 around the centre voxel: a rot90 of the initial patch, then the crop
    x, t = _run(initial, [_params(rotation=[math.pi / 2, 0, 0])])
    ref = _crop(np.rot90(img[0].astype(np.float32) * 0.01 + 0.5, k=-1, axes=(1, 2)))
    np.testing.assert_allclose(x[0, 0].numpy(), ref, atol=1e-4)
    assert torch.equal(t[0][0, 0], torch.from_numpy(_crop(np.rot90(lab, k=-1, axes=(1, 2))).astype(np.int64)))
    # scale 2 samples every second voxel around the centre; outside the initial patch reads 0 / background
    x, t = _run(initial, [_params(scale=2.0)])
    c_in, c_out = S[0] // 2, P[0] // 2
    idx = [c_in + 2 * (o - c_out) for o in range(P[0])]
    inside = [i for i, v in enumerate(idx) if 0 <= v < S[0]]
    sub = np.ix_(*[[idx[i] for i in inside]] * 3)
    got = x[0, 0].numpy()[np.ix_(inside, inside, inside)]
    np.testing.assert_allclose(got, img[0][sub] * 0.01 + 0.5, atol=1e-4)
    assert x[0, 0, 0, 0, 0] == 0 and t[0][0, 0, 0, 0, 0] == 0


def test_grid_planes_equal_affine_grid_and_nearest_labels_equal_grid_sample():
    torch.manual_seed(0)
    theta = torch.randn(2, 3, 4) * 0.3 + torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)
    grid = transforms._planes(theta, P, normalized=True, reverse=True).permute(0, 2, 3, 4, 1)
    rev = theta[:, [2, 1, 0]][:, :, [2, 1, 0, 3]]  # affine_grid wants (x, y, z) order
    ref = F.affine_grid(rev, (2, 1, *P), align_corners=True)
    torch.testing.assert_close(grid, ref, atol=1e-5, rtol=0)
    labels = torch.randint(0, 9, (2, 1, *S), dtype=torch.uint8)
    m = torch.stack([torch.diag(torch.tensor([(s - 1) / 2 for s in S])) @ t[:, :3] @ torch.diag(
        torch.tensor([2 / (p - 1) for p in P])) for t in theta])
    v = torch.stack([torch.tensor([(s - 1) / 2 for s in S]) * (t[:, :3] @ -torch.ones(3) + t[:, 3] + 1) for t in theta])
    voxel = transforms._planes(torch.cat([m, v[:, :, None]], 2), P, normalized=False, reverse=False)
    got = torch.empty((2, 1, *P), dtype=torch.long)
    for i in range(2):
        transforms._nearest_labels_into(got[i], labels[i], voxel[i] + 0.5, inside=False)
    want = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros", align_corners=True).long()
    assert (got != want).float().mean() < 1e-3  # ties at exact .5 may round differently; otherwise equal


def test_linear_label_interpolation_keeps_regions(initial):
    x_n, t_n = _run(initial, [_params(rotation=[0.3, -0.2, 0.4])])
    x_l, t_l = _run(initial, [_params(rotation=[0.3, -0.2, 0.4])], label_interpolation="linear")
    torch.testing.assert_close(x_n, x_l)
    agree = (t_n[0] == t_l[0]).float().mean()
    assert agree > 0.85  # same regions, different boundaries
    _, t_id = _run(initial, [_params(rotation=[0, 0, 0])], label_interpolation="linear")
    assert torch.equal(t_id[0][0, 0], torch.from_numpy(_crop(initial[1]).astype(np.int64)))


def test_deep_supervision_targets_are_nnunets_nearest_exact():
    assert patch_geometry.deep_supervision_strides([[2, 2, 2]] * 5, True) == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)]
    assert patch_geometry.deep_supervision_strides([[2, 2, 1], [2, 2, 2], [1, 2, 2]], True) == [(1, 1, 1), (2, 2, 1), (4, 4, 2)]
    assert patch_geometry.deep_supervision_strides([[2, 2, 2]] * 5, False) == [(1, 1, 1)]
    lab = torch.randint(0, 50, (2, 1, 48, 24, 16))  # patches are multiples of the cumulative strides
    for s in ((2, 2, 2), (4, 4, 2), (8, 2, 1), (3, 3, 1)):
        shape = [n // k for n, k in zip(lab.shape[2:], s)]
        want = F.interpolate(lab.float(), shape, mode="nearest-exact").long()
        assert torch.equal(patch_geometry.downsample_target(lab, s), want)


def test_intensity_transforms_match_batchgeneratorsv2():
    bg_gamma = pytest.importorskip("batchgeneratorsv2.transforms.intensity.gamma")
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import blur_dimension
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform

    torch.manual_seed(0)
    x = torch.randn(1, 20, 18, 16)
    for sigmas in ([0.5, 0.8, 1.0], [0.7, 0.0, 0.6]):
        ours = x[0].clone()
        transforms._blur_(ours, sigmas)
        ref = x.clone()
        for d, s in enumerate(sigmas):
            if s > 0:
                ref = blur_dimension(ref, s, d, truncate=6)
        torch.testing.assert_close(ours, ref[0], atol=1e-5, rtol=0)
    for inv in (False, True):
        ours = x[0].clone()
        transforms._gamma_(ours, 1.3, invert=inv)
        t = bg_gamma.GammaTransform((0.7, 1.5), 0, False, 1, 1)
        ref = t._apply_to_image(x.clone(), apply_to_channel=torch.tensor([0]), retain_stats=torch.tensor([True]),
                                invert_image=torch.tensor([inv]), gamma=torch.tensor([1.3]))
        torch.testing.assert_close(ours, ref[0], atol=1e-5, rtol=1e-5)
    ours = x[0].clone()
    transforms._contrast_(ours, 1.2)
    ref = ContrastTransform((0.75, 1.25), True, False)._apply_to_image(
        x.clone(), apply_to_channel=torch.tensor([0]), multipliers=torch.tensor([1.2]))
    torch.testing.assert_close(ours, ref[0])
    ours = x[0].clone()
    transforms._lowres_(ours, 0.6)
    ref = SimulateLowResolutionTransform((0.5, 1), False, True, None)._apply_to_image(
        x.clone(), apply_to_channel=[0], scales=torch.tensor([[0.6, 0.6, 0.6]]))
    torch.testing.assert_close(ours, ref[0])


def _rich_params():
    return [
        _params(rotation=[0.3, -0.2, 0.5], scale=1.2, mirror=[True, False, False], blur_sigma=[[0.6, 0.9, 0.7]],
                gamma=[1.2]),
        _params(mirror=[False, True, True], brightness=[1.1], contrast=[0.9], lowres=[0.7], gamma_inverted=[0.8]),
        _params(scale=0.8, noise_std=0.05, gamma=[0.8]),
    ]


def test_batch_composition_does_not_change_a_sample(initial):
    img, lab = initial
    params = _rich_params()
    noise = [None, None, 1234567]  # noise keys: the field is generated in augment_batch
    raw = raw_batch.raw_from_initial_patches([img] * 3, [lab] * 3, params, [NORM] * 3, P, S, noise)
    batch_x, batch_t = transforms.augment_batch(raw, patch=P, initial=S, ds_strides=DS)
    for b in range(3):
        one = raw_batch.raw_from_initial_patches([img], [lab], [params[b]], [NORM], P, S, [noise[b]])
        x, t = transforms.augment_batch(one, patch=P, initial=S, ds_strides=DS)
        assert torch.equal(x[0], batch_x[b])
        for a, c in zip(t, batch_t):
            assert torch.equal(a[0], c[b])
    assert [t.shape[2:] for t in batch_t] == [torch.Size(P), torch.Size([8] * 3), torch.Size([4] * 3)]
    assert batch_t[0].dtype == torch.int64 and batch_x.dtype == torch.float32


@pytest.mark.gpu
def test_cpu_and_cuda_agree(initial):
    img, lab = initial
    params = _rich_params()
    noise = [None, None, 1234567]  # noise keys: the field is generated in augment_batch
    raw = raw_batch.raw_from_initial_patches([img] * 3, [lab] * 3, params, [NORM] * 3, P, S, noise)
    x_cpu, t_cpu = transforms.augment_batch(raw, patch=P, initial=S, ds_strides=DS, device="cpu")
    x_gpu, t_gpu = transforms.augment_batch(raw, patch=P, initial=S, ds_strides=DS, device="cuda")
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, atol=1e-3, rtol=1e-3)
    for a, b in zip(t_cpu, t_gpu):
        assert (a != b.cpu()).float().mean() < 1e-3
    # the noise field: identical integers on both devices, Box-Muller to float rounding
    x = torch.randint(0, 2**32, (10000,), dtype=torch.int64)
    on_gpu = counter_noise._hash32_(x.clone().cuda(), torch.empty_like(x).cuda()).cpu()
    assert torch.equal(on_gpu, counter_noise._hash32_(x.clone(), torch.empty_like(x)))
    shape = (1, 40, 50, 60)
    torch.testing.assert_close(counter_noise.gaussian_noise(42, shape, "cuda").cpu(), counter_noise.gaussian_noise(42, shape), atol=1e-4, rtol=1e-4)


def _mueller_u32(x: np.ndarray) -> np.ndarray:
    """Reference of augment._hash32_ in numpy uint32, whose multiply wraps by definition."""
    x = x.astype(np.uint32)
    for _ in range(2):
        x = ((x >> np.uint32(16)) ^ x) * np.uint32(0x45D9F3B)
    return (x >> np.uint32(16)) ^ x


def test_noise_integers_are_exact_uint32_arithmetic():
    rng = np.random.default_rng(0)
    c = np.concatenate([np.arange(1000), rng.integers(0, 2**32, 5000), [2**32 - 1, 2**31, 2**31 - 1]]).astype(np.uint64)
    x = torch.from_numpy(c.astype(np.int64))
    got = counter_noise._hash32_(x.clone(), torch.empty_like(x)).numpy()
    np.testing.assert_array_equal(got, _mueller_u32(c).astype(np.int64))
    # one field from first principles: u = hash(hash(counter) ^ key), Box-Muller on (radius, angle)
    key, shape = 0xDEADBEEF, (3, 5, 7)
    n = int(np.prod(shape))
    h = (n + 1) // 2
    u = [((_mueller_u32(_mueller_u32(np.arange(h, dtype=np.uint64) + s) ^ np.uint32(key)) >> np.uint32(8))
          .astype(np.float64) + 0.5) / 2**24 for s in (0, 2**31)]
    r, t = np.sqrt(-2 * np.log(u[0])), 2 * np.pi * u[1]
    want = np.concatenate([r * np.cos(t), (r * np.sin(t))[:n - h]]).reshape(shape)
    np.testing.assert_allclose(counter_noise.gaussian_noise(key, shape).numpy(), want, atol=1e-5, rtol=1e-5)


def test_noise_field_is_iid_unit_gaussian_and_a_function_of_the_key():
    z = counter_noise.gaussian_noise(7, (1, 64, 64, 64)).double()
    flat = z.flatten()
    assert abs(flat.mean()) < 0.005 and abs(flat.std() - 1) < 0.005
    kurtosis = ((flat - flat.mean()) ** 4).mean() / flat.var() ** 2
    assert abs(kurtosis - 3) < 0.05
    assert abs((flat < -1.96).double().mean() - 0.025) < 0.002 and abs((flat > 1.96).double().mean() - 0.025) < 0.002
    for d in (1, 2, 3):  # neighbours along every axis are uncorrelated
        a, b = z.narrow(d, 0, 63), z.narrow(d, 1, 63)
        assert abs((a * b).mean()) < 0.01
    other = counter_noise.gaussian_noise(8, (1, 64, 64, 64)).double()
    assert abs((z * other).mean()) < 0.01
    assert torch.equal(counter_noise.gaussian_noise(7, (1, 64, 64, 64)).double(), z)
    # chunked generation: a field longer than one chunk of pairs equals its own recomputation
    big = counter_noise.gaussian_noise(3, (2 * counter_noise._NOISE_CHUNK + 3,))
    assert torch.equal(big, counter_noise.gaussian_noise(3, (2 * counter_noise._NOISE_CHUNK + 3,))) and torch.isfinite(big).all()


def test_noise_is_the_keyed_field_times_the_sample_std(initial):
    img, lab = initial
    params = [_params(noise_std=0.07)]
    clean = transforms.augment_batch(raw_batch.raw_from_initial_patches([img], [lab], params, [NORM], P, S), patch=P, initial=S,
                            ds_strides=DS)[0]
    noisy = transforms.augment_batch(raw_batch.raw_from_initial_patches([img], [lab], params, [NORM], P, S, [99]), patch=P, initial=S,
                            ds_strides=DS)[0]
    torch.testing.assert_close(noisy[0], clean[0] + 0.07 * counter_noise.gaussian_noise(99, (1, *P)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("interp", ["nearest", "linear"])
def test_cpu_per_sample_spatial_path_equals_the_batched_device_path(initial, interp):
    """On a CPU rotated/scaled samples are sampled one by one from their box; the GPU path pastes the
    boxes into the initial patch for one batched grid_sample. Same result up to float rounding."""
    img, lab = initial
    params = _rich_params() + [_params(rotation=[-0.5, 0.5, 0.5], scale=1.4, mirror=[False, True, True]),
                               _params(scale=0.7), _params(rotation=[0.2, 0.1, -0.3], scale=0.75)]
    raw = raw_batch.raw_from_initial_patches([img] * len(params), [lab] * len(params), params, [NORM] * len(params), P, S,
                                     [None, None, 5, None, None, None])
    kw = {"patch": P, "initial": S, "ds_strides": DS, "label_interpolation": interp}
    x_s, t_s = transforms.augment_batch(raw, **kw, batched_spatial=False)
    x_b, t_b = transforms.augment_batch(raw, **kw, batched_spatial=True)
    torch.testing.assert_close(x_s, x_b, atol=1e-4, rtol=1e-4)
    for a, b in zip(t_s, t_b):
        assert (a != b).float().mean() < 1e-3
