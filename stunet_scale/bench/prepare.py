"""`stunet-scale bench prepare SOURCE`: our preprocessing vs nnU-Net v2's own, on the same cases.

What is timed (wall clock, one process, one core each; both in this run, so the ratio is robust to
a busy machine even when absolute numbers are not):

* **ours, default**: ``prepare_dataset(..., format="zarr")``: read + validate the CT and every mask,
  merge, RAS, body crop, resample to 1.5 mm (cubic image, nnU-Net's per-label linear labels),
  statistics, foreground locations, Zarr write, manifest. ``threads=1`` (no gunzip threads) for a
  one-core comparison.
* **ours, nnU-Net settings**: the same with nnU-Net's crop (nonzero) as well, so its grid is
  nnU-Net's own.
* **ours, nearest labels**: the default with ``--label-interp nearest`` (the old default), to show
  what per-label linear costs in time and buys in class volumes.
* **nnU-Net v2** (the installed ``nnunetv2``): (1) TotalSegmentator -> nnU-Net raw conversion as
  TotalSegmentator's ``combine_labels`` does it (``get_fdata`` per mask, later class wins), because
  nnU-Net cannot read the per-class layout; (2) ``extract_fingerprints``, (3) ``plan_experiments``
  with ``overwrite_target_spacing`` = 1.5 mm, (4) ``preprocess`` of ``3d_fullres`` with one process,
  run through its Python API in a child process of this script (nnU-Net reads its folders from
  environment variables at import time, so it gets a fresh interpreter pointed at a temp dir).

Bytes per voxel = bytes on disk of the preprocessed arrays (+ per-case metadata: our fg_locations,
nnU-Net's .pkl with class locations) / stored voxels. Each side stores its own crop, so the total
bytes per case are reported too. Speed per output voxel = seconds / stored voxels of that side
(the body crop stores fewer voxels than nnU-Net's nonzero crop, so this is the stricter ratio).

Class volumes (not timed, after both pipelines): the *true* volume of class k in a case is its voxel
count in the source masks merged as TotalSegmentator's converter merges them (the nnU-Net raw label
map ``convert_to_nnunet`` writes: a later class wins where masks overlap, as in ``prepare``) times
the source voxel volume. Each output's volume is its voxel count times its own voxel volume (the
effective spacing: cropped extent / stored shape; for nnU-Net from its .pkl: spacing x shape before
/ after resampling). References:

* **nnunet_same_grid**: nnU-Net v2's own label resampling, ``resample_data_or_seg_to_shape(seg,
  shape, source spacing, target spacing, is_seg=True, order=1, order_z=0, force_separate_z=None)``
  (its plans' ``resampling_fn_seg``), applied to *our* RAS-cropped source label map and *our* stored
  shape: the same case to the same grid. The pass/fail is taken against this one.
* **nnunet_pipeline**: the ``_seg.b2nd`` that nnU-Net's ``preprocess`` wrote (its own nonzero crop,
  so a grid offset by a fraction of a voxel from ours: informative, not the criterion; on thin
  structures that phase alone moves the error by several percent either way). ``ours_nnunet_settings``
  is on that same grid and matches it but for a few voxels: nnU-Net also resamples its -1 label
  ("outside the nonzero mask", where the CT is exactly 0 at the border) as a class, which hands a
  voxel next to it to a foreground class now and then (10 of 2.96 M voxels on the real CT sample).

Per case and method, over the classes whose true volume is at least ``min_ml`` (1 ml = 296 voxels
at 1.5 mm; below that a single boundary voxel is > 0.3 % and the percentages are noise): the
maximum and the mean absolute relative error. **Ours no worse than nnU-Net** in a case: ours'
maximum <= nnU-Net's + 0.5 percentage points and ours' mean <= nnU-Net's + 0.1 points (about one
1.5 mm voxel of the smallest counted class, and a tenth of that on the mean: room for the float32
vs float64 rounding of an exact tie, not for a different method: nearest labels on the demo
phantoms miss it by 0.2-2 points on the mean in every case). Overall: every case passes. (Nearest
is volume-exact for an integer upsampling such as 3 -> 1.5 mm, where it passes.)

Report keys (``--json``): ``ours_default``, ``ours_nnunet_settings``, ``ours_nearest_labels``,
``nnunet`` (per side: ``seconds_per_case``, ``steady_mean_seconds_per_case``, ``voxels``,
``seconds_per_output_voxel``, ``steady_seconds_per_output_voxel``, ``bytes_per_voxel``, ...);
``speedup_per_case`` and ``speedup_per_output_voxel`` (nnU-Net's seconds / ours, steady and whole
run); ``bytes_per_voxel_ratio``, ``bytes_per_case_ratio``; ``class_volumes`` (``min_ml``,
``tolerance_pct_points``, ``methods``, ``summary`` {method: max/mean abs % over cases},
``ours_no_worse_than_nnunet``, ``ours_nearest_no_worse_than_nnunet``, and ``cases`` {case:
``classes`` {name: ``true_ml`` and per method ``<method>_ml``, ``<method>_err_ml``,
``<method>_err_pct``}, ``summary`` {method: ``classes``, ``max_abs_pct``, ``max_class``,
``mean_abs_pct``, ``foreground_err_pct``}, ``same_grid`` {``voxels``, ``differing_voxels``,
``ours_label_seconds``, ``nnunet_label_seconds``}, ``ours_no_worse``, ``ours_nearest_no_worse``});
``goals`` {``speed``, ``bytes``, ``class_volumes``} and ``goal_met`` (all three).

**Full size** (``--full-size``, ``run_full_size_benchmark``): generates real-sized demo cases
(default 512x512x400 at 0.8 mm, 117 masks; larger than that they are built at half resolution and
repeated, see ``demo.write_demo_dataset(upsample=)``) and runs, back to back and each in its own
process so that its peak RSS is its own: ours (``prepare``, 1 worker, 1 thread) and nnU-Net v2
(TotalSegmentator's label merge, then fingerprint + plan + preprocess with one process). Keys:
``ours`` {``seconds_per_case``, ``cpu_seconds_per_case``, ``peak_rss_bytes``, ``stored_shapes``, ...},
``nnunet`` {``merge_seconds``, ``fingerprint_seconds``, ``plan_seconds``, ``preprocess_seconds``,
``seconds_per_case``, ``cpu_seconds_per_case``, ``merge_peak_rss_bytes``, ``preprocess_peak_rss_bytes``,
``peak_rss_bytes``}, ``speedup_per_case`` (wall) and ``speedup_cpu_per_case`` (user + system CPU
time of the whole child processes: the robust one when other jobs share the cores).
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

VOLUME_MIN_ML = 1.0  # classes smaller than this (true volume) are listed but not judged
VOLUME_TOL_MAX_PCT_POINTS = 0.5  # ours' max abs % error may exceed nnU-Net's by this much
VOLUME_TOL_MEAN_PCT_POINTS = 0.1  # ... and ours' mean abs % error by this much
VOLUME_METHODS = ("ours", "ours_nearest", "ours_nnunet_settings", "nnunet_same_grid", "nnunet_pipeline")


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
    from stunet_scale.data.ingest.prepare import prepare_dataset

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
        "voxels": voxels, "seconds_per_output_voxel": secs / voxels, "steady_seconds_per_output_voxel": float(np.sum(steady)) / voxels,
        "bytes": stored, "bytes_per_voxel": stored / voxels,
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


def peak_rss_bytes() -> int:
    """Peak resident memory of this process or of any child it waited for (nnU-Net's pool workers)."""
    import resource

    kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return int(kib) * 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process and the children it waited for: unlike wall time, it
    barely moves when other jobs share the cores, so it is the fairer number on a busy machine."""
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def _nnunet_child(out_json: str, spacing: float, steady: bool = True) -> None:
    """Runs in a fresh interpreter with nnUNet_raw/nnUNet_preprocessed set: fingerprint, plan, preprocess
    (then, with ``steady``, each case once more in this warm process)."""
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
    times["peak_rss_bytes"] = peak_rss_bytes()
    times["cpu_seconds"] = cpu_seconds()
    if not steady:
        Path(out_json).write_text(json.dumps(times))
        return
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


def _nnunet(raw_root: Path, pre_root: Path, n_cases: int, spacing: float, steady: bool = True) -> dict:
    from importlib import metadata

    out_json = raw_root.parent / "nnunet_times.json"
    env = {**os.environ, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(pre_root),
           "nnUNet_results": str(pre_root.parent / "nnUNet_results"), "nnUNet_def_n_proc": "1",
           "nnUNet_compile": "f"}
    code = f"from stunet_scale.bench.prepare import _nnunet_child; _nnunet_child({str(out_json)!r}, {spacing!r}, {steady!r})"
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
    if steady:
        times["steady_mean_seconds_per_case"] = float(np.mean(times["steady_seconds_per_case"]))
        times["steady_seconds_per_output_voxel"] = float(np.sum(times["steady_seconds_per_case"])) / max(1, voxels)
    return {
        "version": metadata.version("nnunetv2"), **times, "child_process_wall_seconds": wall,
        "seconds_fingerprint_plan_preprocess": steps, "voxels": voxels, "bytes": stored,
        "bytes_per_voxel": stored / max(1, voxels), "bytes_per_voxel_image_label": arrays / max(1, voxels),
        "bytes_per_case": stored / max(1, n_cases),
    }


# ------------------------------------------------------------------------------------------------
# class volumes: ours and nnU-Net's vs the source masks
# ------------------------------------------------------------------------------------------------


def _ml_of(labels: np.ndarray, n_labels: int, voxel_ml: float) -> np.ndarray:
    """Per label value 0..n_labels-1: voxels x voxel volume (ml); negative values (nnU-Net's -1
    outside the nonzero mask) are background."""
    flat = labels.ravel()
    counts = np.bincount(flat[flat > 0].astype(np.int64), minlength=n_labels)[:n_labels].astype(np.float64)
    counts[0] = flat.size - counts[1:].sum()
    return counts * voxel_ml


def source_volumes(raw_dataset: Path, ids: list[str], n_labels: int) -> dict[str, np.ndarray]:
    """True per-class volume (ml) per case: the merged source label map that ``convert_to_nnunet``
    wrote (TotalSegmentator's merge of the masks) x the source voxel volume."""
    import nibabel as nib

    out = {}
    for cid in ids:
        img = nib.load(raw_dataset / "labelsTr" / f"{cid}.nii.gz")
        voxel_ml = abs(float(np.linalg.det(img.affine[:3, :3]))) / 1000
        out[cid] = _ml_of(np.asarray(img.dataobj), n_labels, voxel_ml)
    return out


def ours_volumes(out: Path) -> dict[str, np.ndarray]:
    """Per-class volume (ml) per case of a prepared store: class_voxels x stored voxel volume."""
    m = json.loads((out / "manifest.json").read_text())
    return {cid: np.asarray(e["class_voxels"], np.float64) * float(np.prod(e["spacing"])) / 1000
            for cid, e in m["cases"].items()}


def nnunet_volumes(folder: Path, ids: list[str], n_labels: int) -> dict[str, np.ndarray]:
    """Per-class volume (ml) per case of nnU-Net's preprocessed ``_seg.b2nd``. The voxel volume is
    the source voxel volume x voxels before / after resampling (a product, so nnU-Net's axis
    transposition does not matter)."""
    import pickle

    import blosc2

    out = {}
    for cid in ids:
        seg = np.asarray(blosc2.open(str(folder / f"{cid}_seg.b2nd"), mode="r")[:])[0]
        props = pickle.loads((folder / f"{cid}.pkl").read_bytes())
        before = float(np.prod(props["shape_after_cropping_and_before_resampling"]))
        voxel_ml = float(np.prod(props["spacing"])) * before / seg.size / 1000
        out[cid] = _ml_of(seg, n_labels, voxel_ml)
    return out


def same_grid_volumes(raw_dataset: Path, ours_out: Path, ids: list[str], n_labels: int) -> tuple[dict, dict]:
    """nnU-Net v2's ``resample_data_or_seg_to_shape(is_seg=True, order=1, order_z=0,
    force_separate_z=None)`` on our RAS-cropped source label map to our stored shape, and ours
    (``resample_labels``, the default method) on the same input. Returns ({case: ml}, {case:
    {voxels, differing_voxels, ours_label_seconds, nnunet_label_seconds}})."""
    import nibabel as nib
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    from stunet_scale.data.ingest import preprocess as pp

    m = json.loads((ours_out / "manifest.json").read_text())
    target = m["preprocessing"]["target_spacing"]
    method = m["preprocessing"]["label_interpolation"]
    vols, checks = {}, {}
    for cid in ids:
        g = pp.Geometry.from_dict(m["cases"][cid]["geometry"])
        lab = np.asarray(nib.load(raw_dataset / "labelsTr" / f"{cid}.nii.gz").dataobj)
        cropped = np.ascontiguousarray(pp.crop(pp.apply_ornt(lab, np.asarray(g.ornt)), g.crop_box))
        src_spacing = pp.voxel_spacing(np.asarray(g.ras_affine))
        t = time.perf_counter()
        ref = resample_data_or_seg_to_shape(cropped[None].astype(np.float32), g.shape, src_spacing, target, is_seg=True,
                                            order=1, order_z=0, force_separate_z=None)[0]
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        same = list(g.shape) == list(g.cropped_shape)  # prepare does not resample then (as nnU-Net)
        ours = cropped if same else pp.resample_labels(cropped, g.shape, method, g.separate_axis)
        t_ours = time.perf_counter() - t
        vols[cid] = _ml_of(ref, n_labels, float(np.prod(g.spacing)) / 1000)
        checks[cid] = {"voxels": int(ref.size), "differing_voxels": int(np.count_nonzero(ours != ref)),
                       "ours_method": method, "ours_label_seconds": t_ours, "nnunet_label_seconds": t_ref}
    return vols, checks


def volume_summary(true_ml: np.ndarray, got_ml: np.ndarray, labels: list[str], min_ml: float = VOLUME_MIN_ML) -> dict:
    """Max and mean absolute relative error (%) over the foreground classes with true volume >=
    ``min_ml``, the class with the max, and the error of all foreground together."""
    judged = [k for k in range(1, len(labels)) if true_ml[k] >= min_ml]
    rel = {k: 100 * (got_ml[k] - true_ml[k]) / true_ml[k] for k in judged}
    worst = max(judged, key=lambda k: abs(rel[k])) if judged else None
    fg_true = float(true_ml[1:].sum())
    return {
        "classes": len(judged),
        "max_abs_pct": float(abs(rel[worst])) if judged else 0.0,
        "max_class": labels[worst] if judged else None,
        "mean_abs_pct": float(np.mean([abs(v) for v in rel.values()])) if judged else 0.0,
        "foreground_err_pct": 100 * (float(got_ml[1:].sum()) - fg_true) / fg_true if fg_true > 0 else 0.0,
    }


def no_worse(ours: dict, ref: dict, tol_max: float = VOLUME_TOL_MAX_PCT_POINTS, tol_mean: float = VOLUME_TOL_MEAN_PCT_POINTS) -> bool:
    """Ours no worse than the reference (two ``volume_summary`` results of the same case): max and
    mean absolute % error each at most the reference's plus its tolerance (percentage points)."""
    return bool(ours["max_abs_pct"] <= ref["max_abs_pct"] + tol_max and ours["mean_abs_pct"] <= ref["mean_abs_pct"] + tol_mean)


def compare_class_volumes(true: dict, by_method: dict[str, dict], labels: list[str], checks: dict | None = None,
                          min_ml: float = VOLUME_MIN_ML) -> dict:
    """``true`` {case: ml per label}, ``by_method`` {method: {case: ml per label}} -> the report's
    ``class_volumes`` (see the module docstring). Methods ``ours`` and ``nnunet_same_grid`` are
    required; ``ours_nearest`` is judged the same way when present."""
    cases = {}
    for cid, t in true.items():
        classes = {}
        for k in range(1, len(labels)):
            if t[k] <= 0 and all(by_method[mth][cid][k] <= 0 for mth in by_method):
                continue
            row = {"true_ml": float(t[k])}
            for mth, vols in by_method.items():
                got = float(vols[cid][k])
                row[f"{mth}_ml"] = got
                row[f"{mth}_err_ml"] = got - float(t[k])
                row[f"{mth}_err_pct"] = 100 * (got - float(t[k])) / float(t[k]) if t[k] > 0 else None
            classes[labels[k]] = row
        summ = {mth: volume_summary(t, vols[cid], labels, min_ml) for mth, vols in by_method.items()}
        c = {"classes": classes, "summary": summ, "ours_no_worse": no_worse(summ["ours"], summ["nnunet_same_grid"])}
        if "ours_nearest" in summ:
            c["ours_nearest_no_worse"] = no_worse(summ["ours_nearest"], summ["nnunet_same_grid"])
        if checks:
            c["same_grid"] = checks[cid]
        cases[cid] = c
    overall = {mth: {"max_abs_pct": max(c["summary"][mth]["max_abs_pct"] for c in cases.values()),
                     "mean_abs_pct": float(np.mean([c["summary"][mth]["mean_abs_pct"] for c in cases.values()]))}
               for mth in by_method}
    r = {
        "min_ml": min_ml,
        "tolerance_pct_points": {"max": VOLUME_TOL_MAX_PCT_POINTS, "mean": VOLUME_TOL_MEAN_PCT_POINTS},
        "rule": "per case, over classes with true volume >= min_ml: ours' max and mean absolute % error "
                "<= nnU-Net's (same case, same grid) + tolerance; every case must pass",
        "methods": list(by_method),
        "summary": overall,
        "ours_no_worse_than_nnunet": all(c["ours_no_worse"] for c in cases.values()),
        "cases": cases,
    }
    if "ours_nearest" in by_method:
        r["ours_nearest_no_worse_than_nnunet"] = all(c["ours_nearest_no_worse"] for c in cases.values())
    return r


def run_benchmark(source: str | Path, cases: int | None = None, spacing: float = 1.5, keep: str | Path | None = None) -> dict:
    """Run both pipelines on the same cases and return the measurements (see module docstring)."""
    from stunet_scale.data.ingest.sources import open_source

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
        ours_nearest = _ours(src, work / "ours_nearest", classes=class_map, spacing=spacing, label_interpolation="nearest")
        raw_root = work / "nnUNet_raw"
        convert = convert_to_nnunet(src, raw_root / DATASET_NAME, ids, class_map)
        nn = _nnunet(raw_root, work / "nnUNet_preprocessed", len(ids), spacing)
        nn["convert_seconds"] = convert
        nn["seconds_total"] = convert + nn["seconds_fingerprint_plan_preprocess"]
        nn["seconds_per_case"] = nn["seconds_total"] / len(ids)
        nn["seconds_per_case_without_conversion"] = nn["seconds_fingerprint_plan_preprocess"] / len(ids)
        nn["seconds_per_output_voxel"] = nn["seconds_total"] / max(1, nn["voxels"])

        # class volumes (not timed): ours and nnU-Net's vs the merged source masks
        labels = json.loads((work / "ours" / "manifest.json").read_text())["class_map"]["labels"]
        raw_ds = raw_root / DATASET_NAME
        same_grid, checks = same_grid_volumes(raw_ds, work / "ours", ids, len(labels))
        volumes = compare_class_volumes(
            source_volumes(raw_ds, ids, len(labels)),
            {"ours": ours_volumes(work / "ours"), "ours_nearest": ours_volumes(work / "ours_nearest"),
             "ours_nnunet_settings": ours_volumes(work / "ours_nnunet_settings"), "nnunet_same_grid": same_grid,
             "nnunet_pipeline": nnunet_volumes(work / "nnUNet_preprocessed" / DATASET_NAME / "nnUNetPlans_3d_fullres", ids,
                                               len(labels))},
            labels, checks)

        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else float("inf")

        result = {
            "source": str(source), "cases": len(ids), "target_spacing_mm": spacing, "class_map": class_map,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "ours_default": ours, "ours_nnunet_settings": ours_nn, "ours_nearest_labels": ours_nearest, "nnunet": nn,
            "speedup_per_case": {
                "steady_default_vs_nnunet": ratio(nn["steady_mean_seconds_per_case"], ours["steady_mean_seconds_per_case"]),
                "steady_nnunet_settings_vs_nnunet": ratio(nn["steady_mean_seconds_per_case"], ours_nn["steady_mean_seconds_per_case"]),
                "steady_nearest_labels_vs_nnunet": ratio(nn["steady_mean_seconds_per_case"], ours_nearest["steady_mean_seconds_per_case"]),
                "default_vs_nnunet": ratio(nn["seconds_per_case"], ours["seconds_per_case"]),
                "nnunet_settings_vs_nnunet": ratio(nn["seconds_per_case"], ours_nn["seconds_per_case"]),
                "default_vs_nnunet_without_conversion": ratio(nn["seconds_per_case_without_conversion"], ours["seconds_per_case"]),
            },
            "speedup_per_output_voxel": {
                "steady_default_vs_nnunet": ratio(nn["steady_seconds_per_output_voxel"], ours["steady_seconds_per_output_voxel"]),
                "steady_nnunet_settings_vs_nnunet": ratio(nn["steady_seconds_per_output_voxel"], ours_nn["steady_seconds_per_output_voxel"]),
                "steady_nearest_labels_vs_nnunet": ratio(nn["steady_seconds_per_output_voxel"], ours_nearest["steady_seconds_per_output_voxel"]),
                "default_vs_nnunet": ratio(nn["seconds_per_output_voxel"], ours["seconds_per_output_voxel"]),
                "nnunet_settings_vs_nnunet": ratio(nn["seconds_per_output_voxel"], ours_nn["seconds_per_output_voxel"]),
            },
            "bytes_per_voxel_ratio": {
                "default_vs_nnunet": ours["bytes_per_voxel"] / nn["bytes_per_voxel"],
                "nnunet_settings_vs_nnunet": ours_nn["bytes_per_voxel"] / nn["bytes_per_voxel"],
            },
            "bytes_per_case_ratio": {"default_vs_nnunet": ours["bytes_per_case"] / nn["bytes_per_case"]},
            "class_volumes": volumes,
            "goal": "speed-up >= 2x per output voxel (steady and whole run), bytes per voxel <= 0.5x of nnU-Net v2, "
                    "class volumes no worse than nnU-Net v2's own resampling of the same case to the same grid",
        }
        sp = result["speedup_per_output_voxel"]
        result["goals"] = {
            "speed": bool(sp["steady_default_vs_nnunet"] >= 2 and sp["default_vs_nnunet"] >= 2),
            "bytes": bool(result["bytes_per_voxel_ratio"]["default_vs_nnunet"] <= 0.5),
            "class_volumes": bool(volumes["ours_no_worse_than_nnunet"]),
        }
        result["goal_met"] = all(result["goals"].values())
        return result
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


_VOLUME_COLUMNS = (("ours", "ours"), ("nnunet_same_grid", "nnU-Net same grid"), ("nnunet_pipeline", "nnU-Net pipeline"),
                   ("ours_nnunet_settings", "ours nnU-Net sett."), ("ours_nearest", "ours nearest"))


def _volume_lines(v: dict, per_class: bool, worst: int = 5) -> list[str]:
    cols = [(m, name) for m, name in _VOLUME_COLUMNS if m in v["methods"]]
    lines = [
        f"class volumes vs the source masks (ml; classes >= {v['min_ml']:g} ml judged; max / mean |error| %, "
        f"'no worse' = ours <= nnU-Net same grid + {v['tolerance_pct_points']['max']:g} / {v['tolerance_pct_points']['mean']:g} points):",
        f"{'case':8s} {'n':>3s} " + " ".join(f"{name:>18s}" for _, name in cols) + "  ours / nearest no worse",
    ]
    for cid, c in v["cases"].items():
        cells = " ".join(f"{c['summary'][m]['max_abs_pct']:8.2f} / {c['summary'][m]['mean_abs_pct']:5.2f}  " for m, _ in cols)
        verdict = ("yes" if c["ours_no_worse"] else "NO") + (" / " + ("yes" if c["ours_nearest_no_worse"] else "NO")
                                                             if "ours_nearest_no_worse" in c else "")
        lines.append(f"{cid:8s} {c['summary']['ours']['classes']:3d} {cells}{verdict}")
    lines.append(f"{'all':8s} {'':3s} " + " ".join(f"{v['summary'][m]['max_abs_pct']:8.2f} / {v['summary'][m]['mean_abs_pct']:5.2f}  "
                                                for m, _ in cols))
    for cid, c in v["cases"].items():
        if "same_grid" in c:
            g = c["same_grid"]
            lines.append(f"{cid}: same grid, ours ({g['ours_method']}) vs nnU-Net's resample_data_or_seg_to_shape: "
                         f"{g['differing_voxels']} of {g['voxels']} voxels differ; label resampling {g['ours_label_seconds']:.3f} s "
                         f"vs {g['nnunet_label_seconds']:.2f} s")
    head = f"  {'case':6s} {'class':28s} {'true ml':>9s} " + " ".join(f"{name:>20s}" for _, name in cols)
    lines += ["", ("per class" if per_class else f"per class, the {worst} worst per case (all of them: --per-class or --json)")
              + ": error ml (%) = output - true", head]
    for cid, c in v["cases"].items():
        rows = list(c["classes"].items())
        if not per_class:
            judged = [(n, row) for n, row in rows if row["true_ml"] >= v["min_ml"]]
            rows = sorted(judged, key=lambda nr: -max(abs(nr[1][f"{m}_err_pct"]) for m, _ in cols))[:worst]
        for name, row in rows:
            errs = " ".join(
                f"{row[f'{m}_err_ml']:+9.3f} ({row[f'{m}_err_pct']:+7.2f}%)" if row[f"{m}_err_pct"] is not None
                else f"{row[f'{m}_err_ml']:+9.3f} (     n/a)" for m, _ in cols)
            lines.append(f"  {cid:6s} {name:28s} {row['true_ml']:9.2f} {errs}")
    return lines


def format_report(r: dict, per_class: bool = False) -> str:
    o, on, onr, nn = r["ours_default"], r["ours_nnunet_settings"], r["ours_nearest_labels"], r["nnunet"]

    def row(name: str, d: dict) -> str:
        return (f"{name:52s} {d['seconds_per_case']:7.2f} {d['steady_mean_seconds_per_case']:7.2f} "
                f"{1e6 * d['steady_seconds_per_output_voxel']:10.3f} {d['bytes_per_voxel']:12.3f} {d['bytes_per_case'] / 1e6:8.2f}")

    sv, sc = r["speedup_per_output_voxel"], r["speedup_per_case"]
    lines = [
        f"bench prepare: {r['cases']} case(s) of {r['source']} -> {r['target_spacing_mm']} mm, one core each "
        f"({r['machine']['cpus']} CPUs on this machine)",
        "",
        f"{'pipeline':52s} {'s/case':>7s} {'steady':>7s} {'us/voxel':>10s} {'bytes/voxel':>12s} {'MB/case':>8s}",
        row("ours default (cubic image, linear labels, body crop)", o),
        row("ours, nnU-Net settings (also nonzero crop)", on),
        row("ours, nearest labels (body crop)", onr),
        row(f"nnU-Net v{nn['version']} (convert+fingerprint+plan+preproc.)", nn),
        f"{'  of which convert / fingerprint / plan / preprocess':52s} {nn['convert_seconds']:.1f} / {nn['fingerprint_seconds']:.1f} / "
        f"{nn['plan_seconds']:.1f} / {nn['preprocess_seconds']:.1f} s total",
        "",
        "s/case = wall time of the whole run / cases; steady = mean per-case work in a warm process "
        "(ours: prepare's own per-case timing; nnU-Net: analyze_case + run_case_save); us/voxel = steady "
        "microseconds per stored voxel",
        f"speed-up per output voxel: {sv['steady_default_vs_nnunet']:.1f}x steady, {sv['default_vs_nnunet']:.1f}x whole run (default); "
        f"{sv['steady_nnunet_settings_vs_nnunet']:.1f}x / {sv['nnunet_settings_vs_nnunet']:.1f}x (nnU-Net settings); "
        f"{sv['steady_nearest_labels_vs_nnunet']:.1f}x steady (nearest labels)",
        f"speed-up per case (steady): {sc['steady_default_vs_nnunet']:.1f}x (default), "
        f"{sc['steady_nnunet_settings_vs_nnunet']:.1f}x (nnU-Net settings), {sc['steady_nearest_labels_vs_nnunet']:.1f}x (nearest labels)",
        f"speed-up per case (whole run): {sc['default_vs_nnunet']:.1f}x (default), "
        f"{sc['nnunet_settings_vs_nnunet']:.1f}x (nnU-Net settings), "
        f"{sc['default_vs_nnunet_without_conversion']:.1f}x (vs nnU-Net without the conversion step)",
        f"bytes per voxel: {r['bytes_per_voxel_ratio']['default_vs_nnunet']:.2f}x of nnU-Net's; "
        f"bytes per case {r['bytes_per_case_ratio']['default_vs_nnunet']:.2f}x",
        "",
        *_volume_lines(r["class_volumes"], per_class),
        "",
        f"class volumes, ours no worse than nnU-Net (same grid) in every case: "
        f"{'yes' if r['class_volumes']['ours_no_worse_than_nnunet'] else 'NO'}"
        + (f" (nearest labels: {'yes' if r['class_volumes']['ours_nearest_no_worse_than_nnunet'] else 'NO'})"
           if "ours_nearest_no_worse_than_nnunet" in r["class_volumes"] else ""),
        f"goal ({r['goal']}): {'met' if r['goal_met'] else 'NOT met'} "
        f"(speed {'ok' if r['goals']['speed'] else 'NOT ok'}, bytes {'ok' if r['goals']['bytes'] else 'NOT ok'}, "
        f"class volumes {'ok' if r['goals']['class_volumes'] else 'NOT ok'})",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# full size: one real-sized TotalSegmentator case, ours vs nnU-Net's merge + preprocess, time and memory
# ------------------------------------------------------------------------------------------------

FULL_SIZE_SHAPE = (512, 512, 400)  # a typical TotalSegmentator CT: 512x512 in-plane, 200-1000 slices
FULL_SIZE_SPACING = 0.8  # mm, the fine end of the dataset (~0.8-1.5 mm)
UPSAMPLE_ABOVE_VOXELS = 512 * 512 * 400  # the phantom needs ~140 B/voxel: build larger cases at half resolution


def _ours_full_child(src: str, out: str, class_map: str, spacing: float, out_json: str) -> None:
    """In a fresh interpreter (so its peak RSS is its own): ``prepare`` with one worker, one thread."""
    from stunet_scale.data.ingest.prepare import prepare_dataset

    t = time.perf_counter()
    r = prepare_dataset(src, out, format="zarr", workers=1, threads=1, classes=class_map, spacing=spacing)
    secs = time.perf_counter() - t
    m = json.loads((Path(out) / "manifest.json").read_text())
    Path(out_json).write_text(json.dumps({
        "seconds": secs, "cases": r["ok"], "peak_rss_bytes": peak_rss_bytes(), "cpu_seconds": cpu_seconds(),
        "stored_shapes": {c: e["shape"] for c, e in m["cases"].items()},
        "steady_seconds_per_case": [json.loads((Path(out) / "parts" / "cases" / f"{c}.json").read_text())["seconds"]
                                    for c in m["cases"]]}))


def _merge_child(src: str, dst: str, ids: list[str], class_map: str, out_json: str) -> None:
    """In a fresh interpreter: nnU-Net's first step for this layout, TotalSegmentator's label merge."""
    secs = convert_to_nnunet(Path(src), Path(dst), ids, class_map)
    Path(out_json).write_text(json.dumps({"seconds": secs, "peak_rss_bytes": peak_rss_bytes(), "cpu_seconds": cpu_seconds()}))


def _run_child(code: str, out_json: Path, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark step failed ({code[:80]}...):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(out_json.read_text())


def run_full_size_benchmark(shape=FULL_SIZE_SHAPE, spacing: float = FULL_SIZE_SPACING, cases: int = 1,
                            data: str | Path | None = None, keep: str | Path | None = None, nnunet: bool = True,
                            upsample: int | None = None, target_spacing: float = 1.5) -> dict:
    """Generate (or reuse, in ``data``) full-size demo cases and time, back to back in this run, each
    in its own process with its peak RSS: ours (``prepare``, 1 worker, 1 thread) and nnU-Net v2
    (TotalSegmentator's label merge, then fingerprint + plan + preprocess of 3d_fullres with one
    process). Per-case numbers are whole-run wall time / cases (process start-up included on both sides)."""
    from stunet_scale.data.ingest.demo import write_demo_dataset

    shape = tuple(int(n) for n in shape)
    if upsample is None:
        upsample = 2 if int(np.prod(shape)) > UPSAMPLE_ABOVE_VOXELS else 1
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench_prepare_full_"))
    work.mkdir(parents=True, exist_ok=True)
    raw = Path(data) if data else work / "raw"
    try:
        t = time.perf_counter()
        write_demo_dataset(raw, cases=cases, seed=0, shape=[(n, n) for n in shape], spacing=spacing, upsample=upsample)
        gen_secs = time.perf_counter() - t
        ids = sorted(p.name for p in raw.iterdir() if p.is_dir() and (p / "ct.nii.gz").exists())[:cases]
        class_map = "totalseg-v2"
        for f in sorted(raw.rglob("*.nii*")):  # page cache warm for both sides
            f.read_bytes()
        mod = "from stunet_scale.bench import prepare as b; "
        ours_out = work / "ours"
        shutil.rmtree(ours_out, ignore_errors=True)
        ours = _run_child(mod + f"b._ours_full_child({str(raw)!r}, {str(ours_out)!r}, {class_map!r}, {target_spacing!r}, "
                                f"{str(work / 'ours.json')!r})", work / "ours.json")
        result = {
            "shape": list(shape), "spacing_mm": spacing, "target_spacing_mm": target_spacing, "cases": len(ids),
            "generated_upsample": upsample, "generate_seconds": gen_secs, "data": str(raw),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "ours": {**ours, "seconds_per_case": ours["seconds"] / max(1, ours["cases"]),
                     "cpu_seconds_per_case": ours["cpu_seconds"] / max(1, ours["cases"])},
        }
        if nnunet:
            raw_root = work / "nnUNet_raw"
            shutil.rmtree(raw_root, ignore_errors=True)
            shutil.rmtree(work / "nnUNet_preprocessed", ignore_errors=True)
            merge = _run_child(mod + f"b._merge_child({str(raw)!r}, {str(raw_root / DATASET_NAME)!r}, {ids!r}, {class_map!r}, "
                                     f"{str(work / 'merge.json')!r})", work / "merge.json")
            nn = _nnunet(raw_root, work / "nnUNet_preprocessed", len(ids), target_spacing, steady=False)
            total = merge["seconds"] + nn["seconds_fingerprint_plan_preprocess"]
            result["nnunet"] = {
                "version": nn["version"], "merge_seconds": merge["seconds"], "fingerprint_seconds": nn["fingerprint_seconds"],
                "plan_seconds": nn["plan_seconds"], "preprocess_seconds": nn["preprocess_seconds"],
                "seconds_per_case": total / len(ids), "merge_peak_rss_bytes": merge["peak_rss_bytes"],
                "preprocess_peak_rss_bytes": nn["peak_rss_bytes"],
                "peak_rss_bytes": max(merge["peak_rss_bytes"], nn["peak_rss_bytes"]), "voxels": nn["voxels"],
                # the whole child processes (interpreter start-up and imports included, on both sides)
                "cpu_seconds_per_case": (merge["cpu_seconds"] + nn["cpu_seconds"]) / len(ids),
            }
            result["speedup_per_case"] = result["nnunet"]["seconds_per_case"] / result["ours"]["seconds_per_case"]
            result["speedup_cpu_per_case"] = result["nnunet"]["cpu_seconds_per_case"] / result["ours"]["cpu_seconds_per_case"]
        return result
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def format_full_size_report(r: dict) -> str:
    o = r["ours"]
    gb = lambda b: b / 1e9  # noqa: E731
    shapes = ", ".join("x".join(map(str, s)) for s in o["stored_shapes"].values())
    lines = [
        f"bench prepare --full-size: {r['cases']} case(s) of {'x'.join(map(str, r['shape']))} voxels at {r['spacing_mm']} mm, "
        f"117 masks each -> {r['target_spacing_mm']} mm, one process and one core each ({r['machine']['cpus']} CPUs here)",
        f"{'pipeline':44s} {'s/case':>8s} {'CPU s/case':>10s} {'peak RSS GB':>12s}",
        f"{'ours (prepare, 1 worker, 1 thread)':44s} {o['seconds_per_case']:8.1f} {o['cpu_seconds_per_case']:10.1f} "
        f"{gb(o['peak_rss_bytes']):12.2f}   stored {shapes}",
    ]
    if "nnunet" in r:
        n = r["nnunet"]
        lines += [
            f"{'nnU-Net v' + n['version'] + ' (merge + fingerprint/plan/preproc.)':44s} {n['seconds_per_case']:8.1f} "
            f"{n['cpu_seconds_per_case']:10.1f} {gb(n['peak_rss_bytes']):12.2f}",
            f"{'  of which label merge (nibabel loop)':44s} {n['merge_seconds'] / r['cases']:8.1f} {'':10s} "
            f"{gb(n['merge_peak_rss_bytes']):12.2f}",
            f"{'  of which fingerprint + plan + preprocess':44s} "
            f"{(n['fingerprint_seconds'] + n['plan_seconds'] + n['preprocess_seconds']) / r['cases']:8.1f} {'':10s} "
            f"{gb(n['preprocess_peak_rss_bytes']):12.2f}",
            f"speed-up per case: {r['speedup_per_case']:.1f}x wall, {r['speedup_cpu_per_case']:.1f}x CPU time "
            f"(goal >= 3x: {'met' if min(r['speedup_per_case'], r['speedup_cpu_per_case']) >= 3 else 'NOT met'})",
        ]
    lines.append(f"peak RSS per worker <= 4 GB: {'yes' if o['peak_rss_bytes'] <= 4e9 else 'NO'}")
    return "\n".join(lines)
