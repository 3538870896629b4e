"""`stunet-scale bench prepare SOURCE`: our preprocessing vs nnU-Net v2's own, on the same cases.

What is timed (wall clock, one process, one core each; both in this run, so the ratio is robust to
a busy machine even when absolute numbers are not):

* **ours, default**: ``prepare_dataset(..., format="zarr")``: read + validate the CT and every mask,
  merge, RAS, body crop, resample to 1.5 mm (cubic image, nearest labels), statistics, foreground
  locations, Zarr write, manifest. ``threads=1`` (no gunzip threads) for a one-core comparison.
* **ours, nnU-Net settings**: the same with nnU-Net's choices: per-label linear labels, nonzero crop.
* **nnU-Net v2** (the installed ``nnunetv2``): (1) TotalSegmentator -> nnU-Net raw conversion as
  TotalSegmentator's ``combine_labels`` does it (``get_fdata`` per mask, later class wins), because
  nnU-Net cannot read the per-class layout; (2) ``extract_fingerprints``, (3) ``plan_experiments``
  with ``overwrite_target_spacing`` = 1.5 mm, (4) ``preprocess`` of ``3d_fullres`` with one process,
  run through its Python API in a child process of this script (nnU-Net reads its folders from
  environment variables at import time, so it gets a fresh interpreter pointed at a temp dir).

Bytes per voxel = bytes on disk of the preprocessed arrays (+ per-case metadata: our fg_locations,
nnU-Net's .pkl with class locations) / stored voxels. Each side stores its own crop, so the total
bytes per case are reported too.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("stunet_scale.bench")

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_StunetScaleBench"


def _dir_bytes(path: Path, suffixes: tuple[str, ...] | None = None) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and (suffixes is None or p.name.endswith(suffixes)))


def _subset(source: Path, dst: Path, cases: int | None) -> list[str]:
    """Symlink the first ``cases`` case folders (and meta.csv) of a TotalSegmentator dataset."""
    ids = sorted(p.name for p in source.iterdir() if p.is_dir() and (p / "ct.nii.gz").exists())
    ids = ids[:cases] if cases else ids
    dst.mkdir(parents=True)
    for cid in ids:
        (dst / cid).symlink_to((source / cid).resolve(), target_is_directory=True)
    if (source / "meta.csv").exists():
        shutil.copy(source / "meta.csv", dst / "meta.csv")
    return ids


def _ours(src: Path, out: Path, **options) -> dict:
    from stunet_scale.data.prepare import prepare_dataset

    t0 = time.perf_counter()
    r = prepare_dataset(src, out, format="zarr", workers=1, threads=1, **options)
    secs = time.perf_counter() - t0
    m = json.loads((out / "manifest.json").read_text())
    steady = [json.loads((out / "parts" / "cases" / f"{c}.json").read_text())["seconds"] for c in m["cases"]]
    voxels = sum(int(np.prod(e["shape"])) for e in m["cases"].values())
    stored = _dir_bytes(out / "store.zarr")
    arrays = sum(_dir_bytes(out / "store.zarr" / c / a) for c in m["cases"] for a in ("image", "label"))
    return {
        "settings": {k: v for k, v in options.items()},
        "cases": r["ok"], "seconds_total": secs, "seconds_per_case": secs / max(1, r["ok"]),
        "steady_seconds_per_case": steady, "steady_mean_seconds_per_case": float(np.mean(steady)),
        "voxels": voxels, "bytes": stored, "bytes_per_voxel": stored / voxels,
        "bytes_per_voxel_image_label": arrays / voxels, "bytes_per_case": stored / max(1, r["ok"]),
    }


def convert_to_nnunet(src: Path, dst: Path, ids: list[str], class_map: str) -> float:
    """TotalSegmentator layout -> nnU-Net raw, the way TotalSegmentator's own converter does it
    (``resources/convert_dataset_to_nnunet.py``: ``get_fdata`` per mask, ``> 0.5``, later class
    wins, ``NibabelIOWithReorient``). Returns seconds."""
    import nibabel as nib

    from stunet_scale.data.class_maps import load_class_map

    cmap = load_class_map(class_map)
    t0 = time.perf_counter()
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    for cid in ids:
        ct = nib.load(src / cid / "ct.nii.gz")
        shutil.copy(src / cid / "ct.nii.gz", dst / "imagesTr" / f"{cid}_0000.nii.gz")
        combined = np.zeros(ct.shape, dtype=np.uint8)
        for k, name in enumerate(cmap.foreground, start=1):
            p = src / cid / "segmentations" / f"{name}.nii.gz"
            if p.exists():
                combined[nib.load(p).get_fdata() > 0.5] = k
        nib.save(nib.Nifti1Image(combined, ct.affine), dst / "labelsTr" / f"{cid}.nii.gz")
    (dst / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {n: i for i, n in enumerate(cmap.labels)},
        "numTraining": len(ids), "file_ending": ".nii.gz", "overwrite_image_reader_writer": "NibabelIOWithReorient",
    }, indent=1))
    return time.perf_counter() - t0


def _nnunet_child(out_json: str, spacing: float) -> None:
    """Runs in a fresh interpreter with nnUNet_raw/nnUNet_preprocessed set: fingerprint, plan, preprocess."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    times = {}
    t = time.perf_counter()
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=False, verbose=False)
    times["fingerprint_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    plan_experiments([DATASET_ID], overwrite_target_spacing=(spacing,) * 3)
    times["plan_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,))
    times["preprocess_seconds"] = time.perf_counter() - t
    # steady state: the per-case work of both steps, timed in this (warm) process, no pool start-up
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    pre_dir = join(nnUNet_preprocessed, DATASET_NAME)
    dataset_json = load_json(join(pre_dir, "dataset.json"))
    plans = PlansManager(join(pre_dir, "nnUNetPlans.json"))
    config = plans.get_configuration("3d_fullres")
    cases = get_filenames_of_train_images_and_targets(join(nnUNet_raw, DATASET_NAME), dataset_json)
    first = next(iter(cases.values()))
    rw = determine_reader_writer_from_dataset_json(dataset_json, first["images"][0])
    preprocessor = config.preprocessor_class(verbose=False)
    scratch = Path(out_json).parent / "nnunet_steady"
    scratch.mkdir(exist_ok=True)
    per_case = []
    for k, v in cases.items():
        t = time.perf_counter()
        DatasetFingerprintExtractor.analyze_case(v["images"], v["label"], rw)
        preprocessor.run_case_save(str(scratch / k), v["images"], v["label"], plans, config, dataset_json)
        per_case.append(time.perf_counter() - t)
    times["steady_seconds_per_case"] = per_case
    Path(out_json).write_text(json.dumps(times))


def _nnunet(raw_root: Path, pre_root: Path, n_cases: int, spacing: float) -> dict:
    from importlib import metadata

    out_json = raw_root.parent / "nnunet_times.json"
    env = {**os.environ, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(pre_root),
           "nnUNet_results": str(pre_root.parent / "nnUNet_results"), "nnUNet_def_n_proc": "1",
           "nnUNet_compile": "f"}
    code = f"from stunet_scale.bench.prepare import _nnunet_child; _nnunet_child({str(out_json)!r}, {spacing!r})"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"nnU-Net preprocessing failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    times = json.loads(out_json.read_text())
    folder = pre_root / DATASET_NAME / "nnUNetPlans_3d_fullres"
    import blosc2

    voxels = 0
    for f in folder.glob("*.b2nd"):
        if not f.name.endswith("_seg.b2nd"):
            voxels += int(np.prod(blosc2.open(str(f), mode="r").shape[1:]))
    stored = _dir_bytes(folder)
    arrays = _dir_bytes(folder, (".b2nd",))
    steps = times["fingerprint_seconds"] + times["plan_seconds"] + times["preprocess_seconds"]
    times["steady_mean_seconds_per_case"] = float(np.mean(times["steady_seconds_per_case"]))
    return {
        "version": metadata.version("nnunetv2"), **times, "child_process_wall_seconds": wall,
        "seconds_fingerprint_plan_preprocess": steps, "voxels": voxels, "bytes": stored,
        "bytes_per_voxel": stored / max(1, voxels), "bytes_per_voxel_image_label": arrays / max(1, voxels),
        "bytes_per_case": stored / max(1, n_cases),
    }


def run_benchmark(source: str | Path, cases: int | None = None, spacing: float = 1.5, keep: str | Path | None = None) -> dict:
    """Run both pipelines on the same cases and return the measurements (see module docstring)."""
    from stunet_scale.data.sources import open_source

    source = Path(source).resolve()
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        src = work / "source"
        ids = _subset(source, src, cases)
        if not ids:
            raise ValueError(f"{source}: no TotalSegmentator cases (sXXXX/ct.nii.gz) found")
        class_map = open_source(src).class_map_name
        # warm the page cache and the imports, so the first pipeline timed is not charged for them
        for f in sorted(src.rglob("*.nii*")):
            f.read_bytes()
        import nibabel  # noqa: F401
        import zarr  # noqa: F401
        log.info(f"bench prepare: {len(ids)} case(s) of {source}, class map {class_map}, target {spacing} mm")
        ours = _ours(src, work / "ours", classes=class_map, spacing=spacing)
        ours_nn = _ours(src, work / "ours_nnunet_settings", classes=class_map, spacing=spacing,
                        label_interpolation="linear", crop="nonzero")
        raw_root = work / "nnUNet_raw"
        convert = convert_to_nnunet(src, raw_root / DATASET_NAME, ids, class_map)
        nn = _nnunet(raw_root, work / "nnUNet_preprocessed", len(ids), spacing)
        nn["convert_seconds"] = convert
        nn["seconds_total"] = convert + nn["seconds_fingerprint_plan_preprocess"]
        nn["seconds_per_case"] = nn["seconds_total"] / len(ids)
        nn["seconds_per_case_without_conversion"] = nn["seconds_fingerprint_plan_preprocess"] / len(ids)
        result = {
            "source": str(source), "cases": len(ids), "target_spacing_mm": spacing, "class_map": class_map,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "ours_default": ours, "ours_nnunet_settings": ours_nn, "nnunet": nn,
            "speedup_per_case": {
                "steady_default_vs_nnunet": nn["steady_mean_seconds_per_case"] / ours["steady_mean_seconds_per_case"],
                "steady_nnunet_settings_vs_nnunet": nn["steady_mean_seconds_per_case"] / ours_nn["steady_mean_seconds_per_case"],
                "default_vs_nnunet": nn["seconds_per_case"] / ours["seconds_per_case"],
                "nnunet_settings_vs_nnunet": nn["seconds_per_case"] / ours_nn["seconds_per_case"],
                "default_vs_nnunet_without_conversion": nn["seconds_per_case_without_conversion"] / ours["seconds_per_case"],
            },
            "bytes_per_voxel_ratio": {
                "default_vs_nnunet": ours["bytes_per_voxel"] / nn["bytes_per_voxel"],
                "nnunet_settings_vs_nnunet": ours_nn["bytes_per_voxel"] / nn["bytes_per_voxel"],
            },
            "bytes_per_case_ratio": {"default_vs_nnunet": ours["bytes_per_case"] / nn["bytes_per_case"]},
            "goal": "speedup >= 2x per case and bytes per voxel <= 0.5x of nnU-Net v2",
        }
        result["goal_met"] = bool(result["speedup_per_case"]["steady_default_vs_nnunet"] >= 2
                                  and result["speedup_per_case"]["default_vs_nnunet"] >= 2
                                  and result["bytes_per_voxel_ratio"]["default_vs_nnunet"] <= 0.5)
        return result
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def format_report(r: dict) -> str:
    o, on, nn = r["ours_default"], r["ours_nnunet_settings"], r["nnunet"]
    lines = [
        f"bench prepare: {r['cases']} case(s) of {r['source']} -> {r['target_spacing_mm']} mm, one core each "
        f"({r['machine']['cpus']} CPUs on this machine)",
        "",
        f"{'pipeline':48s} {'s/case':>7s} {'steady':>7s} {'bytes/voxel':>12s} {'MB/case':>8s}",
        f"{'ours (cubic image, nearest labels, body crop)':48s} {o['seconds_per_case']:7.2f} {o['steady_mean_seconds_per_case']:7.2f} "
        f"{o['bytes_per_voxel']:12.3f} {o['bytes_per_case'] / 1e6:8.2f}",
        f"{'ours (nnU-Net settings: linear labels, nonzero)':48s} {on['seconds_per_case']:7.2f} {on['steady_mean_seconds_per_case']:7.2f} "
        f"{on['bytes_per_voxel']:12.3f} {on['bytes_per_case'] / 1e6:8.2f}",
        f"{'nnU-Net v' + nn['version'] + ' (convert+fingerprint+plan+preproc.)':48s} {nn['seconds_per_case']:7.2f} "
        f"{nn['steady_mean_seconds_per_case']:7.2f} {nn['bytes_per_voxel']:12.3f} {nn['bytes_per_case'] / 1e6:8.2f}",
        f"{'  of which convert / fingerprint / plan / preprocess':44s} {nn['convert_seconds']:.1f} / {nn['fingerprint_seconds']:.1f} / "
        f"{nn['plan_seconds']:.1f} / {nn['preprocess_seconds']:.1f} s total",
        "",
        "s/case = wall time of the whole run / cases; steady = mean per-case work in a warm process "
        "(ours: prepare's own per-case timing; nnU-Net: analyze_case + run_case_save)",
        f"speed-up per case (steady): {r['speedup_per_case']['steady_default_vs_nnunet']:.1f}x (default), "
        f"{r['speedup_per_case']['steady_nnunet_settings_vs_nnunet']:.1f}x (nnU-Net settings)",
        f"speed-up per case (whole run): {r['speedup_per_case']['default_vs_nnunet']:.1f}x (default), "
        f"{r['speedup_per_case']['nnunet_settings_vs_nnunet']:.1f}x (nnU-Net settings), "
        f"{r['speedup_per_case']['default_vs_nnunet_without_conversion']:.1f}x (vs nnU-Net without the conversion step)",
        f"bytes per voxel: {r['bytes_per_voxel_ratio']['default_vs_nnunet']:.2f}x of nnU-Net's; "
        f"bytes per case {r['bytes_per_case_ratio']['default_vs_nnunet']:.2f}x",
        f"goal ({r['goal']}): {'met' if r['goal_met'] else 'NOT met'}",
    ]
    return "\n".join(lines)
