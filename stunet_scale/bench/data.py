"""`stunet-scale bench data PREPARED_DIR`: patches/s per CPU core, ours vs nnU-Net v2, in one run.

On the same planned 128^3 samples of the same prepared cases it measures:

(a) ``cpu_side``: what stays on a CPU core when augmentation runs on the GPU: the plan, reading
    the needed chunks (crop, or the box of the 205^3 initial patch a rotated/scaled sample touches),
    padding, and handing the raw batch over in shared memory: views of one of the worker's
    recycled slabs (``data/stream/shared_slabs.py``), measured in the steady state where the main process
    releases each slab after augmenting it, as ``TrainStream`` does. The Gaussian noise field is
    generated where the batch is augmented (here: on the GPU), so it is not part of (a). Nor is
    the main process's CPU work per batch on a GPU host: unpickling the batch's small fields, the
    DataLoader's pinned-memory copy and the host side of ``augment_batch``; (a) ends at the hand-over;
(b) ``cpu_full_aug``: what a worker does with ``augmentation.device=cpu``: the same reads into
    private memory, our whole augmentation on the CPU (noise field included), and the finished
    batch born in fresh shared memory for the hand-over;
(c) ``nnunet``: nnU-Net v2's own ``nnUNetTrainer.get_training_transforms`` (STU-Net settings:
    128^3, rotation +-30 deg, scaling (0.7, 1.4), mirroring, deep supervision, every class of the
    store as foreground) applied to the same samples' 205^3 initial patches; its reading is not
    counted, so the comparison favours nnU-Net.

Everything runs in this process on one thread (``torch.set_num_threads(1)``, single-threaded
blosc, ``threadpool_limits(1)`` for nnU-Net, as its own loader does), so "per core" is literal.
With a CUDA GPU it also reports the augmentation time of a 2 x 128^3 micro-batch on the GPU
(host-to-device copy from pinned memory and noise generation included).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig, StreamConfig, TrainConfig
from ..data.store import STORE_CHANNELS, open_store
from ..data.stream.plan import SamplePlan, resolve_origin
from ..data.stream.readers import ZarrPatchReader, image_format, plan_cases, read_box
from ..data.stream.shared_slabs import SlabPool
from ..data.stream.transforms import Geometry, augment_batch


def _config(store, patch: int) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data = DataConfig(root=str(store.root), patch_size=[patch] * 3, class_map=store.class_map_name,
                          spacing=list(store.target_spacing))
    cfg.model.num_classes = store.num_classes
    return cfg


def _share(raw) -> None:
    # what a DataLoader worker does to every tensor it sends: move the storage to shared memory
    for v in raw.values() if isinstance(raw, dict) else raw:
        if isinstance(v, torch.Tensor):
            v.share_memory_()
        elif isinstance(v, (dict, list, tuple)):
            _share(v)


def _nnunet_transforms(patch: int, geometry: Geometry, num_classes: int, mirror_axes):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    rot = (-30.0 / 360 * 2 * math.pi, 30.0 / 360 * 2 * math.pi)
    ds_scales = [[1.0 / s for s in stride] for stride in geometry.ds_strides]
    return nnUNetTrainer.get_training_transforms(
        (patch,) * 3, rot, ds_scales, tuple(mirror_axes), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=list(range(1, num_classes)), regions=None, ignore_label=None)


def _stratified(times: list[float], spatial: list[bool], p_spatial: float) -> float | None:
    """Expected seconds per patch: p * mean(rotated/scaled) + (1 - p) * mean(plain crop).

    With a few dozen samples the share of rotated/scaled ones (the expensive stratum, p = 0.36)
    varies a lot by chance; weighting the two strata by their true probability removes that noise
    from both our numbers and nnU-Net's, which decides its own rotations.
    """
    a = [t for t, sp in zip(times, spatial) if sp]
    b = [t for t, sp in zip(times, spatial) if not sp]
    if not a or not b:
        return statistics.mean(times) if times else None
    return p_spatial * statistics.mean(a) + (1 - p_spatial) * statistics.mean(b)


def run_data_bench(prepared_dir: str | Path, *, patches: int = 40, nnunet_patches: int = 12, patch: int = 128,
                   seed: int = 0, warmup: int = 2) -> dict:
    from numcodecs import blosc


    torch.set_num_threads(1)
    blosc.use_threads = False
    store = open_store(prepared_dir)
    cfg = _config(store, patch)
    cfg.seed = seed
    a = cfg.augmentation
    p_spatial = 1 - (1 - a.rotation_p) * (1 - a.scaling_p)
    geometry = Geometry(StreamConfig.of(cfg))
    splits = ["train"] if store.case_ids(["train"]) else sorted({store.meta(c)["split"] for c in store.case_ids()})
    cases = plan_cases(store, splits)
    plan = SamplePlan(cases, seed=seed, global_batch=2, patch=geometry.patch, initial=geometry.initial,
                      aug_cfg=cfg.augmentation, channels=STORE_CHANNELS)
    reader = ZarrPatchReader(store, plan, normalization_mode=cfg.data.normalization, channels=STORE_CHANNELS)
    image_dtype, pad = image_format(store)

    # (a) CPU side with GPU augmentation: the raw batch is carved from a worker's recycled
    # shared-memory slab (the main process releases it after augmenting, as TrainStream does);
    # (b) augmentation in the worker: the raw batch stays private, the augmented one is born in
    # fresh shared memory and handed over
    pool = SlabPool(1, 2)
    pool.worker = 0  # act as DataLoader worker 0
    read_t, full_t, spatial = [], [], []  # (b)'s outputs are born in shared memory (out_shared), as in a worker
    for i in range(warmup + patches):
        t0 = time.perf_counter()
        raw = reader.read_micro_batch([i], shared=pool)
        _share(raw)  # what the worker's pickler does: a no-op for tensors already in shared memory
        t1 = time.perf_counter()
        own = reader.read_micro_batch([i], shared=False)
        out = augment_batch(own, patch=geometry.patch, initial=geometry.initial, ds_strides=geometry.ds_strides,
                            label_interpolation=geometry.label_interpolation, device="cpu",
                            label_dtype=own["crop_label"].dtype, out_shared=True)
        _share({"image": out[0], "targets": out[1]})
        t2 = time.perf_counter()
        pool.release(raw["slab"])
        if i >= warmup:
            read_t.append(t1 - t0)
            full_t.append(t2 - t1)
            spatial.append(bool(plan.sample(i).spatial))
        del raw, own, out
    cpu_side = 1 / _stratified(read_t, spatial, p_spatial)
    cpu_full = 1 / _stratified(full_t, spatial, p_spatial)

    # (c) nnU-Net v2's transforms on the same samples' initial patches
    nnunet, nnunet_error, nn_times, nn_spatial, labels_per_patch = None, None, [], [], []
    try:
        from threadpoolctl import threadpool_limits

        transforms = _nnunet_transforms(patch, geometry, store.num_classes, cfg.augmentation.mirror_axes)
        spatial_tf = transforms.transforms[0]
        original = spatial_tf.get_parameters

        def recording(**data):  # note whether nnU-Net rotated/scaled this sample (behaviour unchanged)
            params = original(**data)
            nn_spatial.append(params["grid"] is not None)
            return params

        spatial_tf.get_parameters = recording
        np.random.seed(seed)
        torch.manual_seed(seed)
        i = warmup
        # at least ``nnunet_patches``, and until both strata have two samples (capped)
        while len(nn_times) < nnunet_patches or (min(sum(nn_spatial), len(nn_spatial) - sum(nn_spatial)) < 2
                                                  and len(nn_times) < 3 * nnunet_patches):
            spec = plan.sample(i)
            i += 1
            h = reader.case(spec.case_id)
            fg = h.fg_voxel(spec.fg_row) if spec.fg_row >= 0 else None
            origin = resolve_origin(spec, h.shape, geometry.initial, geometry.patch, fg)
            hi = [o + s for o, s in zip(origin, geometry.initial)]
            img = np.empty(geometry.initial, np.float32 if image_dtype == torch.float32 else np.int16)
            lab = np.empty(geometry.initial, np.int16)
            read_box(h.image, origin, hi, img, pad, h.shape)
            read_box(h.label, origin, hi, lab, 0, h.shape)
            _, _, scale, shift = (float(v) for v in h.norm[0])
            image = torch.from_numpy(img.astype(np.float32) * np.float32(scale) + np.float32(shift))[None]
            seg = torch.from_numpy(lab)[None]
            labels_per_patch.append(len(np.unique(lab)) - 1)
            with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
                t0 = time.perf_counter()
                transforms(image=image, segmentation=seg)
                nn_times.append(time.perf_counter() - t0)
        nnunet = 1 / _stratified(nn_times, nn_spatial, p_spatial)
    except ImportError as e:  # nnunetv2 is a dev dependency
        nnunet_error = f"nnunetv2 not importable ({e})"

    gpu_ms = None
    if torch.cuda.is_available():
        dev = torch.device("cuda")

        def pinned(r):
            return {k: (v.pin_memory() if isinstance(v, torch.Tensor) else
                        [t.pin_memory() for t in v] if isinstance(v, list) else v) for k, v in r.items()}

        # micro-batches of 2 with the plan's mix of rotated/scaled and plain samples
        batches = [pinned(reader.read_micro_batch([k, k + 1], shared=False))
                   for k in range(warmup, warmup + patches - 1, 2)]
        for b in batches[:2]:
            augment_batch(b, patch=geometry.patch, initial=geometry.initial, ds_strides=geometry.ds_strides, device=dev)
        torch.cuda.synchronize()
        times = []
        for b in batches:
            t0 = time.perf_counter()
            augment_batch(b, patch=geometry.patch, initial=geometry.initial, ds_strides=geometry.ds_strides, device=dev)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        gpu_ms = 1000 * statistics.mean(times)

    shapes = [tuple(store.meta(c.case_id)["shape"]) for c in cases]
    n_sp = sum(spatial)
    return {
        "prepared_dir": str(store.root),
        "patch": geometry.patch,
        "initial_patch": geometry.initial,
        "cases": len(cases),
        "median_case_shape": [int(np.median([s[d] for s in shapes])) for d in range(3)],
        "codec": store.manifest.get("storage", {}).get("codecs") or store.manifest.get("storage", {}).get("compressor"),
        "threads": 1,
        "rotated_or_scaled_probability": p_spatial,
        "patches_timed": len(read_t),
        "patches_timed_rotated_or_scaled": n_sp,
        "cpu_side_patches_per_s_per_core": cpu_side,
        "cpu_side_ms_per_patch": 1000 / cpu_side,
        "cpu_side_ms_plain_crop": 1000 * statistics.mean([t for t, s in zip(read_t, spatial) if not s] or [float("nan")]),
        "cpu_side_ms_rotated_or_scaled": 1000 * statistics.mean([t for t, s in zip(read_t, spatial) if s] or [float("nan")]),
        "cpu_full_aug_patches_per_s_per_core": cpu_full,
        "cpu_full_aug_ms_per_patch": 1000 / cpu_full,
        "nnunet_patches_per_s_per_core": nnunet,
        "nnunet_ms_per_patch": 1000 / nnunet if nnunet else None,
        "nnunet_patches_timed": len(nn_times),
        "nnunet_patches_timed_rotated_or_scaled": int(sum(nn_spatial)),
        "nnunet_error": nnunet_error,
        "labels_per_initial_patch_mean": float(np.mean(labels_per_patch)) if labels_per_patch else None,
        "gpu_aug_ms_per_batch": gpu_ms,
        "gpu_batch": 2,
        "cpu_side_vs_nnunet": cpu_side / nnunet if nnunet else None,
        "cpu_full_aug_vs_nnunet": cpu_full / nnunet if nnunet else None,
        "goals": {"cpu_side_patches_per_s_per_core": 50, "cpu_full_aug_vs_nnunet": 10, "gpu_aug_ms_per_batch": 15},
    }


def format_report(r: dict) -> str:
    def f(v, unit=""):
        return "n/a" if v is None else f"{v:.2f}{unit}"

    lines = [
        f"data pipeline benchmark on {r['prepared_dir']} ({r['cases']} cases, median shape {r['median_case_shape']})",
        f"patch {r['patch']} (initial {r['initial_patch']}); one thread; per patch = {r['rotated_or_scaled_probability']:.2f} x "
        f"rotated/scaled + {1 - r['rotated_or_scaled_probability']:.2f} x plain crop",
        f"ours: {r['patches_timed']} patches ({r['patches_timed_rotated_or_scaled']} rotated/scaled); CPU side "
        f"{r['cpu_side_ms_plain_crop']:.1f} ms plain, {r['cpu_side_ms_rotated_or_scaled']:.1f} ms rotated/scaled",
        "",
        f"{'':38s}{'patches/s/core':>16s}{'ms/patch':>11s}{'vs nnU-Net':>12s}",
        f"{'(a) ours, CPU side (GPU augmentation)':38s}{r['cpu_side_patches_per_s_per_core']:16.2f}"
        f"{r['cpu_side_ms_per_patch']:11.1f}{f(r['cpu_side_vs_nnunet'], 'x'):>12s}",
        f"{'(b) ours, read + augment on the CPU':38s}{r['cpu_full_aug_patches_per_s_per_core']:16.2f}"
        f"{r['cpu_full_aug_ms_per_patch']:11.1f}{f(r['cpu_full_aug_vs_nnunet'], 'x'):>12s}",
    ]
    if r["nnunet_patches_per_s_per_core"]:
        nn = r["nnunet_patches_per_s_per_core"]
        lines.append(f"{'(c) nnU-Net v2 transforms only':38s}{nn:16.2f}{1000 / nn:11.1f}{'1.00x':>12s}")
        lines.append(f"    nnU-Net: {r['nnunet_patches_timed']} patches ({r['nnunet_patches_timed_rotated_or_scaled']} "
                     f"rotated/scaled), {r['labels_per_initial_patch_mean']:.1f} labels per initial patch")
    else:
        lines.append(f"(c) nnU-Net v2: not measured: {r['nnunet_error']}")
    gpu = r["gpu_aug_ms_per_batch"]
    lines.append(f"GPU augmentation per batch of 2: {'no CUDA device' if gpu is None else f'{gpu:.1f} ms'}")
    g = r["goals"]
    lines.append(f"goals: (a) >= {g['cpu_side_patches_per_s_per_core']} patches/s/core; (b) >= "
                 f"{g['cpu_full_aug_vs_nnunet']}x nnU-Net; GPU <= {g['gpu_aug_ms_per_batch']} ms per batch")
    return "\n".join(lines)


def run_data_bench_cli(args) -> int:
    result = run_data_bench(args.prepared_dir, patches=args.patches, nnunet_patches=args.nnunet_patches,
                            patch=args.patch)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
