"""Sliding-window inference with Gaussian weighting and optional mirroring (nnU-Net's scheme).

Used by validation during training and by ``stunet-scale predict``. ``network`` is any callable
``[B, C, *patch] -> logits`` (or a deep-supervision tuple): the torch module, or for ``predict
--backend onnxruntime`` an onnxruntime session behind the same call
(``stunet_scale.export.onnx_model.OnnxRuntimeNetwork``), so windows, Gaussian blending and
mirroring are one code path for both. Two details matter at scale:

* Under ZeRO-3 or FSDP every forward is a collective (parameters are gathered per module), so all
  ranks must run the same number of forwards or the job hangs. ``count_forwards`` tells a rank how
  many it needs; the trainer all-reduces the max and passes it as ``min_forwards`` so short ranks
  run padding forwards on a zero patch.
* Logits of a 105-class full CT are large (105 x 228 x 228 x 240 fp32 = 5 GB), so the accumulator
  may live on another device (``out_device``, e.g. CPU) than the forward passes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


def window_starts(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> list[list[int]]:
    """Start offsets per axis: evenly spread, overlapping by (1 - step_size), covering the image.

    Same rule as nnU-Net's ``compute_steps_for_sliding_window``. ``image_size`` must be >= patch.
    """
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    starts = []
    for image, patch in zip(image_size, patch_size):
        if image < patch:
            raise ValueError(f"image size {tuple(image_size)} is smaller than patch {tuple(patch_size)}; pad first")
        target = patch * step_size
        n = int(np.ceil((image - patch) / target)) + 1
        span = image - patch
        actual = span / (n - 1) if n > 1 else 0
        starts.append([int(np.round(actual * i)) for i in range(n)])
    return starts


@lru_cache(maxsize=8)
def _gaussian(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    # Exactly nnU-Net v2's ``compute_gaussian``: a unit impulse at ``p // 2`` blurred by scipy's
    # truncated Gaussian (sigma = p * sigma_scale), scaled to max 1, and only voxels that came out
    # exactly 0 (outside the truncation radius) raised to the smallest nonzero weight so the blend
    # never divides by 0. No other floor: a fixed floor (e.g. 1e-3) would flatten the tails of a
    # 128^3 map and give patch borders more say than nnU-Net, so the same weights would predict
    # differently from nnU-Net's predictor.
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch_size, dtype=np.float64)
    impulse[tuple(p // 2 for p in patch_size)] = 1
    g = gaussian_filter(impulse, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    g = (g / np.max(g)).astype(np.float32)  # nnU-Net casts before the zero fix; so do we, to match bit for bit
    zero = g == 0
    if zero.any():
        g[zero] = g[~zero].min()
    return g


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    return torch.from_numpy(_gaussian(tuple(int(p) for p in patch_size), float(sigma_scale)))


def _mirror_sets(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes (nnU-Net's TTA): () first, then single axes, pairs, ..."""
    axes = tuple(mirror_axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def padded_shape(image_size: Sequence[int], patch_size: Sequence[int]) -> list[int]:
    return [max(i, p) for i, p in zip(image_size, patch_size)]


def count_forwards(
    image_size: Sequence[int], patch_size: Sequence[int], step_size: float = 0.5,
    mirror_axes: Sequence[int] = (), batch_size: int = 1,
) -> int:
    """Number of network calls ``sliding_window_inference`` makes for this image."""
    starts = window_starts(padded_shape(image_size, patch_size), patch_size, step_size)
    windows = int(np.prod([len(s) for s in starts]))
    batches = -(-windows // batch_size)
    return batches * len(_mirror_sets(mirror_axes))


def _logits(output) -> torch.Tensor:
    # Deep-supervision models return a tuple (full resolution first).
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def sliding_window_inference(
    network: Callable[[torch.Tensor], torch.Tensor | tuple],
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    step_size: float = 0.5,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    device: torch.device | str | None = None,
    out_device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    use_gaussian: bool = True,
    pad_value: float = 0.0,
    min_forwards: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Predict logits for a whole image ``[C, X, Y, Z]``; returns ``[num_classes, X, Y, Z]`` float32.

    ``mirror_axes`` are spatial axes (0, 1, 2) flipped for test-time augmentation; predictions of
    all flip combinations are averaged. ``min_forwards`` pads with forwards on a zero batch so that
    every rank of a sharded model makes the same number of collective calls.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be [C, X, Y, Z], got shape {tuple(image.shape)}")
    patch = [int(p) for p in patch_size]
    device = torch.device(device) if device is not None else image.device
    out_device = torch.device(out_device) if out_device is not None else device
    size = list(image.shape[1:])
    full = padded_shape(size, patch)
    # Pad small images symmetrically (nnU-Net does the same) and crop the result back at the end.
    pad_before = [(f - s) // 2 for f, s in zip(full, size)]
    if full != size:
        pads = []
        for before, f, s in reversed(list(zip(pad_before, full, size))):
            pads += [before, f - s - before]
        image = F.pad(image, pads, mode="constant", value=pad_value)
    starts = window_starts(full, patch, step_size)
    windows = list(itertools.product(*starts))
    weight = gaussian_importance(patch).to(out_device) if use_gaussian else torch.ones(patch, device=out_device)

    logits_sum: torch.Tensor | None = None
    weight_sum = torch.zeros(full, device=out_device)
    mirrors = _mirror_sets(mirror_axes)
    forwards = 0
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, desc="sliding window", unit="batch", disable=None, leave=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return _logits(network(x)).float()

    for batch in iterator:
        x = torch.stack([
            image[:, s0:s0 + patch[0], s1:s1 + patch[1], s2:s2 + patch[2]] for s0, s1, s2 in batch
        ]).to(device, non_blocking=True)
        pred = None
        for flips in mirrors:
            dims = [a + 2 for a in flips]
            y = run(torch.flip(x, dims) if dims else x)
            forwards += 1
            y = torch.flip(y, dims) if dims else y
            pred = y if pred is None else pred + y
        pred = (pred / len(mirrors)).to(out_device)
        if logits_sum is None:
            logits_sum = torch.zeros((pred.shape[1], *full), device=out_device)
        for (s0, s1, s2), p in zip(batch, pred):
            region = (slice(s0, s0 + patch[0]), slice(s1, s1 + patch[1]), slice(s2, s2 + patch[2]))
            logits_sum[(slice(None), *region)] += p * weight
            weight_sum[region] += weight

    if forwards < min_forwards:
        dummy = torch.zeros((1, image.shape[0], *patch), device=device, dtype=image.dtype)
        for _ in range(min_forwards - forwards):
            run(dummy)

    logits = logits_sum / weight_sum
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, size))
    return logits[(slice(None), *crop)]
