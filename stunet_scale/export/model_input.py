"""A file-grid image as the input a model spec expects: resampled to the spec's spacing and crop
(``prepare``'s own geometry code), normalised by the training code's own functions, in the spec's
axis order. ``predict`` runs it on every case; the ONNX export checks its graph on it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ..data.ingest.preprocess import intensity_stats, nonzero_zscore_stats, stored_case
from ..data.stream.readers import normalization
from ..data.stream.transforms import normalize_into


def preprocess(image: np.ndarray, affine: np.ndarray, spec) -> tuple[np.ndarray, object]:
    """File-grid ``image [C, x, y, z]`` -> normalised network input ``[C, ...]`` and its ``Geometry``."""
    zyx = spec.axis_order == "ras_zyx"
    target = list(spec.spacing)[::-1] if zyx else list(spec.spacing)  # geometry works in RAS (x, y, z)
    geometry, x, _ = stored_case(image, affine, target, spec.crop, image_method=spec.image_interpolation)
    x = normalize(x, spec, original=image)
    if zyx:
        x = np.ascontiguousarray(x.transpose(0, 3, 2, 1))
    return x, geometry


def normalize(x: np.ndarray, spec, original: np.ndarray | None = None) -> np.ndarray:
    """Per channel: the z-score the weights were trained with, or nnU-Net's CT scheme.

    ``spec.crop == "nonzero"`` (our default, and the release): nnU-Net's statistics of the
    ``original`` image over its nonzero box (``preprocess.nonzero_zscore_stats``, what ``prepare``
    records); any other crop: statistics of the stored-grid ``x`` itself (``zscore_stored``).
    The training code's own functions, not a copy: the statistics become (clip, scale, shift) in
    ``readers.normalization`` and are applied by ``transforms.normalize_into``, which training and
    validation run. So the epsilon, the float32 rounding of scale and shift and the order of
    operations are those the weights saw.
    """
    # normalization() reads the dataset statistics from a store; predict has them in the ModelSpec
    store = SimpleNamespace(intensity=spec.intensity_stats, root=f"model spec ({spec.normalization})")
    if spec.normalization == "zscore" and spec.crop == "nonzero":
        if original is None:
            raise ValueError("z-score over the nonzero box needs the original image (nnU-Net's statistics)")
        mode, per_channel = "zscore", [{"nonzero": s} for s in nonzero_zscore_stats(original)]
    else:
        mode = "zscore_stored" if spec.normalization == "zscore" else spec.normalization
        per_channel = [intensity_stats(x[c], None) for c in range(x.shape[0])]
    norm = normalization(store, {"id": "input", "intensity_channels": per_channel}, mode, x.shape[0])
    out = torch.empty(x.shape, dtype=torch.float32)
    normalize_into(out, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(norm))
    return out.numpy()
