"""nnU-Net's augmentation list as batched torch ops that run on whichever device the batch is on.

Nothing here draws random numbers from a stateful generator. Every parameter of every sample (does
it rotate, by which angles, which channels blur and how much, which axes flip) is drawn by
``draw_params`` from the counter-based generator the sample plan (``plan.py``) keys by
``(seed, global_sample_index)``; the Gaussian noise field is a counter-based hash of the plan's
per-sample noise key and the voxel index (``add_gaussian_noise_``), computed where the batch is
augmented. The transform itself is deterministic given those parameters, so
the same sample comes out the same in a DataLoader worker on the CPU and on the rank's GPU (up to
float rounding), at any ``num_workers`` and after a resume.

The list, probabilities and ranges are nnU-Net v2's ``nnUNetTrainer.get_training_transforms``
(batchgeneratorsv2 0.3.6). STU-Net trained with nnU-Net v1 (``get_moreDA_augmentation``), which has
the same list and probabilities but not all the same draws: v1 drew the scale factor 50/50 from
U(0.7, 1) or U(1, 1.4) (v2, and this module, draw U(0.7, 1.4) uniformly: more zoom-outs), and
brightness/contrast from U(0.75, 1.25) (``../shared/docs/stunet_recipe.md`` §2). So this is
nnU-Net v2's recipe, not a bit-for-bit reproduction of STU-Net's:

| # | transform                           | parameters                                             | p      |
|---|-------------------------------------|--------------------------------------------------------|--------|
| 1 | rotation (all three axes)           | U(-30, 30) degrees per axis                            | .2     |
| 1 | scaling (isotropic)                 | U(0.7, 1.4)                                            | .2     |
| 2 | Gaussian noise                      | std U(0, 0.1) (nnU-Net calls it "variance")            | .1     |
| 3 | Gaussian blur                       | sigma U(0.5, 1) per axis, per channel p .5             | .2     |
| 4 | multiplicative brightness           | x U(0.75, 1) or U(1, 1.25), 50/50                      | .15    |
| 5 | contrast, range preserved           | same 50/50 draw                                        | .15    |
| 6 | low-resolution simulation           | zoom U(0.5, 1), nearest down, trilinear up; ch. p .5   | .25    |
| 7 | gamma on the inverted image         | gamma 50/50 U(0.7, 1) or U(1, 1.5), stats retained     | .1     |
| 8 | gamma                               | same                                                   | .3     |
| 9 | mirror                              | each allowed axis with p .5                            | always |
| 10| deep-supervision targets            | nearest-exact at the model's cumulative pool strides   | always |

How the work is split (see ``loader.py``): a DataLoader worker reads, per sample, either the final
patch (no rotation/scaling: 64 % of samples, a plain crop, flipped while it is copied) or the part
of the enlarged "initial patch" the rotated/scaled grid touches, as int16/uint8. Everything else
(normalisation, one ``grid_sample`` per micro-batch for all rotated/scaled samples (on a CPU: one
per sample, on its box), noise, intensity transforms, deep-supervision targets) is
``augment_batch`` on the batch's device. Mirroring of the
rotated/scaled samples is folded into their sampling grid, so flips cost nothing; flips commute
with every intensity transform in distribution, so doing them first instead of last (nnU-Net's
order) changes no statistic.

Differences from nnU-Net, on purpose:
- Labels are resampled by nearest neighbour by default (nnU-Net interpolates one indicator map per
  label present, the cost that makes its pipeline slow with 104 classes); ``label_interpolation:
  linear`` gives nnU-Net's per-label linear + argmax.
- The rotation pivot is the patch centre voxel ``P//2`` <-> ``S//2`` in both the crop and the
  rotated path (batchgeneratorsv2 is half a voxel apart between the two), so a forced-foreground
  voxel lands on the patch centre exactly.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# nnU-Net sizes the initial patch with (0.85, 1.25), not with the scaling range it samples from
# (0.7, 1.4); its own comment calls this "stupid" but keeps it. Grid points of a strongly zoomed-out
# and rotated sample that fall outside the initial patch read zeros (the normalised mean), as there.
NNUNET_INITIAL_PATCH_SCALE = (0.85, 1.25)

# The slots of the uniform draws, fixed so that switching one transform off does not change the
# parameters of any other (nor the case, position or class, which live in other streams).
_SLOTS_SAMPLE = 20
_SLOTS_CHANNEL = 16


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


# --------------------------------------------------------------------------------------------
# Parameters (drawn from the sample plan's counter-based generator)
# --------------------------------------------------------------------------------------------


def _bg_contrast(u_half: float, u_val: float, lo: float, hi: float) -> float:
    # batchgeneratorsv2's BGContrast: 50/50 below or above 1 (when the range straddles 1).
    if u_half < 0.5 and lo < 1:
        return lo + (1 - lo) * u_val
    low = max(lo, 1.0)
    return low + (hi - low) * u_val


def identity_params(channels: int) -> dict[str, np.ndarray]:
    """Parameters that leave a sample as a centre crop (augmentation off, validation patches)."""
    return {
        "spatial": np.array(False),
        "rotation": np.zeros(3, np.float64),
        "scale": np.array(1.0),
        "mirror": np.zeros(3, bool),
        "noise_std": np.array(0.0, np.float32),
        "blur_sigma": np.zeros((channels, 3), np.float32),
        "brightness": np.zeros(channels, np.float32),
        "contrast": np.zeros(channels, np.float32),
        "lowres": np.zeros(channels, np.float32),
        "gamma_inverted": np.zeros(channels, np.float32),
        "gamma": np.zeros(channels, np.float32),
    }


def draw_params(rng: np.random.Generator, cfg, channels: int) -> dict[str, np.ndarray]:
    """Every augmentation parameter of one sample from its own generator (``cfg``: AugmentationConfig).

    Factors use 0 for "off" (no valid factor is 0). All slots are drawn whether or not a transform
    fires, so the layout never shifts.
    """
    u = rng.random(_SLOTS_SAMPLE + channels * _SLOTS_CHANNEL)
    p = identity_params(channels)
    if not cfg.enabled:
        return p
    rotate = u[0] < cfg.rotation_p
    scale = u[4] < cfg.scaling_p
    if rotate:
        r = math.radians(cfg.rotation_max_deg)
        p["rotation"] = (-r + 2 * r * u[1:4]).astype(np.float64)
    if scale:
        lo, hi = cfg.scaling_range
        p["scale"] = np.array(lo + (hi - lo) * u[5])
    p["spatial"] = np.array(bool(rotate or scale))
    if cfg.mirror:
        allowed = np.zeros(3, bool)
        allowed[list(cfg.mirror_axes)] = True
        p["mirror"] = (u[15:18] < 0.5) & allowed
    if u[6] < cfg.noise_p:
        lo, hi = cfg.noise_variance
        p["noise_std"] = np.array(lo + (hi - lo) * u[7], np.float32)
    blur, bright, contrast = u[9] < cfg.blur_p, u[10] < cfg.brightness_p, u[11] < cfg.contrast_p
    lowres, gamma_inv, gamma = u[12] < cfg.lowres_p, u[13] < cfg.gamma_inverted_p, u[14] < cfg.gamma_p
    for c in range(channels):
        w = u[_SLOTS_SAMPLE + c * _SLOTS_CHANNEL: _SLOTS_SAMPLE + (c + 1) * _SLOTS_CHANNEL]
        if blur and w[0] < cfg.blur_per_channel_p:
            lo, hi = cfg.blur_sigma
            p["blur_sigma"][c] = lo + (hi - lo) * w[1:4]
        if bright:
            p["brightness"][c] = _bg_contrast(w[4], w[5], *cfg.brightness_range)
        if contrast:
            p["contrast"][c] = _bg_contrast(w[6], w[7], *cfg.contrast_range)
        if lowres and w[8] < cfg.lowres_per_channel_p:
            lo, hi = cfg.lowres_zoom
            p["lowres"][c] = lo + (hi - lo) * w[9]
        if gamma_inv:
            p["gamma_inverted"][c] = _bg_contrast(w[10], w[11], *cfg.gamma_range)
        if gamma:
            p["gamma"][c] = _bg_contrast(w[12], w[13], *cfg.gamma_range)
    return p


# Per-sample fields that travel with a micro-batch to wherever it is augmented.
INTENSITY_FIELDS = ("noise_std", "blur_sigma", "brightness", "contrast", "lowres", "gamma_inverted", "gamma")


def stack_params(params: list[dict]) -> dict[str, np.ndarray]:
    """The intensity parameters of a micro-batch as float32 host arrays [m, ...]."""
    return {k: np.stack([np.asarray(p[k], np.float32) for p in params]) for k in INTENSITY_FIELDS}


# --------------------------------------------------------------------------------------------
# The raw micro-batch: what a DataLoader worker hands over (small integer tensors + parameters)
# --------------------------------------------------------------------------------------------


# None: allocate in shared memory inside DataLoader workers only; True/False forces it (benchmarks).
ALLOCATE_SHARED: bool | None = None


def new_tensor(shape: Sequence[int], dtype: torch.dtype, shared: bool | None = None) -> torch.Tensor:
    """An empty host tensor; inside a DataLoader worker it is born in shared memory, so handing the
    batch to the main process copies nothing (what ``default_collate`` does for its outputs).
    ``shared=False``: a private tensor (a worker that augments the raw batch itself never sends it)."""
    shape = tuple(int(s) for s in shape)
    if shared is None:
        shared = torch.utils.data.get_worker_info() is not None if ALLOCATE_SHARED is None else ALLOCATE_SHARED
    numel = int(np.prod(shape)) if shape else 1
    if not shared or numel == 0:  # an empty tensor is not worth a shared-memory segment
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(numel, device=proto.device)
    return proto.new(storage).view(shape)


def allocate_raw(spatial: Sequence[bool], noisy: Sequence[bool], channels: int, patch: Sequence[int],
                 boxes: Sequence[tuple[Sequence[int], Sequence[int]]] = (),
                 label_dtype: torch.dtype = torch.uint8, image_dtype: torch.dtype = torch.int16,
                 shared=None) -> dict:
    """Empty raw micro-batch tensors; readers fill them in place through ``.numpy()`` views.

    Samples without rotation/scaling arrive as their final crop [C, *patch] (already mirrored).
    A rotated/scaled sample arrives as the box ``[lo, hi)`` of its initial patch that its grid
    touches (``spatial_read_box``; ``boxes`` lists one per such sample, in order), [C, *(hi - lo)],
    with its voxel affine. Images are int16 HU (float32 for non-CT stores) and labels uint8/int16:
    for CT 3 bytes a voxel cross the process boundary and the PCIe bus, not 4 + 8. ``norm``
    [m, C, 4] is (clip low, clip high, scale, shift) per sample and channel; a noisy sample
    carries only its noise key (the field is generated where it is augmented).

    Voxels are tensors. ``shared``: True/False/None as in ``new_tensor``, or a
    ``shared_slabs.SlabPool``: inside a worker all voxel tensors are views of one recycled
    shared-memory slab, whose ticket is ``raw["slab"]`` (the consumer releases it). The small
    per-sample fields are numpy arrays, which a DataLoader pickles by value instead of giving each
    its own shared-memory segment and file descriptor (~16 of them per micro-batch otherwise).
    """
    crop_pos = [i for i, s in enumerate(spatial) if not s]
    spatial_pos = [i for i, s in enumerate(spatial) if s]
    noise_pos = [i for i, n in enumerate(noisy) if n]
    if len(boxes) != len(spatial_pos):
        raise ValueError(f"{len(spatial_pos)} rotated/scaled samples need as many boxes, got {len(boxes)}")
    m = len(spatial)
    sizes = [[int(h) - int(l_) for l_, h in zip(lo, hi)] for lo, hi in boxes]
    specs = [((len(crop_pos), channels, *patch), image_dtype), ((len(crop_pos), 1, *patch), label_dtype)]
    specs += [((channels, *s), image_dtype) for s in sizes] + [((1, *s), label_dtype) for s in sizes]
    if shared is None or isinstance(shared, bool):
        voxels, ticket = [new_tensor(shape, dtype, shared) for shape, dtype in specs], None
    else:
        voxels, ticket = shared.carve(specs)
    k = len(sizes)
    return {
        "sample_index": np.zeros(m, np.int64),
        "norm": np.zeros((m, channels, 4), np.float32),
        "crop_pos": np.array(crop_pos, np.int64),
        "crop_image": voxels[0],
        "crop_label": voxels[1],
        "spatial_pos": np.array(spatial_pos, np.int64),
        "spatial_image": voxels[2:2 + k],
        "spatial_label": voxels[2 + k:],
        "slab": ticket,
        "spatial_box": np.array([[list(lo), list(hi)] for lo, hi in boxes], np.int64).reshape(-1, 2, 3),
        "spatial_affine": np.zeros((len(spatial_pos), 3, 4), np.float64),
        "noise_pos": np.array(noise_pos, np.int64),
        "noise_key": np.zeros(len(noise_pos), np.int64),
        "params": {},
    }


def set_spatial_affine(raw: dict, j: int, params: dict, patch: Sequence[int], initial: Sequence[int],
                       affine: np.ndarray | None = None) -> None:
    """Slot ``j``'s voxel affine (output patch -> initial patch, mirroring included), float64.
    ``affine``: the [3, 4] one ``spatial_box_and_affine`` already computed for these parameters."""
    if affine is None:
        m, v = voxel_affine(params, patch, initial)
        affine = np.concatenate([m, v[:, None]], 1)
    raw["spatial_affine"][j] = affine


def host_array(a) -> np.ndarray:
    """A raw micro-batch field as a host numpy array (numpy already, or a tensor from older code/tests)."""
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def crop_offset(patch: Sequence[int], initial: Sequence[int]) -> list[int]:
    """Where the final patch sits inside the initial patch: centre voxel P//2 on S//2."""
    return [i // 2 - p // 2 for p, i in zip(patch, initial)]


def mirror_view(a: np.ndarray, mirror: Sequence[bool]) -> np.ndarray:
    """A flipped view of the last three axes (numpy copies honour negative strides)."""
    sl = tuple(slice(None, None, -1) if f else slice(None) for f in mirror)
    return a[(Ellipsis, *sl)]


def raw_from_initial_patches(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], params: Sequence[dict],
                             norms: Sequence[np.ndarray], patch: Sequence[int], initial: Sequence[int],
                             noise_keys: Sequence[int | None] | None = None) -> dict:
    """A raw micro-batch from whole initial patches in memory (tests, benchmarks).

    ``images[i]`` int16 [C, *initial], ``labels[i]`` [*initial]; the readers produce the same layout
    while reading only the voxels each sample needs.
    """
    m = len(images)
    noise = list(noise_keys) if noise_keys is not None else [None] * m
    channels = images[0].shape[0]
    placed = [spatial_box_and_affine(p, patch, initial) for p in params if p["spatial"]]
    boxes = [(lo, hi) for lo, hi, _ in placed]
    raw = allocate_raw([bool(p["spatial"]) for p in params], [n is not None for n in noise], channels, patch,
                       boxes, torch.from_numpy(np.asarray(labels[0][:0])).dtype,
                       torch.from_numpy(np.asarray(images[0][:0])).dtype)
    off = crop_offset(patch, initial)
    crop = tuple(slice(o, o + p) for o, p in zip(off, patch))
    ic = js = jn = 0
    for b in range(m):
        raw["norm"][b] = np.asarray(norms[b], np.float32)
        if params[b]["spatial"]:
            box = tuple(slice(lo, hi) for lo, hi in zip(*boxes[js]))
            raw["spatial_image"][js].numpy()[...] = images[b][(slice(None), *box)]
            raw["spatial_label"][js][0].numpy()[...] = labels[b][box]
            set_spatial_affine(raw, js, params[b], patch, initial, placed[js][2])
            js += 1
        else:
            mir = params[b]["mirror"]
            raw["crop_image"][ic].numpy()[...] = mirror_view(images[b][(slice(None), *crop)], mir)
            raw["crop_label"][ic, 0].numpy()[...] = mirror_view(labels[b][crop], mir)
            ic += 1
        if noise[b] is not None:
            raw["noise_key"][jn] = int(noise[b])
            jn += 1
    raw["params"] = stack_params(list(params))
    return raw


# --------------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------------


def normalize_into(out: torch.Tensor, raw: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """out[c] = clamp(raw[c], lo, hi) * scale + shift per channel; ``norm`` [C, 4] on the host.

    The int16 -> float32 cast happens in the copy; the clamp is skipped for the per-image z-score,
    which has infinite bounds. Values are host floats, so nothing waits for the device.
    """
    for c in range(raw.shape[0]):
        lo, hi, scale, shift = (float(v) for v in norm[c])
        dst = out[c].copy_(raw[c])
        if math.isfinite(lo) or math.isfinite(hi):
            dst.clamp_(lo, hi)
        dst.mul_(scale).add_(shift)
    return out


def _planes(affine: torch.Tensor, patch: Sequence[int], normalized: bool, reverse: bool,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinates [n, 3, *patch] of an affine map of the output grid, from three broadcast terms.

    ``affine`` [n, 3, 4] maps output coordinates (tensor axis order) to input coordinates. With
    ``normalized`` the output coordinates are grid_sample's [-1, 1], else voxel indices. ``reverse``
    stores the rows in grid_sample's (x, y, z) = (axis 2, 1, 0) order. Writing whole planes and
    permuting afterwards is ~25x faster on a CPU than filling an interleaved [..., 3] grid.
    """
    n, dev = affine.shape[0], affine.device
    if normalized:
        lin = [torch.linspace(-1, 1, p, device=dev, dtype=torch.float32) for p in patch]
    else:
        lin = [torch.arange(p, device=dev, dtype=torch.float32) for p in patch]
    if out is None:
        out = torch.empty((n, 3, *patch), device=dev, dtype=torch.float32)
    for i in range(n):
        for k in range(3):
            t = affine[i, 2 - k if reverse else k]
            part = (t[0] * lin[0] + t[3]).view(-1, 1, 1) + (t[1] * lin[1]).view(1, -1, 1)
            torch.add(part, (t[2] * lin[2]).view(1, 1, -1), out=out[i, k])
    return out


def _nearest_labels_into(out: torch.Tensor, label: torch.Tensor, voxel: torch.Tensor, inside: bool) -> None:
    """Nearest-neighbour label sampling as one gather, written into ``out`` [1, *P] (int64).

    ``label`` [1, *box] (integer), ``voxel`` [3, *P] box coordinates + 0.5, so that truncating to
    int32 rounds (coordinates are >= 0 wherever they are used; float->int32 is ~10x faster than
    round() or float->int64 on a CPU). Same result as ``grid_sample(mode='nearest')`` on a float
    copy of the labels (up to exact .5 ties), at a third of the cost. Coordinates outside the box
    (= outside the initial patch) read background; the bounds test is skipped when the grid is
    known (on the host) to stay inside.
    """
    size = label.shape[1:]
    mask = None
    if not inside:
        for a in range(3):
            ok = (voxel[a] >= 0) & (voxel[a] < size[a])
            mask = ok if mask is None else mask.logical_and_(ok)
        for a in range(3):
            voxel[a].clamp_(0, size[a] - 1)  # in place: the planes are this call's scratch
    r = voxel.to(torch.int32)
    idx = r[0].mul_(size[1] * size[2]).add_(r[1], alpha=size[2]).add_(r[2])
    v = label.reshape(-1).index_select(0, idx.reshape(-1)).view(out.shape)
    out.copy_(v)
    if mask is not None:
        out.mul_(mask.view(out.shape))


def _linear_labels(label: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """nnU-Net's default: interpolate each label's indicator, keep the largest score (ties: lower label)."""
    labels = torch.unique(label).tolist()
    if 0 not in labels:
        labels = [0] + labels  # the zero padding outside the initial patch is background
    best = None
    result = torch.zeros((label.shape[0], 1, *grid.shape[1:4]), dtype=torch.long, device=label.device)
    for u in labels:
        ind = (label == u).float()
        if u == 0:
            # outside the initial patch is background: sample (indicator - 1) with zero padding, add 1 back
            score = F.grid_sample(ind - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + 1
        else:
            score = F.grid_sample(ind, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        if best is None:
            best = score
            result.fill_(u)
            continue
        better = score > best
        result[better] = u
        torch.maximum(best, score, out=best)
    return result


def gauss_kernel(sigma: float) -> list[float]:
    """batchgeneratorsv2's blur kernel: truncate at 6 sigma, nearest odd size, normalised sampled pdf."""
    n = sigma * 6 + 0.5
    r = round(n)
    size = r if r % 2 == 1 else (r + 1 if n - r >= 0 else r - 1)
    half = (size - 1) * 0.5
    x = np.linspace(-half, half, size, dtype=np.float32)
    pdf = np.exp(-0.5 * (x / np.float32(sigma)) ** 2)
    return (pdf / pdf.sum()).tolist()


def _blur_(x: torch.Tensor, sigmas: Sequence[float]) -> None:
    """Separable Gaussian blur of one 3D volume in place with reflect padding (batchgeneratorsv2).

    A tap-by-tap sum of shifted views: ~10x faster than conv3d with a [k,1,1] kernel on a CPU.
    """
    for d, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        taps = gauss_kernel(float(sigma))
        r = len(taps) // 2
        pad = [0] * 6
        pad[2 * (2 - d)] = pad[2 * (2 - d) + 1] = r
        padded = F.pad(x[None, None], pad, mode="reflect")[0, 0]
        n = x.shape[d]
        acc = torch.mul(padded.narrow(d, 0, n), taps[0])
        for t in range(1, len(taps)):
            acc.add_(padded.narrow(d, t, n), alpha=taps[t])
        x.copy_(acc)


def _lowres_(x: torch.Tensor, zoom: float) -> None:
    shape = list(x.shape)
    small = [round(s * zoom) for s in shape]
    down = F.interpolate(x[None, None], small, mode="nearest-exact")
    x.copy_(F.interpolate(down, shape, mode="trilinear")[0, 0])


def _contrast_(x: torch.Tensor, factor: float) -> None:
    mean = x.mean()
    lo, hi = torch.aminmax(x)
    x.sub_(mean).mul_(factor).add_(mean).clamp_(lo, hi)


def _gamma_(x: torch.Tensor, gamma: float, invert: bool) -> None:
    # batchgeneratorsv2 GammaTransform with retain_stats (p_retain_stats=1 in nnU-Net).
    eps = 1e-7
    if invert:
        x.mul_(-1)
    mean, std = x.mean(), x.std()
    lo, hi = torch.aminmax(x)
    rng = hi - lo
    x.sub_(lo).div_(torch.clamp(rng, min=eps)).pow_(gamma).mul_(rng).add_(lo)
    x.sub_(x.mean()).mul_(std / torch.clamp(x.std(), min=eps)).add_(mean)
    if invert:
        x.mul_(-1)


# Gaussian noise is generated where the batch is augmented, from a 32-bit key the sample plan
# draws per sample (``SamplePlan.noise_key``) and the voxel index: no 8 MB float field per noisy
# sample crosses the worker boundary or the PCIe bus. Integer hashing in int64 is exact on every
# device, so CPU and GPU draw the same uniforms; Box-Muller then agrees to float rounding.
_HASH_MUL = 0x45D9F3B  # Thomas Mueller's xorshift-multiply hash; < 2^27, so x * it < 2^59 is exact
_M32 = 0xFFFFFFFF
_NOISE_CHUNK = 1 << 19  # voxel pairs per step: ~4 MB int64 scratch, reused (fresh pages cost more than the math)
_ANGLE_COUNTERS = 1 << 31  # the angle uniforms' counters start here (a field has < 2^31 voxels)
_noise_cache: dict = {}


def _hash32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """In place: x <- hash(x) for int64 x in [0, 2^32) (two xorshift-multiply rounds, final xorshift)."""
    for _ in range(2):
        torch.bitwise_right_shift(x, 16, out=tmp)
        x.bitwise_xor_(tmp).mul_(_HASH_MUL).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    return x.bitwise_xor_(tmp)


def _noise_scratch(dev: torch.device, pairs: int) -> dict:
    """Per-device work buffers, and hash(counter) for the radius and angle counters of ``pairs``
    voxel pairs (the key-independent half of every uniform, computed once per device)."""
    key = (dev.type, dev.index)
    s = _noise_cache.get(key)
    if s is None:
        n = _NOISE_CHUNK
        s = {name: torch.empty(n, dtype=dtype, device=dev) for name, dtype in
             (("tmp", torch.int64), ("x", torch.int64), ("u1", torch.float32), ("u2", torch.float32), ("t", torch.float32))}
        s["pairs"] = 0
        _noise_cache[key] = s
    if s["pairs"] < pairs:
        tables = []
        for start in (0, _ANGLE_COUNTERS):
            c = torch.arange(start, start + pairs, dtype=torch.int64, device=dev)
            tables.append(_hash32_(c, torch.empty_like(c)))
        s["radius"], s["angle"], s["pairs"] = tables[0], tables[1], pairs
    return s


def _uniform_(out: torch.Tensor, hashed_counters: torch.Tensor, key: int, s: dict) -> torch.Tensor:
    """out[i] = U(key, counter i) in (0, 1), float32 with 24 random bits, from hash(counter).

    U = hash(hash(counter) ^ key): the inner hash spreads consecutive counters over 32 bits, so
    the key does not merely permute one shared sequence; the outer one mixes the key in.
    """
    n = out.numel()
    x, tmp = s["x"][:n], s["tmp"][:n]
    torch.bitwise_xor(hashed_counters, key, out=x)
    _hash32_(x, tmp)
    torch.bitwise_right_shift(x, 8, out=tmp)
    return out.copy_(tmp).add_(0.5).mul_(2.0 ** -24)


def add_gaussian_noise_(x: torch.Tensor, key: int, std: float) -> torch.Tensor:
    """x += std * N(0, 1) iid per voxel, the field a pure function of (key, voxel index).

    Box-Muller on counter-based uniforms: voxel pair (i, i + h) of the flattened tensor (h = half
    its size, rounded up) takes r cos(t) and r sin(t), with r from the uniform of counter i and t
    from that of counter 2^31 + i. Works on any device; CPU and CUDA agree to float rounding (the
    integers are exact). Two noisy samples share a field only if their 32-bit keys collide.
    """
    flat = x.view(-1)
    n = flat.numel()
    h = (n + 1) // 2
    key = int(key) & _M32
    s = _noise_scratch(flat.device, h)
    for a in range(0, h, _NOISE_CHUNK):
        k = min(_NOISE_CHUNK, h - a)
        u1, u2, t = s["u1"][:k], s["u2"][:k], s["t"][:k]
        _uniform_(u1, s["radius"][a:a + k], key, s)  # radius: counters [0, h)
        _uniform_(u2, s["angle"][a:a + k], key, s)  # angle: counters [2^31, 2^31 + h)
        r = u1.log_().mul_(-2.0).sqrt_().mul_(std)
        u2.mul_(2 * math.pi)
        torch.cos(u2, out=t)
        flat[a:a + k].addcmul_(r, t)
        m = min(k, n - h - a)  # the second half is one shorter when n is odd
        if m > 0:
            torch.sin(u2[:m], out=t[:m])
            flat[h + a:h + a + m].addcmul_(r[:m], t[:m])
    return x


def gaussian_noise(key: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The unit noise field ``add_gaussian_noise_`` adds for ``key`` (tests, inspection)."""
    return add_gaussian_noise_(torch.zeros(tuple(shape), dtype=torch.float32, device=device), key, 1.0)


# Host scratch buffers, reused across calls: a fresh multi-MB tensor per sample costs page faults
# (~1 ms per MB on a VM) that rival the arithmetic. Outputs never alias them.
_scratch_storage: dict[str, torch.Tensor] = {}


def _scratch(name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = int(np.prod(shape))
    buf = _scratch_storage.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = _scratch_storage[name] = torch.empty(n, dtype=dtype)
    return buf[:n].view(tuple(int(s) for s in shape))


def _spatial_sample_cpu(image: torch.Tensor, label: torch.Tensor, box_image: torch.Tensor, box_label: torch.Tensor,
                        affine: np.ndarray, box: np.ndarray, norm, patch: Sequence[int],
                        label_interpolation: str) -> None:
    """One rotated/scaled sample on the CPU, sampled from its box alone (the batched device path
    pastes boxes into the initial patch to make one grid_sample call; a CPU gains nothing from
    batching and saves a 34 MB buffer and its copy).

    Same result as the initial-patch frame up to float rounding: a grid point outside the box is
    outside the initial patch (the box is the grid's footprint plus a margin, clipped to the
    initial patch), so zero padding around the box is zero padding around the initial patch.
    """
    lo, hi = (np.asarray(a, np.int64) for a in box)
    size = [int(v) for v in hi - lo]
    channels = box_image.shape[0]
    mat, v = affine[:, :3], affine[:, 3] - lo
    x = _scratch("box", (channels, *size))
    normalize_into(x, box_image, norm)
    planes = _scratch("planes", (1, 3, *patch))
    theta = normalized_theta(mat, v, patch, size)  # the box is >= 2 voxels wide: it holds the centre +-1
    grid = _planes(torch.from_numpy(theta.astype(np.float32))[None], patch, normalized=True, reverse=True,
                   out=planes).permute(0, 2, 3, 4, 1)
    out = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    image.copy_(out[0])
    if label_interpolation == "nearest":
        pts = corner_points(patch) @ mat.T + v
        inside = bool(pts.min() >= 0.01 and np.all(pts.max(0) <= np.asarray(size) - 1.01))
        vox = np.concatenate([mat, (v + 0.5)[:, None]], 1).astype(np.float32)  # +0.5: truncation rounds
        vox = _planes(torch.from_numpy(vox)[None], patch, normalized=False, reverse=False, out=planes)
        _nearest_labels_into(label, box_label, vox[0], inside)
    else:
        lab = _linear_labels(box_label[None].long(), grid)
        label.copy_(lab[0])


def _host_to(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A small host array on ``dev``. Via pinned memory on a GPU: a copy from pageable memory would
    first wait for everything queued on the stream (the previous step's backward, say)."""
    t = torch.from_numpy(a)
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def augment_batch(
    raw: dict,
    *,
    patch: Sequence[int],
    initial: Sequence[int],
    ds_strides: Sequence[Sequence[int]],
    label_interpolation: str = "nearest",
    device: torch.device | str | None = None,
    label_dtype: torch.dtype = torch.int64,
    batched_spatial: bool | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A raw micro-batch (``allocate_raw`` layout) -> (image [m, C, *P] float32, targets).

    Tensors are moved to ``device`` (default: where they are); parameters are read on the host, so
    nothing is ever read back from the device. ``targets`` holds one label map [m, 1, *P / stride]
    per deep-supervision output, full resolution first, in ``label_dtype`` (int64 for the loss;
    workers use the stored uint8/int16 so that 8x fewer bytes travel to the main process).

    ``batched_spatial``: rotated/scaled samples through one ``grid_sample`` in the initial-patch
    frame (the GPU path; default off the CPU) or one by one in their box frame (default on the
    CPU). The two agree to float rounding; tests run both on the CPU.
    """
    dev = torch.device(device) if device is not None else raw["crop_image"].device
    norm = host_array(raw["norm"])
    params = {k: host_array(v) for k, v in raw["params"].items()}
    m, channels = norm.shape[0], norm.shape[1]
    if dev.type == "cpu":  # in a DataLoader worker: born in shared memory, handed over without a copy
        image = new_tensor((m, channels, *patch), torch.float32)
        label = new_tensor((m, 1, *patch), label_dtype)
    else:
        image = torch.empty((m, channels, *patch), dtype=torch.float32, device=dev)
        label = torch.empty((m, 1, *patch), dtype=label_dtype, device=dev)

    crop_pos = host_array(raw["crop_pos"]).tolist()
    if crop_pos:
        crop_image = raw["crop_image"].to(dev, non_blocking=True)
        crop_label = raw["crop_label"].to(dev, non_blocking=True)
        for j, b in enumerate(crop_pos):
            normalize_into(image[b], crop_image[j], norm[b])
            label[b].copy_(crop_label[j])

    spatial_pos = host_array(raw["spatial_pos"]).tolist()
    if batched_spatial is None:
        batched_spatial = dev.type != "cpu"
    if spatial_pos and not batched_spatial:
        boxes = host_array(raw["spatial_box"])
        affine = host_array(raw["spatial_affine"])
        for j, b in enumerate(spatial_pos):
            _spatial_sample_cpu(image[b], label[b], raw["spatial_image"][j], raw["spatial_label"][j], affine[j],
                                boxes[j], norm[b], patch, label_interpolation)
    elif spatial_pos:
        # Every rotated/scaled sample's box goes into its place in the initial patch, then one
        # grid_sample for all of them; outside the initial patch it reads zeros (the normalised
        # mean, nnU-Net's border value). The frame is the initial patch, not a batch-dependent
        # one, so a sample comes out bitwise the same in any micro-batch (world size, accumulation).
        boxes = host_array(raw["spatial_box"])
        affine = host_array(raw["spatial_affine"])
        # Outside its box no voxel of a sample is ever read (the box holds every trilinear
        # neighbour of every grid point inside the initial patch; points outside read the zero
        # padding), so the rest of the buffer need not be initialised.
        x = torch.empty((len(spatial_pos), channels, *initial), dtype=torch.float32, device=dev)
        thetas, voxels, inside = [], [], []
        corners = corner_points(patch)
        for j, b in enumerate(spatial_pos):
            lo, hi = boxes[j]
            sl = tuple(slice(int(a), int(c)) for a, c in zip(lo, hi))
            normalize_into(x[j][(slice(None), *sl)], raw["spatial_image"][j].to(dev, non_blocking=True), norm[b])
            mat, v = affine[j, :, :3], affine[j, :, 3]
            thetas.append(normalized_theta(mat, v, patch, initial))
            voxels.append(np.concatenate([mat, (v - lo + 0.5)[:, None]], 1))  # +0.5: truncation rounds
            pts = corners @ mat.T + v - lo
            # nearest rounding stays in the box when every corner does, with a margin for float error
            inside.append(bool(pts.min() >= 0.01 and np.all(pts.max(0) <= (hi - lo) - 1.01)))
        theta = _host_to(np.stack(thetas).astype(np.float32), dev)
        grid = _planes(theta, patch, normalized=True, reverse=True).permute(0, 2, 3, 4, 1)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        del x
        if label_interpolation == "nearest":
            vox = _planes(_host_to(np.stack(voxels).astype(np.float32), dev), patch, normalized=False,
                          reverse=False)
            for j, b in enumerate(spatial_pos):
                _nearest_labels_into(label[b], raw["spatial_label"][j].to(dev, non_blocking=True), vox[j], inside[j])
            lab = None
        else:
            lab_s = torch.zeros((len(spatial_pos), 1, *initial), dtype=torch.long, device=dev)
            for j in range(len(spatial_pos)):
                sl = tuple(slice(int(a), int(c)) for a, c in zip(*boxes[j]))
                lab_s[j][(slice(None), *sl)] = raw["spatial_label"][j].to(dev, non_blocking=True)
            lab = _linear_labels(lab_s, grid)
        for j, b in enumerate(spatial_pos):
            image[b].copy_(out[j])
            if lab is not None:
                label[b].copy_(lab[j])

    keys = host_array(raw["noise_key"]).tolist()
    for b, key in zip(host_array(raw["noise_pos"]).tolist(), keys):
        add_gaussian_noise_(image[b], key, float(params["noise_std"][b]))

    # Intensity transforms in nnU-Net's order, only on the (sample, channel) pairs they fire for.
    for b in range(m):
        for c in range(channels):
            x = image[b, c]
            sigma = params["blur_sigma"][b, c]
            if float(sigma.max()) > 0:
                _blur_(x, sigma.tolist())
            f = float(params["brightness"][b, c])
            if f > 0:
                x.mul_(f)
            f = float(params["contrast"][b, c])
            if f > 0:
                _contrast_(x, f)
            z = float(params["lowres"][b, c])
            if z > 0:
                _lowres_(x, z)
            g = float(params["gamma_inverted"][b, c])
            if g > 0:
                _gamma_(x, g, invert=True)
            g = float(params["gamma"][b, c])
            if g > 0:
                _gamma_(x, g, invert=False)

    targets = [downsample_target(label, s) for s in ds_strides]
    return image, targets
