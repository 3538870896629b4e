"""`stunet-scale prepare`: raw dataset -> validated, preprocessed Zarr v3 store + WebDataset shards.

One function per step, one idempotent unit of work per case::

    open_source -> plan_shards -> [per case: load_case -> preprocess -> write outputs -> record]
                -> assemble WebDataset shards -> finalize (manifest.json written last)

Resumable and idempotent: a case's outputs are written under ``OUT/tmp`` and renamed into place,
then its record ``OUT/parts/cases/<id>.json`` is written (atomically) last. A re-run skips a case
whose record matches the preprocessing parameters and the *content* of its input files (sha256;
when size and mtime are unchanged the stored hashes are trusted) and whose outputs exist with the
recorded sizes. Killing the run at any point and running it again gives the same manifest as an
uninterrupted run: the manifest holds no timestamps, no timings and no absolute output paths.

Scale-out: cases are grouped into WebDataset shards (sorted by split then id, ``cases_per_shard``
per shard); ``--shard-index I --num-shards N`` prepares the shards ``k`` with ``k % N == I`` (a Slurm
array task each), and ``--finalize`` checks every case and shard is there, consolidates the Zarr
metadata and writes ``manifest.json`` + ``quarantine.jsonl``. Within a node ``--workers`` uses
processes (spawn), each with a few threads for gunzipping masks; ``--workers auto`` (the CLI's
default) is ``default_workers()``: one per core, at most one per ``WORKER_MEMORY_BYTES`` of memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import time
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...atomic_files import atomic_write_text
from ...parent_watch import exit_with_parent
from .. import store as st
from . import preprocess as pp
from . import store_writer
from .sources import REASONS, CaseError, DatasetError, RawCase, RawDataset, files_fingerprint, load_case, open_source

log = logging.getLogger("stunet_scale.prepare")

FG_SAMPLES = 10_000  # foreground locations per class and intensity samples per case (nnU-Net)
FG_MIN_COVERAGE = 0.01
RETRIED_REASONS = ("PREPARE_ERROR", "WORKER_CRASHED")  # not a property of the input: try again on re-run
OVERLAP_RULE = ("masks are merged in label-value order; a higher label value overwrites a lower one where masks overlap; "
                "masks without a class in the map go first, with the ignore label, so any class of the map overwrites them")


# Peak RSS of one worker on the largest TotalSegmentator case, 512x512x1000 at 0.8 mm with 117 masks
# (measured with `bench prepare --full-size --shape 512,512,1000`; README, Performance): the unit
# of the default worker count.
WORKER_MEMORY_BYTES = 4 * 2**30


def available_memory_bytes() -> int:
    """Memory this job may use: MemAvailable, capped by a cgroup v2 limit (Slurm, containers)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            avail = min(avail, int(limit))
    except OSError:
        pass
    return int(avail)


def default_workers(cores: int | None = None, memory_bytes: int | None = None) -> int:
    """``--workers auto``: one worker per core this process may run on, but no more than the memory
    holds at ``WORKER_MEMORY_BYTES`` each (at least 1). E.g. 2 cores + 22 GB -> 2; 64 cores +
    128 GB -> 32."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if memory_bytes is None:
        memory_bytes = available_memory_bytes()
    return max(1, min(int(cores), int(memory_bytes // WORKER_MEMORY_BYTES)))


@dataclass
class PrepareOptions:
    layout: str = "auto"  # totalseg | nnunet | auto
    classes: str = "auto"  # auto | totalseg-v1 | totalseg-v2 | stunet (| dataset for nnU-Net)
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    format: str = "both"  # zarr | wds | both
    workers: int | None = 1  # None: default_workers() (the CLI's default, --workers auto)
    threads: int | None = None  # gunzip threads per worker; default cores // workers
    image_interpolation: str = "cubic"  # cubic (order 3, nnU-Net) | linear
    label_interpolation: str = "linear"  # linear (nnU-Net per-label, default) | nearest
    crop: str = "auto"  # auto (body for CT, nonzero otherwise) | body | nonzero | none
    cases_per_shard: int = 4
    shard_index: int | None = None
    num_shards: int | None = None
    finalize: bool = False
    max_quarantine_fraction: float = 0.05
    verify: bool = False  # re-read finished cases fully (checksums) instead of trusting file sizes
    # A quarantined val/test case silently changes what every later Dice is measured on: exit 1
    # (manifest still written, for inspection) unless the user says that is acceptable.
    allow_quarantined_eval: bool = False

    def validate(self) -> None:
        if self.format not in ("zarr", "wds", "both"):
            raise DatasetError(f"--format must be zarr, wds or both, got {self.format!r}")
        if self.image_interpolation not in ("cubic", "linear"):
            raise DatasetError(f"--image-interp must be cubic or linear, got {self.image_interpolation!r}")
        if self.label_interpolation not in ("nearest", "linear"):
            raise DatasetError(f"--label-interp must be nearest or linear, got {self.label_interpolation!r}")
        if self.crop not in ("auto", "body", "nonzero", "none"):
            raise DatasetError(f"--crop must be auto, body, nonzero or none, got {self.crop!r}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise DatasetError(f"--spacing needs 1 or 3 positive values, got {list(self.spacing)}")
        if (self.shard_index is None) != (self.num_shards is None):
            raise DatasetError("--shard-index and --num-shards go together")
        if self.num_shards is not None and not 0 <= self.shard_index < self.num_shards:
            raise DatasetError(f"--shard-index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.finalize and self.shard_index is not None:
            raise DatasetError("--finalize runs once after all slices; drop --shard-index/--num-shards")
        if (self.workers is not None and self.workers < 1) or self.cases_per_shard < 1:
            raise DatasetError("--workers and --cases-per-shard must be >= 1")
        if not 0 <= self.max_quarantine_fraction <= 1:
            raise DatasetError("--max-quarantine-fraction must be in [0, 1]")

    @property
    def zarr(self) -> bool:
        return self.format in ("zarr", "both")

    @property
    def wds(self) -> bool:
        return self.format in ("wds", "both")


# ------------------------------------------------------------------------------------------------
# Paths and small atomic-file helpers
# ------------------------------------------------------------------------------------------------


class Layout:
    """Where everything of one prepare output lives."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.zarr = self.out / st.ZARR_DIR
        self.wds = self.out / st.WDS_DIR
        self.parts = self.out / "parts"
        self.cases = self.parts / "cases"
        self.wds_parts = self.parts / "wds"
        self.shards = self.parts / "shards"
        self.slices = self.parts / "slices"
        self.tmp = self.out / "tmp"
        self.manifest = self.out / st.MANIFEST
        self.quarantine = self.out / st.QUARANTINE

    def make(self) -> None:
        for d in (self.zarr, self.wds, self.cases, self.wds_parts, self.shards, self.slices, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def record(self, case_id: str) -> Path:
        return self.cases / f"{case_id}.json"

    def fg_sample(self, case_id: str) -> Path:
        return self.cases / f"{case_id}.fgsample.npy"

    def wds_part(self, case_id: str) -> Path:
        return self.wds_parts / f"{st.wds_key(case_id)}.tar"

    def tmp_name(self, case_id: str, suffix: str) -> Path:
        return self.tmp / f"{case_id}.{uuid.uuid4().hex[:12]}{suffix}"


_NUMBER_LIST = re.compile(r"\[\s+([-+0-9.eE,\s]+?)\s+\]")


def _write_json_atomic(path: Path, obj, indent: int | None = None) -> None:
    """JSON, written atomically (atomic_files.py). With ``indent``, lists of numbers stay on one line
    (a 1200-case manifest holds ~150k of them)."""
    text = json.dumps(obj, indent=indent, sort_keys=True)
    if indent is not None:
        text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    atomic_write_text(path, text + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an older version is moved aside first, then deleted."""
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _case_seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


# ------------------------------------------------------------------------------------------------
# Parameters, shard plan, slices
# ------------------------------------------------------------------------------------------------


def preprocessing_params(ds: RawDataset, opts: PrepareOptions) -> dict:
    """Everything that changes a case's prepared content. Its hash is part of every case record."""
    crop = opts.crop if opts.crop != "auto" else ("body" if ds.is_ct else "nonzero")
    return {
        "format_version": st.FORMAT_VERSION,
        "layout": ds.layout,
        "class_map": ds.class_map_name,
        "labels": ds.labels,
        "target_spacing": [float(s) for s in opts.spacing],
        "orientation": "RAS",
        "crop": crop,
        "body_threshold_hu": pp.BODY_THRESHOLD_HU if crop == "body" else None,
        "image_interpolation": opts.image_interpolation,
        "label_interpolation": opts.label_interpolation,
        "anisotropy_threshold": pp.ANISO_THRESHOLD,
        "image_dtype": "int16" if ds.is_ct else "float32",
        "label_dtype": str(st.label_dtype(ds.num_classes)),
        "ignore_label": ds.ignore_label,  # nnU-Net v2 semantics: one above the last class
        "overlap_rule": OVERLAP_RULE,
        "fg_locations": {"num_samples": FG_SAMPLES, "min_coverage": FG_MIN_COVERAGE},
        "cases_per_shard": opts.cases_per_shard,
        "codecs": {name: dict(c) for name, c in st.CODECS.items()},  # stored bytes differ by codec
    }


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def plan_shards(cases: Sequence[RawCase], cases_per_shard: int) -> list[dict]:
    """Deterministic WebDataset shard plan: cases sorted by (split, id), consecutive groups of
    ``cases_per_shard`` within a split, so a shard never mixes splits. Quarantined cases keep their
    slot (the plan depends only on the case list, never on processing results)."""
    by_split: dict[str, list[str]] = {}
    for c in sorted(cases, key=lambda c: (c.split, c.case_id)):
        by_split.setdefault(c.split, []).append(c.case_id)
    plan = []
    for split in sorted(by_split):
        ids = by_split[split]
        for i in range(0, len(ids), cases_per_shard):
            k = len(plan)
            plan.append({"index": k, "path": f"{st.WDS_DIR}/shard-{k:06d}.tar", "split": split, "cases": ids[i:i + cases_per_shard]})
    return plan


def slice_of(plan: list[dict], shard_index: int | None, num_shards: int | None) -> list[dict]:
    """The shards a Slurm array task prepares: every ``num_shards``-th, starting at ``shard_index``."""
    if num_shards is None:
        return plan
    return [s for s in plan if s["index"] % num_shards == shard_index]


# ------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------


def _combined_input_hash(shas: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(shas):
        h.update(f"{name}\0{shas[name]}\n".encode())
    return h.hexdigest()


def preprocess_case(loaded, ds: RawDataset, params: dict) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loaded case -> (manifest entry without storage fields, image, label, fg_locations, intensity
    sample). RAS, crop, resample, intensity statistics, class counts, foreground locations."""
    # the same file -> stored-grid code predict runs (an int16 case already at the target spacing stays int16)
    geom, img_s, lab_s = pp.stored_case(loaded.image, loaded.affine, params["target_spacing"], params["crop"],
                                        loaded.label, params["image_interpolation"], params["label_interpolation"])
    clipped = 0
    if params["image_dtype"] == "int16":
        if img_s.dtype != np.int16:
            f = np.rint(img_s) if img_s.dtype.kind == "f" else img_s
            clipped = int(np.count_nonzero((f < -32768) | (f > 32767)))
            img_s = np.clip(f, -32768, 32767).astype(np.int16)
    else:
        img_s = img_s.astype(np.float32, copy=False)
    lab_s = lab_s.astype(st.label_dtype(ds.num_classes), copy=False)
    counts = np.bincount(lab_s.ravel(), minlength=ds.num_classes)[: ds.num_classes]
    fg_rows, fg_ranges = pp.foreground_locations(lab_s, FG_SAMPLES, FG_MIN_COVERAGE, seed=_case_seed(loaded.case_id))
    # The ignore label is not a class to oversample (a forced-foreground patch centred on v2's
    # heart would teach nothing there). It is the highest value, so its rows are the table's last.
    ignored_voxels = int(np.count_nonzero(lab_s == ds.ignore_label)) if ds.ignore_label in fg_ranges else 0
    if ds.ignore_label in fg_ranges:
        fg_rows = fg_rows[: fg_ranges.pop(ds.ignore_label)[0]]
    channels = [img_s] if img_s.ndim == 3 else list(img_s)
    stats = [pp.intensity_stats(c, lab_s) for c in channels]
    # data.normalization=zscore (the default) uses nnU-Net's statistics of the original image, not
    # of the stored crop: see pp.nonzero_zscore_stats and readers.normalization.
    for s, nz in zip(stats, pp.nonzero_zscore_stats(loaded.image)):
        s["nonzero"] = nz
    sample = pp.foreground_sample(channels[0], lab_s, FG_SAMPLES, seed=_case_seed(loaded.case_id))
    entry = {
        "id": loaded.case_id,
        "shape": geom.shape,
        "spacing": geom.spacing,
        "affine": geom.affine,
        "channels": len(channels),
        "image_shape": list(img_s.shape),
        "image_dtype": str(img_s.dtype),
        "label_dtype": str(lab_s.dtype),
        "geometry": geom.to_dict(),
        "intensity": stats[0],
        "intensity_channels": stats if len(stats) > 1 else None,
        "clipped_voxels": clipped,
        "class_voxels": counts.astype(int).tolist(),
        "present_classes": [int(k) for k in np.flatnonzero(counts[1:]) + 1],
        "missing_classes": sorted(int(k) for k in loaded.missing_classes),  # unannotated in this case
        "ignored_voxels": ignored_voxels,  # voxels with the ignore label (not in class_voxels)
        "ignored_masks": loaded.ignored_masks,
        "overlap_voxels": loaded.overlap_voxels,
        "fg_locations": {"rows": int(fg_rows.shape[0]), "ranges": {str(k): v for k, v in fg_ranges.items()}},
        "checksums": {"image": st.array_checksum(img_s), "label": st.array_checksum(lab_s), "fg_locations": st.array_checksum(fg_rows)},
    }
    return entry, img_s, lab_s, fg_rows, sample


def _fault_hook(stage: str, case_id: str = "") -> None:
    # Test-only fault injection (reliability checks 20 and 23), unset in normal use:
    #   STUNET_SCALE_PREPARE_DELAY=<stage>:<seconds>  sleep at a stage, so a test can SIGKILL the run
    #                                                 with partial outputs on disk
    #   STUNET_SCALE_PREPARE_CRASH=<case id>          the worker preparing that case dies (os._exit)
    spec = os.environ.get("STUNET_SCALE_PREPARE_DELAY")
    if spec:
        where, _, secs = spec.partition(":")
        if where == stage:
            time.sleep(float(secs))
    if case_id and os.environ.get("STUNET_SCALE_PREPARE_CRASH") == case_id and _WORKER:
        os._exit(9)


def process_case(case: RawCase, ds: RawDataset, opts: PrepareOptions, params: dict, lay: Layout, shard_path: str, threads: int) -> dict:
    """Prepare one case end to end and write its record last. Returns the record.

    Known defects are quarantined with their reason code; anything unexpected (a bug, an exotic
    file, MemoryError) is quarantined as PREPARE_ERROR with the exception, so one odd case never
    stops a 1200-case build, and the log says what happened.
    """
    try:
        return _process_case(case, ds, opts, params, lay, shard_path, threads)
    except Exception as e:
        import traceback

        log.error(f"{case.case_id}: unexpected error\n{traceback.format_exc()}")
        fp = files_fingerprint(case.input_files(ds))
        return _quarantine(case, lay, params_hash(params), fp, "PREPARE_ERROR", f"{type(e).__name__}: {e}", None, ds)


def _process_case(case, ds, opts, params, lay, shard_path, threads) -> dict:
    t0 = time.perf_counter()
    _fault_hook("start", case.case_id)
    phash = params_hash(params)
    fingerprint = files_fingerprint(case.input_files(ds))
    try:
        loaded = load_case(case, ds, threads)
    except CaseError as e:
        return _quarantine(case, lay, phash, fingerprint, e.code, e.message, e.file, ds)
    input_hash = _combined_input_hash(loaded.input_sha256)
    entry, img, lab, fg_rows, sample = preprocess_case(loaded, ds, params)
    del loaded
    entry["split"] = case.split
    entry["input_sha256"] = input_hash
    entry["wds"] = {"shard": shard_path, "key": st.wds_key(case.case_id)} if opts.wds else None
    attrs = {"case_id": case.case_id, "split": case.split, "shape": entry["shape"], "spacing": entry["spacing"],
             "affine": entry["affine"], "fg_ranges": entry["fg_locations"]["ranges"], "format_version": st.FORMAT_VERSION}
    zarr_files = None
    if opts.zarr:
        tmp = lay.tmp_name(case.case_id, ".zarr")
        zarr_files = store_writer.write_case_zarr(tmp, img, lab, fg_rows, attrs)
        _fault_hook("zarr-written")
        _replace_dir(tmp, lay.zarr / case.case_id)
    entry["zarr_files"] = zarr_files
    wds_bytes = None
    if opts.wds:
        tmp = lay.tmp_name(case.case_id, ".tar")
        store_writer.write_tar(tmp, store_writer.encode_wds_case(case.case_id, img, lab, fg_rows, entry))
        os.replace(tmp, lay.wds_part(case.case_id))
        wds_bytes = lay.wds_part(case.case_id).stat().st_size
    np.save(lay.fg_sample(case.case_id), sample)
    _fault_hook("before-record")
    record = {
        "status": "ok", "id": case.case_id, "params_sha256": phash, "files": fingerprint,
        "input_files_sha256": entry["input_sha256"], "entry": entry, "wds_part_bytes": wds_bytes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _write_json_atomic(lay.record(case.case_id), record)
    return record


def _quarantine(case: RawCase, lay: Layout, phash: str, fingerprint, code: str, message: str, file, ds: RawDataset) -> dict:
    rel = None
    if file is not None:
        try:
            rel = Path(file).resolve().relative_to(ds.root).as_posix()
        except ValueError:
            rel = str(file)
    # a case that used to be fine and is now broken must not leave its old outputs behind
    shutil.rmtree(lay.zarr / case.case_id, ignore_errors=True)
    lay.wds_part(case.case_id).unlink(missing_ok=True)
    record = {
        "status": "quarantined", "id": case.case_id, "params_sha256": phash, "files": fingerprint,
        "quarantine": {"id": case.case_id, "split": case.split, "reason": code, "message": message, "file": rel},
    }
    _write_json_atomic(lay.record(case.case_id), record)
    return record


def case_is_done(case: RawCase, ds: RawDataset, opts: PrepareOptions, phash: str, lay: Layout, shard_records: dict) -> bool:
    """A record with the same parameters and input content, and its outputs present (sizes match;
    full checksums with ``--verify``)."""
    rec = _read_json(lay.record(case.case_id))
    if not rec or rec.get("params_sha256") != phash:
        return False
    if rec["status"] != "ok" and rec["quarantine"]["reason"] in RETRIED_REASONS:
        return False
    files = case.input_files(ds)
    fingerprint = files_fingerprint(files)
    if fingerprint != rec.get("files"):
        # sizes/mtimes changed (copied, touched): compare content hashes before redoing the work
        if rec["status"] != "ok":
            return False
        shas = {p.relative_to(ds.root).as_posix(): _sha256_file(p) for p in files}
        if _combined_input_hash(shas) != rec["entry"]["input_sha256"]:
            return False
        rec["files"] = fingerprint
        _write_json_atomic(lay.record(case.case_id), rec)
    if rec["status"] == "quarantined":
        return True
    entry = rec["entry"]
    if opts.zarr:
        if not entry.get("zarr_files"):
            return False
        base = lay.zarr / case.case_id
        for key, size in entry["zarr_files"].items():
            p = base / key
            if not p.is_file() or p.stat().st_size != size:
                return False
        if opts.verify and not _verify_zarr_case(lay, case.case_id, entry):
            log.warning(f"{case.case_id}: stored arrays do not match their checksums; preparing it again")
            return False
    if opts.wds:
        part = lay.wds_part(case.case_id)
        if part.is_file():
            if part.stat().st_size != rec.get("wds_part_bytes"):
                return False
        else:
            srec = shard_records.get(entry["wds"]["shard"]) if entry.get("wds") else None
            if not srec or srec["case_inputs"].get(case.case_id) != entry["input_sha256"]:
                return False
            p = lay.out / srec["path"]
            if not p.is_file() or p.stat().st_size != srec["bytes"]:
                return False
    return True


def _verify_zarr_case(lay: Layout, case_id: str, entry: dict) -> bool:
    import zarr

    try:
        g = zarr.open_group(str(lay.zarr / case_id), mode="r")
        return all(st.array_checksum(np.asarray(g[n][...])) == entry["checksums"][n] for n in st.ARRAYS)
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------
# WebDataset shards
# ------------------------------------------------------------------------------------------------


def _shard_record_path(lay: Layout, shard: dict) -> Path:
    return lay.shards / f"shard-{shard['index']:06d}.json"


def assemble_shard(shard: dict, lay: Layout, records: dict[str, dict], phash: str) -> dict | None:
    """Concatenate the per-case tars of a finished shard group into ``wds/shard-NNNNNN.tar``.

    A case whose part was already consumed by an earlier build of this shard is copied from that
    shard (only when its input hash is unchanged). Returns the shard record, or None when the
    group has no prepared case.
    """
    old = _read_json(_shard_record_path(lay, shard))
    ok = [c for c in shard["cases"] if records[c]["status"] == "ok"]
    inputs = {c: records[c]["entry"]["input_sha256"] for c in ok}
    final = lay.out / shard["path"]
    if old and old.get("params_sha256") == phash and old["case_inputs"] == inputs and (
        not ok or (final.is_file() and final.stat().st_size == old["bytes"])
    ) and not any(lay.wds_part(c).exists() for c in ok):
        return old if ok else None
    if not ok:
        final.unlink(missing_ok=True)
        _write_json_atomic(_shard_record_path(lay, shard), {"path": shard["path"], "case_inputs": {}, "params_sha256": phash, "bytes": 0})
        return None
    previous = {}
    if old and final.is_file():
        try:
            for name, data in st.read_tar_members(final):
                previous.setdefault(name.partition(".")[0], []).append((name, data))
        except st.StoreIntegrityError:
            previous = {}
    members = []
    for c in ok:
        part = lay.wds_part(c)
        if part.is_file():
            members += st.read_tar_members(part)
        elif old and old["case_inputs"].get(c) == inputs[c] and st.wds_key(c) in previous:
            members += previous[st.wds_key(c)]
        else:
            raise st.StoreIntegrityError(f"case {c!r}: its WebDataset part is gone and shard {final} does not hold it; re-run prepare")
    tmp = lay.tmp_name(f"shard-{shard['index']:06d}", ".tar")
    store_writer.write_tar(tmp, members)
    os.replace(tmp, final)
    rec = {"path": shard["path"], "split": shard["split"], "cases": ok, "case_inputs": inputs, "params_sha256": phash,
           "bytes": final.stat().st_size, "sha256": _sha256_file(final)}
    _write_json_atomic(_shard_record_path(lay, shard), rec)
    for c in ok:
        lay.wds_part(c).unlink(missing_ok=True)
    return rec


# ------------------------------------------------------------------------------------------------
# Running many cases
# ------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(ds, opts, params, out, threads):
    exit_with_parent("stunet-scale prepare")  # a killed prepare must not leave workers writing into `out`
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        import numcodecs

        numcodecs.blosc.set_nthreads(1)
    except Exception:
        pass
    _WORKER.update(ds=ds, opts=opts, params=params, lay=Layout(out), threads=threads, cases={c.case_id: c for c in ds.cases})


def _worker_run(case_id: str, shard_path: str) -> dict:
    w = _WORKER
    return process_case(w["cases"][case_id], w["ds"], w["opts"], w["params"], w["lay"], shard_path, w["threads"])


def _describe(rec: dict) -> str:
    if rec["status"] == "ok":
        e = rec["entry"]
        return f"ok {'x'.join(map(str, e['shape']))} ({rec.get('seconds', 0):.1f} s)"
    q = rec["quarantine"]
    return f"QUARANTINED {q['reason']}: {q['message']}"


def _run_cases(todo: list[tuple[RawCase, str]], ds, opts, params, lay, threads, on_done) -> None:
    """Run ``process_case`` over ``todo``, in-process (1 worker) or on a spawn pool; ``on_done(rec)``
    is called in this process as each case finishes. A worker that dies (e.g. OOM-killed) breaks
    the pool: it is restarted, and a case that was in flight during two such deaths is quarantined."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="case", disable=None, file=sys.stderr, dynamic_ncols=True)
    n_done = [0]

    def report(rec):
        n_done[0] += 1
        if bar.disable:
            log.info(f"[{n_done[0]}/{len(todo)}] {rec['id']} {_describe(rec)}")
        else:
            bar.update(1)
            if rec["status"] != "ok":
                bar.write(f"{rec['id']} {_describe(rec)}")
        on_done(rec)

    try:
        if opts.workers == 1 or len(todo) <= 1:
            for case, shard_path in todo:
                report(process_case(case, ds, opts, params, lay, shard_path, threads))
            return
        import collections
        import multiprocessing as mp

        crashes: dict[str, int] = {}
        queue = collections.deque(todo)
        phash = params_hash(params)
        while queue:
            pool = ProcessPoolExecutor(opts.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                       initargs=(ds, opts, params, lay.out, threads), max_tasks_per_child=50)
            # At most one case per worker in flight, so a pool death implicates only running cases;
            # a case that was running during a death runs alone next time, so it alone is blamed.
            inflight: dict = {}
            suspect = lambda c: crashes.get(c.case_id, 0) > 0  # noqa: E731
            try:
                while queue or inflight:
                    while queue and len(inflight) < opts.workers:
                        if any(suspect(c) for c, _ in inflight.values()) or (inflight and suspect(queue[0][0])):
                            break
                        c, s = queue.popleft()
                        inflight[pool.submit(_worker_run, c.case_id, s)] = (c, s)
                    done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                    for f in done:
                        rec = f.result()
                        inflight.pop(f)
                        report(rec)
            except BrokenProcessPool:
                for f, (c, s) in inflight.items():
                    if f.done() and f.exception() is None:
                        report(f.result())
                        continue
                    crashes[c.case_id] = crashes.get(c.case_id, 0) + 1
                    if crashes[c.case_id] >= 2:
                        report(_quarantine(c, lay, phash, files_fingerprint(c.input_files(ds)), "WORKER_CRASHED",
                                           "a worker process died twice while preparing this case (out of memory?)", None, ds))
                    else:
                        queue.appendleft((c, s))
                log.warning(f"a worker process died; restarting the pool for {len(queue)} case(s)")
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def prepare_dataset(source: str | Path, out: str | Path, options: PrepareOptions | None = None, **kw) -> dict:
    """Prepare ``source`` into ``out`` (the Python API behind ``stunet-scale prepare``).

    ``options`` or keyword arguments of ``PrepareOptions`` (``spacing`` may be one number).
    Without ``shard_index``/``num_shards`` it prepares every case and finalizes; with them only
    that slice (no manifest); with ``finalize=True`` it only merges and checks. Returns a summary
    dict with ``exit_code`` (0, or 1 when too many cases were quarantined), ``manifest`` (path or
    None), and counts. Raises ``DatasetError`` for dataset-level problems.
    """
    opts = options or PrepareOptions()
    for k, v in kw.items():
        if not hasattr(opts, k):
            raise TypeError(f"unknown prepare option {k!r}")
        setattr(opts, k, v)
    if isinstance(opts.spacing, (int, float)):
        opts.spacing = (float(opts.spacing),) * 3
    opts.spacing = tuple(float(s) for s in (opts.spacing * 3 if len(opts.spacing) == 1 else opts.spacing))
    opts.validate()
    if opts.workers is None:
        opts.workers = default_workers()
        log.info(f"--workers auto: {opts.workers} (cores, and {WORKER_MEMORY_BYTES / 2**30:.0f} GiB of memory per worker)")
    t0 = time.perf_counter()
    ds = open_source(source, opts.layout, opts.classes)
    if not ds.cases:
        raise DatasetError(f"{ds.root}: no cases found")
    keys = {}
    for c in ds.cases:
        k = st.wds_key(c.case_id)
        if k in keys:
            raise DatasetError(f"case ids {keys[k]!r} and {c.case_id!r} collide as WebDataset keys; rename one")
        keys[k] = c.case_id
    lay = Layout(out)
    lay.make()
    params = preprocessing_params(ds, opts)
    phash = params_hash(params)
    _check_params_file(lay, params, phash)
    log.info(f"source {ds.root} ({ds.layout}, {len(ds.cases)} cases), class map {ds.class_map_name} "
             f"({ds.num_classes} labels), spacing {list(opts.spacing)} mm, format {opts.format}")
    for note in ds.notes:
        log.info(note)
    plan = plan_shards(ds.cases, opts.cases_per_shard)
    if opts.finalize:
        return finalize(ds, opts, params, lay, plan, t0)

    mine = slice_of(plan, opts.shard_index, opts.num_shards)
    by_id = {c.case_id: c for c in ds.cases}
    my_cases = [(by_id[cid], s["path"]) for s in mine for cid in s["cases"]]
    if opts.num_shards is not None:
        log.info(f"slice {opts.shard_index} of {opts.num_shards}: {len(mine)} shard group(s), {len(my_cases)} case(s)")
    _clean_tmp(lay, {c.case_id for c, _ in my_cases} | {f"shard-{s['index']:06d}" for s in mine})
    shard_records = {s["path"]: _read_json(_shard_record_path(lay, s)) for s in mine}
    shard_records = {k: v for k, v in shard_records.items() if v}
    todo = [(c, s) for c, s in my_cases if not case_is_done(c, ds, opts, phash, lay, shard_records)]
    skipped = len(my_cases) - len(todo)
    if skipped:
        log.info(f"{skipped} case(s) already prepared with the same inputs and parameters: skipped")
    cpu = os.cpu_count() or 1
    threads = opts.threads or max(1, min(4, cpu // opts.workers))

    records: dict[str, dict] = {}
    todo_ids = {c.case_id for c, _ in todo}
    for c, _ in my_cases:
        if c.case_id not in todo_ids:
            records[c.case_id] = _read_json(lay.record(c.case_id))
    shard_of = {cid: s for s in mine for cid in s["cases"]}

    def on_done(rec):
        records[rec["id"]] = rec
        s = shard_of[rec["id"]]
        if opts.wds and all(cid in records for cid in s["cases"]):
            assemble_shard(s, lay, records, phash)

    _run_cases(todo, ds, opts, params, lay, threads, on_done)
    if opts.wds:  # shards whose cases were all skipped may still need (re)assembly
        for s in mine:
            assemble_shard(s, lay, records, phash)
    n_q = sum(1 for r in records.values() if r["status"] != "ok")
    summary = {"prepared": len(todo) - sum(1 for c, _ in todo if records[c.case_id]["status"] != "ok"),
               "skipped": skipped, "quarantined": n_q, "cases": len(my_cases)}
    if opts.num_shards is not None:
        _write_json_atomic(lay.slices / f"slice-{opts.shard_index:05d}-of-{opts.num_shards:05d}.json",
                           {"shard_index": opts.shard_index, "num_shards": opts.num_shards, "params_sha256": phash,
                            "shards": [s["path"] for s in mine], "cases": sorted(records)})
        log.info(f"slice {opts.shard_index}/{opts.num_shards} done: {summary}; run with --finalize after all slices")
        return {**summary, "manifest": None, "exit_code": 0, "seconds": time.perf_counter() - t0}
    return finalize(ds, opts, params, lay, plan, t0, summary)


def _check_params_file(lay: Layout, params: dict, phash: str) -> None:
    path = lay.parts / "params.json"
    old = _read_json(path)
    if old and old.get("sha256") != phash:
        changed = sorted(k for k in params if old["params"].get(k) != params[k])
        log.warning(f"{lay.out} was prepared with different parameters ({', '.join(changed)}); every case is prepared again")
    if not old or old.get("sha256") != phash:
        _write_json_atomic(path, {"sha256": phash, "params": params})


def _clean_tmp(lay: Layout, names: set[str]) -> None:
    """Remove leftovers of killed runs for this slice's cases only (other slices may be running)."""
    for p in lay.tmp.iterdir():
        if p.name.split(".")[0] in names or p.name.rsplit(".", 2)[0] in names:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in lay.zarr.glob(".*.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def software_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("stunet-scale", "numpy", "scipy", "nibabel", "zarr", "numcodecs", "webdataset", "crc32c"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def pooled_intensity(samples: list[np.ndarray]) -> dict | None:
    """nnU-Net's dataset fingerprint statistics over the pooled foreground samples."""
    if not samples or not any(s.size for s in samples):
        return None
    v = np.concatenate(samples).astype(np.float64)
    return {**pp.fg_stats(v), "num_samples": int(v.size)}


def finalize(ds: RawDataset, opts: PrepareOptions, params: dict, lay: Layout, plan: list[dict], t0: float,
             summary: dict | None = None) -> dict:
    """Check every case has a record of these parameters and every shard is built, then write
    quarantine.jsonl and (last) manifest.json. Raises DatasetError naming what is missing."""
    phash = params_hash(params)
    records, missing = {}, []
    for c in ds.cases:
        rec = _read_json(lay.record(c.case_id))
        if not rec or rec.get("params_sha256") != phash:
            missing.append(c.case_id)
        else:
            records[c.case_id] = rec
    if missing:
        slices = [s for s in (_read_json(p) for p in sorted(lay.slices.glob("slice-*.json"))) if s]
        hint = ""
        if slices:
            n = slices[0]["num_shards"]
            idx = {s["index"] % n for s in plan if any(c in missing for c in s["cases"])}
            hint = f"; re-run array task(s) --shard-index {sorted(idx)} --num-shards {n}"
        raise DatasetError(f"{len(missing)} case(s) not prepared (with these parameters): {missing[:10]}{'...' if len(missing) > 10 else ''}{hint}")
    shards = []
    if opts.wds:
        for s in plan:
            rec = assemble_shard(s, lay, records, phash)
            if rec:
                shards.append({"path": rec["path"], "split": rec["split"], "cases": rec["cases"], "bytes": rec["bytes"], "sha256": rec["sha256"]})
    ok = sorted(c for c, r in records.items() if r["status"] == "ok")
    quarantined = sorted(c for c, r in records.items() if r["status"] != "ok")
    if opts.zarr:
        _finalize_zarr(lay, set(ok))
    cases = {}
    for c in ok:
        e = dict(records[c]["entry"])
        if not opts.zarr:
            e["zarr_files"] = None
        if not opts.wds:
            e["wds"] = None
        cases[c] = e
    samples = [np.load(lay.fg_sample(c)) for c in ok if lay.fg_sample(c).is_file()]
    n = ds.num_classes
    present = np.zeros(n, dtype=np.int64)
    missing_counts = np.zeros(n, dtype=np.int64)
    voxels = np.zeros(n, dtype=np.int64)
    for e in cases.values():
        present[e["present_classes"]] += 1
        missing_counts[e["missing_classes"]] += 1
        voxels += np.asarray(e["class_voxels"], dtype=np.int64)
    ignored = sorted({m for e in cases.values() for m in e["ignored_masks"]})
    missing_everywhere = [ds.labels[k] for k in range(1, n) if cases and missing_counts[k] == len(cases)]
    reasons: dict[str, int] = {}
    qlines = []
    for c in quarantined:
        q = records[c]["quarantine"]
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
        qlines.append(json.dumps(q, sort_keys=True))
    splits: dict[str, int] = {}
    for e in cases.values():
        splits[e["split"]] = splits.get(e["split"], 0) + 1
    manifest = {
        "format": st.FORMAT_NAME,
        "format_version": st.FORMAT_VERSION,
        "source": {"path": str(ds.root), "layout": ds.layout, "splits_from": ds.split_source, "num_cases": len(ds.cases)},
        "class_map": {
            "name": ds.class_map_name, "labels": ds.labels, "num_classes": n,
            "missing_in_every_case": missing_everywhere, "ignored_masks": ignored,
            # voxels of a source class with no class in the map (ignored_masks) carry this value; a
            # case's missing_classes are unannotated there. Loss and validation skip both.
            "ignore_label": ds.ignore_label,
        },
        "preprocessing": params,
        "storage": {
            "zarr": st.ZARR_DIR if opts.zarr else None,
            "wds": st.WDS_DIR if opts.wds else None,
            "chunks": [st.CHUNK] * 3,
            "codecs": store_writer.manifest_codecs(),
            "image_fill_value": st.IMAGE_FILL if params["image_dtype"] == "int16" else 0,
            "array_checksums": "crc32c of the decoded array's C-order little-endian bytes",
        },
        "intensity": {"foreground": pooled_intensity(samples)},
        "stats": {
            "splits": dict(sorted(splits.items())),
            "class_cases_present": present.tolist(),
            "class_cases_missing": missing_counts.tolist(),
            "class_voxels": voxels.tolist(),
        },
        "num_cases": len(cases),
        "cases": cases,
        "wds_shards": shards,
        "quarantine": {"count": len(quarantined), "reasons": dict(sorted(reasons.items())),
                       "cases": {c: records[c]["quarantine"]["reason"] for c in quarantined}},
        "software": software_versions(),
    }
    atomic_write_text(lay.quarantine, "".join(line + "\n" for line in qlines))
    _write_json_atomic(lay.manifest, manifest, indent=1)
    frac = len(quarantined) / max(1, len(ds.cases))
    for code, k in sorted(reasons.items()):
        log.warning(f"quarantined {k} case(s) with {code} ({REASONS.get(code, '')}); see {lay.quarantine}")
    if missing_everywhere:
        log.info(f"classes missing in every case (recorded per case as missing): {', '.join(missing_everywhere)}")
    exit_code = 0
    eval_quarantined = [c for c in quarantined if records[c]["quarantine"]["split"] in ("val", "test")]
    if eval_quarantined:
        listed = ", ".join(f"{c} ({records[c]['quarantine']['split']}: {records[c]['quarantine']['reason']})" for c in eval_quarantined)
        if opts.allow_quarantined_eval:
            log.warning(f"{len(eval_quarantined)} val/test case(s) quarantined, allowed by --allow-quarantined-eval: {listed}")
        else:
            log.error(f"{len(eval_quarantined)} val/test case(s) quarantined: {listed}. Validation and test scores would be "
                      f"measured on fewer cases than the split names; fix the inputs listed in {lay.quarantine}, or pass "
                      "--allow-quarantined-eval to accept the smaller evaluation set")
            exit_code = 1
    if frac > opts.max_quarantine_fraction:
        log.error(f"{len(quarantined)}/{len(ds.cases)} cases ({frac:.1%}) quarantined, above --max-quarantine-fraction "
                  f"{opts.max_quarantine_fraction:.1%}; fix the inputs listed in {lay.quarantine} or raise the limit")
        exit_code = 1
    secs = time.perf_counter() - t0
    log.info(f"wrote {lay.manifest}: {len(cases)} case(s), {len(quarantined)} quarantined, {len(shards)} shard(s), {secs:.1f} s")
    return {**(summary or {}), "cases": len(ds.cases), "ok": len(cases), "quarantined": len(quarantined),
            "quarantined_eval": eval_quarantined, "manifest": str(lay.manifest), "exit_code": exit_code, "seconds": secs}


def _finalize_zarr(lay: Layout, ok: set[str]) -> None:
    import warnings

    import zarr

    for d in lay.zarr.iterdir():
        if d.is_dir() and d.name not in ok:
            log.info(f"removing {d} (not a prepared case of this build)")
            shutil.rmtree(d, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.open_group(str(lay.zarr), mode="a", zarr_format=3)
        zarr.consolidate_metadata(str(lay.zarr))
