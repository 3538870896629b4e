"""Patch geometry of the training stream: the enlarged initial patch a rotated/scaled sample is cut
from, the voxel affine of its sampling grid, the box of the initial patch that grid touches, and the
deep-supervision target strides. Pure functions of the augmentation parameters; no I/O, no state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# nnU-Net sizes the initial patch with (0.85, 1.25), not with the scaling range it samples from
# (0.7, 1.4); its own comment calls this "stupid" but keeps it. Grid points of a strongly zoomed-out
# and rotated sample that fall outside the initial patch read zeros (the normalised mean), as there.
NNUNET_INITIAL_PATCH_SCALE = (0.85, 1.25)

# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _rot_x(a: float) -> np.ndarray:
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def _rot_y(a: float) -> np.ndarray:
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def _rot_z(a: float) -> np.ndarray:
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def corner_points(patch: Sequence[int]) -> np.ndarray:
    """The eight corner voxels of an output patch, float64 [8, 3] (0 or P - 1 per axis): an affine
    grid's footprint is bounded by where they land."""
    p1 = np.asarray(patch, dtype=np.float64) - 1
    return np.array([[i, j, k] for i in (0, p1[0]) for j in (0, p1[1]) for k in (0, p1[2])])


def initial_patch_size(
    patch: Sequence[int],
    rotation_max_deg: float,
    scale_range: Sequence[float] = NNUNET_INITIAL_PATCH_SCALE,
    rotation_enabled: bool = True,
) -> list[int]:
    """nnU-Net's ``get_patch_size``: the patch to crop so that rotation/scaling rarely leaves it.

    The extent of the patch's edge vector rotated about each axis alone by the largest angle
    (capped at 90 degrees), divided by the smallest scale: 128^3 with 30 degrees -> 205^3.
    """
    coords = np.asarray(patch, dtype=np.float64)
    shape = coords.copy()
    if rotation_enabled and rotation_max_deg > 0:
        a = min(math.radians(abs(rotation_max_deg)), math.pi / 2)
        for rot in (_rot_x, _rot_y, _rot_z):
            # batchgenerators' rotate_coords_3d multiplies the row vector by R, i.e. rotates by -a
            shape = np.maximum(np.abs(rot(-a) @ coords), shape)
    shape /= min(scale_range)
    return [int(s) for s in shape.astype(int)]


def rotation_scale_matrix(angles: Sequence[float], scale: float) -> np.ndarray:
    """batchgeneratorsv2's ``create_affine_matrix_3d``: Rz @ Ry @ Rx @ diag(scale), float64.

    It maps an offset from the output patch centre to an offset in the input; scale > 1 samples a
    larger region, i.e. zooms out.
    """
    ax, ay, az = (float(a) for a in angles)
    return _rot_z(az) @ _rot_y(ay) @ _rot_x(ax) @ np.diag([float(scale)] * 3)


def voxel_affine(params: dict, patch: Sequence[int], initial: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Output voxel o of the final patch samples input voxel ``M @ o + v`` of the initial patch.

    Includes the mirroring: a flipped axis reads its output index as ``P - 1 - o``.
    """
    p = np.asarray(patch, dtype=np.float64)
    s = np.asarray(initial, dtype=np.float64)
    a = rotation_scale_matrix(params["rotation"], float(params["scale"]))
    flip = np.asarray(params["mirror"], dtype=bool)
    f = np.where(flip, -1.0, 1.0)
    t = np.where(flip, p - 1, 0.0)
    c_out = np.floor(p / 2)
    c_in = np.floor(s / 2)
    m = a @ np.diag(f)
    v = c_in + a @ (t - c_out)
    return m, v


def normalized_theta(m: np.ndarray, v: np.ndarray, patch: Sequence[int], initial: Sequence[int]) -> np.ndarray:
    """The voxel affine in ``grid_sample``'s normalised coordinates (align_corners=True), tensor axis order.

    Returns [3, 4] (A | b) with n_in = A @ n_out + b, where n = 2 i / (N - 1) - 1 per axis.
    """
    dp = np.diag((np.asarray(patch, dtype=np.float64) - 1) / 2)
    ds_inv = np.diag(2 / (np.asarray(initial, dtype=np.float64) - 1))
    a = ds_inv @ m @ dp
    b = ds_inv @ (m @ dp @ np.ones(3) + v) - 1
    return np.concatenate([a, b[:, None]], axis=1)


def spatial_read_box(params: dict, patch: Sequence[int], initial: Sequence[int]) -> tuple[list[int], list[int]]:
    """The part [lo, hi) of the initial patch that a rotated/scaled sample's grid can touch.

    The eight corners of the output patch bound the (affine) grid; +-1 voxel covers the trilinear
    neighbours and float rounding. The reader fetches only this box (and the chunks under it).
    """
    lo, hi, _ = spatial_box_and_affine(params, patch, initial)
    return lo, hi


def spatial_box_and_affine(params: dict, patch: Sequence[int], initial: Sequence[int]
                           ) -> tuple[list[int], list[int], np.ndarray]:
    """``spatial_read_box`` plus the voxel affine it was computed from, [3, 4] float64 (M | v), so a
    reader that needs both (box to read, affine to ship) builds the affine once."""
    m, v = voxel_affine(params, patch, initial)
    pts = corner_points(patch) @ m.T + v
    lo = np.floor(pts.min(0)).astype(int) - 1
    hi = np.floor(pts.max(0)).astype(int) + 3
    s = np.asarray(initial)
    lo = np.clip(lo, 0, s)
    hi = np.clip(hi, 0, s)
    return lo.tolist(), hi.tolist(), np.concatenate([m, v[:, None]], 1)


def deep_supervision_strides(pool_strides: Sequence[Sequence[int]], deep_supervision: bool) -> list[tuple[int, ...]]:
    """Per-axis down-sampling factor of each model output, full resolution first.

    nnU-Net: ``1 / cumprod([[1,1,1], *pool_strides])[:-1]`` -> 1, 2, 4, 8, 16 for five 2x pools.
    Without deep supervision the model has one output, at full resolution.
    """
    strides = [(1, 1, 1)]
    if not deep_supervision:
        return strides
    acc = [1, 1, 1]
    for s in list(pool_strides)[:-1]:
        acc = [a * int(b) for a, b in zip(acc, s)]
        strides.append(tuple(acc))
    return strides


def downsample_target(label: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """nnU-Net's ``DownsampleSegForDSTransform`` (nearest-exact) for integer strides, as a strided slice.

    nearest-exact takes source index floor((i + 0.5) * s) = i * s + s // 2, so a slice starting at
    s // 2 is the same selection without interpolating a float copy of the labels.
    """
    if all(s == 1 for s in stride):
        return label
    sl = tuple(slice(s // 2, None, s) for s in stride)
    return label[(Ellipsis, *sl)].contiguous()




def crop_offset(patch: Sequence[int], initial: Sequence[int]) -> list[int]:
    """Where the final patch sits inside the initial patch: centre voxel P//2 on S//2."""
    return [i // 2 - p // 2 for p, i in zip(patch, initial)]


def mirror_view(a: np.ndarray, mirror: Sequence[bool]) -> np.ndarray:
    """A flipped view of the last three axes (numpy copies honour negative strides)."""
    sl = tuple(slice(None, None, -1) if f else slice(None) for f in mirror)
    return a[(Ellipsis, *sl)]

