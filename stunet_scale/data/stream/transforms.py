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
brightness/contrast from U(0.75, 1.25) (nnU-Net 1.7's ``data_augmentation_moreDA.py`` with batchgenerators'
``spatial_transformations.py``). So this is
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
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...config import StreamConfig
from .counter_noise import add_gaussian_noise_
from .patch_geometry import (
    corner_points,
    deep_supervision_strides,
    downsample_target,
    initial_patch_size,
    normalized_theta,
)
from .raw_batch import host_array, new_tensor

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
    out_shared: bool | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A raw micro-batch (``allocate_raw`` layout) -> (image [m, C, *P] float32, targets).

    Tensors are moved to ``device`` (default: where they are); parameters are read on the host, so
    nothing is ever read back from the device. ``targets`` holds one label map [m, 1, *P / stride]
    per deep-supervision output, full resolution first, in ``label_dtype`` (int64 for the loss;
    workers use the stored uint8/int16 so that 8x fewer bytes travel to the main process).

    ``batched_spatial``: rotated/scaled samples through one ``grid_sample`` in the initial-patch
    frame (the GPU path; default off the CPU) or one by one in their box frame (default on the
    CPU). The two agree to float rounding; tests run both on the CPU.

    ``out_shared``: on the CPU, allocate the outputs in shared memory (None: only inside a
    DataLoader worker, so handing them to the main process copies nothing).
    """
    dev = torch.device(device) if device is not None else raw["crop_image"].device
    norm = host_array(raw["norm"])
    params = {k: host_array(v) for k, v in raw["params"].items()}
    m, channels = norm.shape[0], norm.shape[1]
    if dev.type == "cpu":  # in a DataLoader worker: born in shared memory, handed over without a copy
        image = new_tensor((m, channels, *patch), torch.float32, out_shared)
        label = new_tensor((m, 1, *patch), label_dtype, out_shared)
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


# --------------------------------------------------------------------------------------------
# The step after the reader: raw micro-batch -> the trainer's dict
# --------------------------------------------------------------------------------------------


class Geometry:
    """Patch sizes, deep-supervision strides and label interpolation: what ``finish`` needs, derived once."""

    def __init__(self, cfg: StreamConfig):
        a = cfg.augmentation
        self.patch = [int(p) for p in cfg.data.patch_size]
        spatial = a.enabled and (a.rotation_p > 0 or a.scaling_p > 0)
        self.initial = initial_patch_size(self.patch, a.rotation_max_deg, rotation_enabled=a.rotation_p > 0) \
            if spatial else list(self.patch)
        # the initial patch never shrinks below the final one and keeps the centre voxel aligned
        self.initial = [max(i, p) for i, p in zip(self.initial, self.patch)]
        self.ds_strides = deep_supervision_strides(cfg.pool_strides, cfg.deep_supervision)
        self.label_interpolation = a.label_interpolation
        # augment_batch's batched_spatial: None picks by device (one batched grid_sample off the
        # CPU, per-sample boxes on it); True/False forces a path (tests run the GPU path on a CPU)
        self.batched_spatial: bool | None = None


def finish(raw: dict, geometry: Geometry, device: torch.device, in_worker: bool = False) -> dict:
    """Raw micro-batch -> the trainer's dict, augmented on ``device``.

    ``in_worker``: labels stay in their stored dtype (uint8/int16) for the trip to the main
    process, which widens them to int64 on the device (``TrainStream._to_device``).
    """
    dtype = raw["crop_label"].dtype if in_worker else torch.int64
    image, targets = augment_batch(raw, patch=geometry.patch, initial=geometry.initial, ds_strides=geometry.ds_strides,
                                   label_interpolation=geometry.label_interpolation, device=device, label_dtype=dtype,
                                   batched_spatial=geometry.batched_spatial)
    index = raw["sample_index"]  # numpy: a worker sends it pickled, not in its own shared segment
    annotated = raw.get("annotated")  # numpy bool [m, C] or None (a reader that does not know)
    if not in_worker:
        index = torch.as_tensor(index, dtype=torch.int64).to(device, non_blocking=True)
        if annotated is not None:
            annotated = torch.as_tensor(annotated, dtype=torch.bool)  # stays on the host (see above)
    out = {"image": image, "targets": targets, "sample_index": index}
    if annotated is not None:
        out["annotated"] = annotated
    return out
