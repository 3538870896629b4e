"""The raw micro-batch: what a reader fills and a DataLoader worker hands over (small integer
tensors, per-sample placement and the intensity parameters), before any transform runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .patch_geometry import crop_offset, mirror_view, spatial_box_and_affine, voxel_affine

# Per-sample fields that travel with a micro-batch to wherever it is augmented.
INTENSITY_FIELDS = ("noise_std", "blur_sigma", "brightness", "contrast", "lowres", "gamma_inverted", "gamma")


def stack_params(params: list[dict]) -> dict[str, np.ndarray]:
    """The intensity parameters of a micro-batch as float32 host arrays [m, ...]."""
    return {k: np.stack([np.asarray(p[k], np.float32) for p in params]) for k in INTENSITY_FIELDS}


# --------------------------------------------------------------------------------------------
# The raw micro-batch: what a DataLoader worker hands over (small integer tensors + parameters)
# --------------------------------------------------------------------------------------------


def new_tensor(shape: Sequence[int], dtype: torch.dtype, shared: bool | None = None) -> torch.Tensor:
    """An empty host tensor; inside a DataLoader worker it is born in shared memory, so handing the
    batch to the main process copies nothing (what ``default_collate`` does for its outputs).
    ``shared=False``: a private tensor (a worker that augments the raw batch itself never sends it);
    ``shared=True``: shared memory outside a worker too (benchmarks that act as a worker)."""
    shape = tuple(int(s) for s in shape)
    if shared is None:
        shared = torch.utils.data.get_worker_info() is not None
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


