"""Sliding-window inference: coverage, Gaussian weighting, mirroring, padding, forward counts."""

from __future__ import annotations

import pytest
import torch

from stunet_scale.inference import count_forwards, gaussian_importance, sliding_window_inference, window_starts


def test_window_starts_cover_the_image_like_nnunet():
    assert window_starts([128], [128], 0.5) == [[0]]
    assert window_starts([200], [128], 0.5) == [[0, 36, 72]]  # ceil(72 / 64) + 1 windows
    starts = window_starts([300, 128, 129], [128, 128, 128], 0.5)
    assert starts[0] == [0, 57, 115, 172] and starts[1] == [0] and starts[2] == [0, 1]
    with pytest.raises(ValueError, match="smaller than patch"):
        window_starts([100], [128], 0.5)


def test_gaussian_peaks_in_the_centre_and_never_reaches_zero():
    g = gaussian_importance([16, 16, 16])
    assert g.max() == 1 and g.min() > 0
    assert g[8, 8, 8] > g[0, 0, 0]


def test_a_pointwise_network_is_reproduced_exactly():
    # A network that maps each voxel independently must give the same output whatever the tiling.
    net = lambda x: torch.cat([x * 2, -x], dim=1)  # noqa: E731
    image = torch.randn(1, 40, 33, 20)
    out = sliding_window_inference(net, image, [16, 16, 16], step_size=0.5, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(out, torch.cat([image * 2, -image]), rtol=1e-5, atol=1e-5)


def test_small_images_are_padded_and_cropped_back():
    net = lambda x: x + 1  # noqa: E731
    image = torch.randn(2, 10, 20, 5)
    out = sliding_window_inference(net, image, [16, 16, 16])
    assert out.shape == image.shape
    torch.testing.assert_close(out, image + 1)


def test_deep_supervision_tuple_uses_full_resolution():
    net = lambda x: (x * 3, x[..., ::2, ::2, ::2])  # noqa: E731
    image = torch.randn(1, 16, 16, 16)
    torch.testing.assert_close(sliding_window_inference(net, image, [16, 16, 16]), image * 3)


def test_forward_count_and_padding_forwards():
    calls = []

    def net(x):
        calls.append(x.shape[0])
        return x

    image = torch.randn(1, 40, 20, 20)
    expected = count_forwards(image.shape[1:], [16, 16, 16], 0.5, mirror_axes=(0,), batch_size=2)
    sliding_window_inference(net, image, [16, 16, 16], mirror_axes=(0,), batch_size=2)
    assert len(calls) == expected
    calls.clear()
    sliding_window_inference(net, image, [16, 16, 16], mirror_axes=(0,), batch_size=2, min_forwards=expected + 3)
    assert len(calls) == expected + 3


@pytest.mark.parametrize("patch", [[16, 16, 16], [128, 128, 128], [5, 24, 9], [2, 64, 3]])
def test_gaussian_is_nnunets_compute_gaussian(patch):
    # Same weights as nnU-Net v2's predictor, bit for bit (no extra floor on the tails), so a
    # prediction blends windows exactly as nnUNetv2_predict does. Tiny axes (2, 3) put voxels
    # beyond scipy's truncation radius: those exact zeros get nnU-Net's min-nonzero replacement.
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    theirs = compute_gaussian(tuple(patch), sigma_scale=1 / 8, dtype=torch.float32, device=torch.device("cpu"))
    ours = gaussian_importance(patch)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    assert ours.min() > 0


def test_blend_is_the_gaussian_weighted_average_of_overlapping_windows():
    # Each window's output is a constant: its own index. So at every voxel the blended value must be
    # sum_w g(voxel - start_w) * w / sum_w g(voxel - start_w), computed here by hand from the weights.
    patch = [8, 8, 8]
    image = torch.zeros(1, 20, 8, 13)
    seen: list[tuple] = []

    def net(x):
        out = torch.empty(x.shape[0], 1, *x.shape[2:])
        for b in range(x.shape[0]):
            out[b] = float(len(seen))
            seen.append(None)
        return out

    out = sliding_window_inference(net, image, patch, step_size=0.5, batch_size=3)
    starts = window_starts(list(image.shape[1:]), patch, 0.5)
    windows = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    assert len(seen) == len(windows) and len(windows) > 4
    g = gaussian_importance(patch).double()
    assert g[0, 0, 0] < 0.1 * g[4, 4, 4]  # the weights really differ across a window
    for voxel in [(0, 0, 0), (6, 3, 5), (7, 4, 7), (11, 2, 9), (19, 7, 12), (10, 5, 6)]:
        num = den = 0.0
        for index, start in enumerate(windows):
            local = [v - s for v, s in zip(voxel, start)]
            if all(0 <= q < p for q, p in zip(local, patch)):
                w = float(g[tuple(local)])
                num, den = num + w * index, den + w
        assert out[(0, *voxel)].item() == pytest.approx(num / den, rel=1e-5)
    # An unweighted blend of the same windows differs wherever they overlap, so the check above
    # really depends on the Gaussian (a per-voxel network could not tell the two apart).
    seen.clear()
    flat = sliding_window_inference(net, image, patch, step_size=0.5, use_gaussian=False)
    assert not torch.allclose(flat, out, atol=1e-3)
