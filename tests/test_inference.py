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
