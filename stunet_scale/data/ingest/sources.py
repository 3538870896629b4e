"""Raw datasets: TotalSegmentator and nnU-Net raw layouts, case discovery, validated NIfTI reading.

Two layouts are understood:

* **TotalSegmentator**: ``ROOT/sXXXX/ct.nii.gz`` + ``ROOT/sXXXX/segmentations/<class>.nii.gz`` (one
  binary mask per class, empty when the structure is absent) + ``ROOT/meta.csv`` (``;``-separated,
  maybe with a UTF-8 BOM; columns ``image_id`` and ``split`` in train/val/test).
* **nnU-Net raw**: ``dataset.json`` (``labels``, ``channel_names``, ``file_ending``),
  ``imagesTr/<case>_0000.nii.gz`` (``_0001``... for more channels), ``labelsTr/<case>.nii.gz``.

Every file is read completely (gzip CRC and length verified) and checked before use. A defect
raises ``CaseError(code, message, file)``; ``prepare`` quarantines the case with that reason code.
"""

from __future__ import annotations

import collections
import csv
import gzip
import hashlib
import io
import itertools
import json
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..class_maps import CLASS_MAP_FILES, detect_class_map, load_class_map, source_correspondence
from .preprocess import affines_close, orthonormality_error

log = logging.getLogger("stunet_scale.prepare")

# Reason codes of quarantine.jsonl. Each is tested with a synthetic bad file (tests/test_prepare_quarantine.py).
REASONS = {
    "MISSING_IMAGE": "the CT / an image channel file does not exist",
    "MISSING_LABEL": "no label: nnU-Net label file absent, or no TotalSegmentator mask file at all",
    "IO_CORRUPT": "unreadable file: truncated, not gzip, CRC/length error, bad header, short data",
    "IMAGE_2D": "image has fewer than 3 spatial dimensions",
    "IMAGE_4D": "image has a 4th dimension with more than one volume",
    "NON_ORTHONORMAL": "direction cosines are not orthonormal (shear) or a voxel size is zero",
    "QFORM_SFORM_MISMATCH": "qform and sform are both set and describe different grids",
    "SHAPE_MISMATCH": "a label/mask/channel grid has a different shape than the image",
    "AFFINE_MISMATCH": "a label/mask/channel has a different affine than the image",
    "NONFINITE": "NaN or Inf voxels",
    "LABEL_NON_INTEGRAL": "label/mask values that are not whole numbers",
    "LABEL_OUT_OF_RANGE": "label values outside the class map (mask values other than 0/1)",
    "WORKER_CRASHED": "the worker process died twice while preparing this case (out of memory?)",
    "PREPARE_ERROR": "an unexpected error while preparing the case (message has the exception; please report it)",
}

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ORTHONORMAL_TOL = 1e-3  # ~0.06 degrees of shear; float32 headers of real scans stay far below it
AFFINE_TOL = 1e-3  # direction cosines, relative spacing, and origin in voxels (see affines_close)


def _gzip_decoders() -> dict[str, tuple[str, Callable[[bytes], bytes]]]:
    """The fastest installed gzip decoder per file role, by measurement (all verify CRC and length).

    Measured on a 512x512x400 demo case at 0.8 mm (one core, best of 3; ``tests/test_prepare_fullsize.py``
    checks that all three agree and reject a bad CRC): the CT (103 MB -> 210 MB) stdlib 1148 ms,
    isal's igzip 751 ms, zlib-ng 927 ms; a mask (0.1-0.6 MB -> 105 MB, mostly zeros) stdlib 352-390 ms,
    igzip 168-184 ms, zlib-ng 144-167 ms. Both packages are optional: without them the standard
    library decodes (2-2.5x slower per mask)."""
    found: dict[str, Callable[[bytes], bytes]] = {"stdlib": gzip.decompress}
    try:
        from zlib_ng import gzip_ng

        found["zlib-ng"] = gzip_ng.decompress
    except ImportError:
        pass
    try:
        from isal import igzip

        found["isal"] = igzip.decompress
    except ImportError:
        pass
    prefer = {"image": ("isal", "zlib-ng", "stdlib"), "mask": ("zlib-ng", "isal", "stdlib")}
    return {role: next((n, found[n]) for n in order if n in found) for role, order in prefer.items()}


GZIP_DECODERS = _gzip_decoders()


def gunzip(raw: bytes, role: str = "image") -> bytes:
    """Decompress a whole gzip file with the fastest installed decoder for ``role`` (``mask`` or
    anything else: ``image``). Raises what ``gzip.decompress`` raises (OSError, EOFError, zlib.error)."""
    return GZIP_DECODERS["mask" if role == "mask" else "image"][1](raw)


def gzip_payload(raw: bytes) -> memoryview | None:
    """The bytes of a gzip file after its first member header (deflate stream, CRC, length, and any
    further members), or None when the header cannot be parsed. Two files with the same payload
    decompress to the same bytes whatever their header says (name, mtime): the key of
    ``load_case``'s empty-mask shortcut. RFC 1952: 10 fixed bytes, then optional fields by flag."""
    if len(raw) < 18 or raw[:3] != b"\x1f\x8b\x08":
        return None
    flags, pos = raw[3], 10
    if flags & 4:  # FEXTRA: 2-byte length, then that many bytes
        if len(raw) < pos + 2:
            return None
        pos += 2 + int.from_bytes(raw[pos:pos + 2], "little")
    for bit in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & bit:
            end = raw.find(b"\x00", pos)
            if end < 0:
                return None
            pos = end + 1
    if flags & 2:  # FHCRC
        pos += 2
    return memoryview(raw)[pos:] if pos < len(raw) else None


class CaseError(Exception):
    """A per-case defect: quarantined with ``code`` (a key of ``REASONS``), never a crash."""

    def __init__(self, code: str, message: str, file: str | Path | None = None):
        assert code in REASONS, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.file = str(file) if file is not None else None


class DatasetError(Exception):
    """A dataset-level problem (bad dataset.json, unknown class map...): stop with this message."""


# ------------------------------------------------------------------------------------------------
# NIfTI reading with validation
# ------------------------------------------------------------------------------------------------


@dataclass
class Nifti:
    path: Path
    data: np.ndarray  # as stored (scaled by nibabel if the header has a slope/intercept)
    affine: np.ndarray
    sha256: str
    header: object = None  # nibabel Nifti1Header/Nifti2Header: predict writes its output with these qform/sform codes

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


def read_nifti(path: Path, role: str = "image") -> Nifti:
    """Read a whole NIfTI file and check its container and geometry.

    The bytes are read at once, hashed (sha256, for resume-by-content) and gunzipped in full, so a
    truncated file, a wrong gzip CRC or length, or a non-gzip ``.nii.gz`` is always caught
    (nibabel's lazy reader can stop before the gzip trailer). Raises ``CaseError``.
    ``role`` is ``image`` (ndim checks) or ``label``/``mask`` (must be 3-D).
    """
    import nibabel as nib

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CaseError("MISSING_LABEL" if role != "image" else "MISSING_IMAGE", f"{path} does not exist", path) from None
    except OSError as e:
        raise CaseError("IO_CORRUPT", f"cannot read {path}: {e}", path) from e
    sha = hashlib.sha256(raw).hexdigest()
    if path.name.endswith(".gz"):
        if raw[:2] != b"\x1f\x8b":
            raise CaseError("IO_CORRUPT", f"{path.name} is not gzip-compressed (starts with {raw[:4]!r})", path)
        try:
            raw = gunzip(raw, role)
        except (OSError, EOFError, zlib.error) as e:
            raise CaseError("IO_CORRUPT", f"{path.name}: gzip stream is truncated or corrupt ({e})", path) from e
    try:
        if len(raw) < 348:
            raise ValueError(f"only {len(raw)} bytes, shorter than a NIfTI header")
        sizeof = int(np.frombuffer(raw[:4], "<i4")[0])
        klass = nib.Nifti2Image if sizeof in (540, int.from_bytes((540).to_bytes(4, "little"), "big")) else nib.Nifti1Image
        img = klass.from_bytes(raw)
        hdr = img.header
        expected = int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape(), dtype=np.int64)) * hdr.get_data_dtype().itemsize
        if len(raw) < expected:
            raise ValueError(f"data is {len(raw)} bytes, header needs {expected}")
        slope, inter = hdr.get_slope_inter()
        proxy = img.dataobj
        if role == "mask" and slope in (None, 1) and inter in (None, 0) and getattr(proxy, "order", None) == "F":
            # a read-only view of the decompressed bytes in the file's own (Fortran) voxel order:
            # no copy of a 100-260 MB mask (nibabel's reader copies it once more). The proxy's
            # offset, not the header's vox_offset (0 in files nibabel's to_bytes wrote; data at 352)
            data = np.frombuffer(raw, dtype=proxy.dtype, count=int(np.prod(proxy.shape, dtype=np.int64)),
                                 offset=int(proxy.offset)).reshape(proxy.shape, order="F")
        else:
            data = np.asanyarray(img.dataobj)
    except CaseError:
        raise
    except Exception as e:
        raise CaseError("IO_CORRUPT", f"{path.name}: not a readable NIfTI ({type(e).__name__}: {e})", path) from e
    # dimensionality
    shape = data.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    data = data.reshape(shape, order="F") if shape != data.shape else data  # a view for the Fortran-order file data
    if len(shape) < 3:
        if role == "image":
            raise CaseError("IMAGE_2D", f"{path.name} has shape {shape}, expected 3-D", path)
        raise CaseError("SHAPE_MISMATCH", f"{path.name} has shape {shape}, expected 3-D", path)
    if len(shape) > 3:
        if role == "image":
            raise CaseError("IMAGE_4D", f"{path.name} has shape {shape}: a 4-D series, expected one 3-D volume", path)
        raise CaseError("SHAPE_MISMATCH", f"{path.name} has shape {shape}, expected 3-D", path)
    affine = np.asarray(img.affine, dtype=np.float64)
    err = orthonormality_error(affine)
    if not err <= ORTHONORMAL_TOL:
        raise CaseError(
            "NON_ORTHONORMAL",
            f"{path.name}: direction cosines are not orthonormal (max |D^T D - I| = {err:.3g} > {ORTHONORMAL_TOL}); "
            "the scan is sheared or a voxel size is 0. Resample it to an orthonormal grid first",
            path,
        )
    q, qcode = hdr.get_qform(coded=True)
    s, scode = hdr.get_sform(coded=True)
    if qcode and scode and q is not None and s is not None and not affines_close(q, s, AFFINE_TOL):
        raise CaseError(
            "QFORM_SFORM_MISMATCH",
            f"{path.name}: qform (code {int(qcode)}, {''.join(nib.aff2axcodes(q))}) and sform (code {int(scode)}, "
            f"{''.join(nib.aff2axcodes(s))}) describe different grids; readers would disagree on orientation. "
            "Fix the header (e.g. set qform = sform) and re-run",
            path,
        )
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise CaseError("NONFINITE", f"{path.name}: {bad} NaN/Inf voxel(s)", path)
    return Nifti(path, data, affine, sha, hdr)


def check_same_grid(ref: Nifti, other: Nifti) -> None:
    """SHAPE_MISMATCH / AFFINE_MISMATCH unless ``other`` lies on ``ref``'s voxel grid."""
    if other.shape != ref.shape:
        raise CaseError("SHAPE_MISMATCH", f"{other.path.name} has shape {other.shape}, {ref.path.name} has {ref.shape}", other.path)
    if not affines_close(ref.affine, other.affine, AFFINE_TOL):
        diff = np.abs(ref.affine - other.affine).max()
        raise CaseError(
            "AFFINE_MISMATCH",
            f"{other.path.name} and {ref.path.name} have different affines (max difference {diff:.4g}); "
            "the label would be misplaced",
            other.path,
        )


def check_label_values(nii: Nifti, allowed_max: int, allowed: set[int] | None = None) -> np.ndarray:
    """Integer label array from a label/mask file: integral, 0..allowed_max (or in ``allowed``).

    Returns the data as the smallest fitting unsigned dtype (no copy when already so).
    """
    data = nii.data
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise CaseError("LABEL_NON_INTEGRAL", f"{nii.path.name}: label values are not whole numbers", nii.path)
    elif data.dtype.kind not in "iub":
        raise CaseError("LABEL_NON_INTEGRAL", f"{nii.path.name}: label dtype {data.dtype} is not numeric", nii.path)
    if data.size == 0:
        return data.astype(np.uint8)
    lo, hi = (data.min(), data.max()) if data.dtype.kind != "u" else (0, data.max())
    if lo < 0 or hi > allowed_max:
        raise CaseError(
            "LABEL_OUT_OF_RANGE",
            f"{nii.path.name}: label values span [{lo:g}, {hi:g}], allowed 0..{allowed_max}",
            nii.path,
        )
    out_dtype = np.uint8 if allowed_max <= 255 else np.uint16
    out = data if data.dtype == out_dtype else data.astype(out_dtype)
    if allowed is not None:
        present = set(np.unique(out).tolist())
        extra = sorted(present - allowed)
        if extra:
            raise CaseError("LABEL_OUT_OF_RANGE", f"{nii.path.name}: label values {extra} are not in dataset.json", nii.path)
    return out


# ------------------------------------------------------------------------------------------------
# Datasets and cases
# ------------------------------------------------------------------------------------------------


@dataclass
class RawCase:
    case_id: str
    split: str
    image_files: list[Path]  # one per channel; may not exist (MISSING_IMAGE)
    label_file: Path | None = None  # nnU-Net
    mask_dir: Path | None = None  # TotalSegmentator segmentations/

    def input_files(self, dataset: RawDataset) -> list[Path]:
        """The files the case is built from (those that exist), for resume fingerprints."""
        files = [p for p in self.image_files if p.exists()]
        if self.label_file is not None and self.label_file.exists():
            files.append(self.label_file)
        if self.mask_dir is not None and self.mask_dir.is_dir():
            # every mask file: one the class map lacks is read too (its voxels get the ignore label)
            files += sorted(p for p in self.mask_dir.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        return files


@dataclass
class RawDataset:
    root: Path
    layout: str  # totalseg | nnunet
    cases: list[RawCase]
    class_map_name: str
    labels: list[str]  # labels[k] = name of label value k in the prepared store
    is_ct: bool
    split_source: str  # meta.csv | splits_final.json (fold 0) | default
    # TotalSegmentator: mask file stem per label value (None = no mask for it); nnU-Net: value lut
    mask_names: list[str | None] = field(default_factory=list)
    source_label_names: set[str] = field(default_factory=set)  # the names a case's files may carry
    nnunet_lut: np.ndarray | None = None  # raw label value -> stored label value
    nnunet_values: set[int] | None = None
    notes: list[str] = field(default_factory=list)  # dataset-level facts worth a log line + manifest
    absent_in_source: list[str] = field(default_factory=list)  # map classes no source file can provide
    # source classes not in the map: their voxels get the ignore label (never background)
    ignored_source_names: list[str] = field(default_factory=list)
    # source classes a subset map declares background: their masks are not read
    background_source_names: set[str] = field(default_factory=set)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def ignore_label(self) -> int:
        """nnU-Net v2's ignore label: one above the last class. Voxels of a source class with no
        class in the map carry it; the loss and validation Dice skip them."""
        return len(self.labels)


def strip_nifti(name: str) -> str:
    """File name without ``.nii.gz``/``.nii`` (the case or class name)."""
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def detect_layout(root: Path) -> str:
    """``nnunet`` if ROOT/dataset.json + imagesTr exist, ``totalseg`` if a sub-folder holds
    ct.nii.gz or segmentations/ (or meta.csv exists); otherwise an error that says what was expected."""
    root = Path(root)
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "nnunet"
    if (root / "meta.csv").is_file():
        return "totalseg"
    for d in root.iterdir() if root.is_dir() else []:
        if d.is_dir() and ((d / "ct.nii.gz").exists() or (d / "segmentations").is_dir()):
            return "totalseg"
    raise DatasetError(
        f"{root}: cannot tell the layout. Expected TotalSegmentator (ROOT/sXXXX/ct.nii.gz + segmentations/, "
        "meta.csv) or nnU-Net raw (dataset.json, imagesTr/, labelsTr/); pass --layout explicitly"
    )


SPLITS = ("train", "val", "test")


def read_meta_csv(path: Path) -> dict[str, str]:
    """image_id -> split from TotalSegmentator's meta.csv (``;``-separated, BOM tolerated).

    A split outside train/val/test (a typo such as ``validation`` or ``Train``) is a DatasetError
    naming the file, the row and the image_id: it would otherwise become a new split silently and the
    case would be missing from the one it was meant for. It is a dataset-level file, so the whole run
    stops before any case is prepared rather than quarantining cases one by one. An empty split
    cell still means the default ``train`` (some exports leave it blank).
    """
    text = path.read_bytes().decode("utf-8-sig")
    first = text.splitlines()[0] if text else ""
    delim = ";" if first.count(";") >= first.count(",") else ","
    rows = list(csv.DictReader(io.StringIO(text), delimiter=delim))
    if not rows or "image_id" not in rows[0] or "split" not in rows[0]:
        raise DatasetError(f"{path}: needs columns image_id and split (found {list(rows[0]) if rows else 'no rows'})")
    out = {}
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        if not r.get("image_id"):
            continue
        image_id, split = r["image_id"].strip(), (r["split"] or "").strip()
        if split and split not in SPLITS:
            raise DatasetError(f"{path} line {line}: image_id {image_id!r} has split {split!r}; "
                               f"allowed values are {', '.join(SPLITS)} (or empty for train)")
        out[image_id] = split
    return out


def open_source(root: str | Path, layout: str = "auto", classes: str = "auto") -> RawDataset:
    """List the cases of a raw dataset and resolve the class map. Raises ``DatasetError``."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "totalseg":
        return _open_totalseg(root, classes)
    if layout == "nnunet":
        return _open_nnunet(root, classes)
    raise DatasetError(f"unknown layout {layout!r}; use totalseg, nnunet or auto")


def _open_totalseg(root: Path, classes: str) -> RawDataset:
    splits = read_meta_csv(root / "meta.csv") if (root / "meta.csv").is_file() else {}
    notes = []
    if not splits:
        notes.append("no meta.csv: every case is in split 'train'")
    dirs = {d.name: d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))
            and ((d / "ct.nii.gz").exists() or (d / "segmentations").is_dir() or d.name in splits)}
    ids = sorted(set(dirs) | set(splits))
    unlisted = [i for i in ids if splits and i not in splits]
    if unlisted:
        notes.append(f"{len(unlisted)} case folder(s) not in meta.csv go to split 'train' (e.g. {unlisted[:3]})")
    cases = [
        RawCase(case_id=i, split=splits.get(i) or "train", image_files=[root / i / "ct.nii.gz"], mask_dir=root / i / "segmentations")
        for i in ids
    ]
    # the class names the dataset provides: the union over a few cases' mask folders
    names: set[str] = set()
    for c in cases:
        if c.mask_dir.is_dir():
            names |= {strip_nifti(p.name) for p in c.mask_dir.iterdir() if p.name.endswith(NIFTI_SUFFIXES)}
            if len(names) >= 100:
                break
    if classes in ("auto", "dataset"):
        if not names:
            raise DatasetError(f"{root}: no segmentations/*.nii.gz found to detect the class map; pass --classes")
        try:
            name = detect_class_map(names)
        except ValueError as e:
            raise DatasetError(f"{root}: {e}") from None
    elif classes in CLASS_MAP_FILES:
        name = classes
    else:
        raise DatasetError(f"unknown class map {classes!r}; use auto, {', '.join(CLASS_MAP_FILES)}")
    cmap = load_class_map(name)
    labels = list(cmap.labels)
    corr = source_correspondence(sorted(names), name)
    absent = sorted(n for n in corr.unannotated if names)
    ignored = sorted(corr.to_ignore)
    if corr.to_background:
        notes.append(f"subset map {name}: {len(corr.to_background)} other TotalSegmentator mask name(s) are background")
    if absent:
        notes.append(
            f"class map {name} has {len(absent)} class(es) with no mask file in this dataset; they are recorded "
            f"as missing (unannotated) for every case, not background: {', '.join(absent)}"
        )
    if ignored:
        notes.append(f"{len(ignored)} mask name(s) have no class in map {name}; their voxels get the ignore label "
                     f"{cmap.ignore_label} (skipped by loss and Dice), not background: {', '.join(ignored)}")
    return RawDataset(
        root=root, layout="totalseg", cases=cases, class_map_name=name, labels=labels, is_ct=True,
        split_source="meta.csv" if splits else "default", mask_names=[None] + list(cmap.foreground),
        source_label_names=set(cmap.foreground), notes=notes, absent_in_source=absent, ignored_source_names=ignored,
        background_source_names=set(corr.to_background),
    )


NNUNET_SPLITS_FILE = "splits_final.json"  # nnU-Net v2's split file: a list of folds, each {"train": [...], "val": [...]}


def read_nnunet_splits(root: Path, fold: int = 0) -> dict[str, list[str]] | None:
    """Fold ``fold`` of ``root/splits_final.json`` as {"train": [...], "val": [...]}, or None without one.

    nnU-Net keeps this file in its preprocessed folder; a raw dataset that ships one beside dataset.json
    (as the downstream demo does) names its held-out cases there, and ``prepare`` takes them as split "val".
    """
    path = Path(root) / NNUNET_SPLITS_FILE
    if not path.is_file():
        return None
    try:
        folds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable ({e}); fix it, or delete it to put every case in split 'train'") from e
    ok = (isinstance(folds, list) and len(folds) > fold and isinstance(folds[fold], dict)
          and all(isinstance(folds[fold].get(k), list) for k in ("train", "val")))
    if not ok:
        raise DatasetError(f"{path}: expected nnU-Net v2's format, a list of folds each "
                           f'{{"train": [case ids], "val": [case ids]}}, with fold {fold} present')
    return {k: [str(c) for c in folds[fold][k]] for k in ("train", "val")}


def _open_nnunet(root: Path, classes: str) -> RawDataset:
    try:
        ds = json.loads((root / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{root / 'dataset.json'}: unreadable ({e})") from e
    for key in ("labels", "channel_names", "file_ending"):
        if key not in ds:
            raise DatasetError(f"{root / 'dataset.json'}: missing key {key!r} (nnU-Net v2 format)")
    fe = ds["file_ending"]
    if fe not in NIFTI_SUFFIXES:
        raise DatasetError(f"{root / 'dataset.json'}: file_ending {fe!r} is not supported; convert the images to .nii.gz")
    raw_labels: dict[str, int] = {}
    for n, v in ds["labels"].items():
        if isinstance(v, (list, tuple)):
            raise DatasetError(f"dataset.json label {n!r} is a region ({v}); region-based datasets are not supported")
        raw_labels[n] = int(v)
    if sorted(raw_labels.values()) != list(range(len(raw_labels))) or raw_labels.get("background", 0) != 0:
        raise DatasetError(f"dataset.json labels must be 0..N consecutive with background = 0, got {raw_labels}")
    all_values = set(range(len(raw_labels)))
    # nnU-Net v2's own ignore label ("ignore": the highest value) stays an ignore label here
    raw_ignore = raw_labels.pop("ignore", None)
    if raw_ignore is not None and raw_ignore != len(raw_labels):
        raise DatasetError(f"{root / 'dataset.json'}: label 'ignore' is {raw_ignore}; nnU-Net v2 needs it to be the "
                           f"highest value ({len(raw_labels)}). Renumber it")
    by_value = [n for n, _ in sorted(raw_labels.items(), key=lambda kv: kv[1])]
    nch = len(ds["channel_names"])
    is_ct = all(str(v).strip().lower() == "ct" for v in ds["channel_names"].values())
    # cases: anything with a channel-0 image or a label
    img_ids = {p.name[: -len(fe) - 5] for p in (root / "imagesTr").glob(f"*_0000{fe}")}
    lab_ids = {p.name[: -len(fe)] for p in (root / "labelsTr").glob(f"*{fe}")} if (root / "labelsTr").is_dir() else set()
    ids = sorted(img_ids | lab_ids)
    notes = []
    if "numTraining" in ds and int(ds["numTraining"]) != len(ids):
        notes.append(f"dataset.json numTraining = {ds['numTraining']} but {len(ids)} case(s) found")
    folds = read_nnunet_splits(root)
    split_of: dict[str, str] = {}
    if folds is None:
        notes.append(f"nnU-Net raw layout without {NNUNET_SPLITS_FILE}: every case is in split 'train'")
    else:
        both = sorted(set(folds["train"]) & set(folds["val"]))
        missing = sorted(c for c in folds["train"] + folds["val"] if c not in set(ids))
        if both or missing:
            raise DatasetError(f"{root / NNUNET_SPLITS_FILE}: fold 0 " + (f"has cases in both train and val: {both}" if both
                               else f"names cases with no image or label in imagesTr/labelsTr: {missing}")
                               + "; fix the file or delete it (every case is then in split 'train')")
        split_of = {c: "val" for c in folds["val"]}
        rest = [i for i in ids if i not in split_of and i not in folds["train"]]
        notes.append(f"splits from {NNUNET_SPLITS_FILE} fold 0: {len(folds['train'])} train, {len(folds['val'])} val"
                     + (f"; {len(rest)} case(s) in neither go to split 'train'" if rest else ""))
    cases = [
        RawCase(case_id=i, split=split_of.get(i, "train"), image_files=[root / "imagesTr" / f"{i}_{c:04d}{fe}" for c in range(nch)],
                label_file=root / "labelsTr" / f"{i}{fe}")
        for i in ids
    ]
    if classes in ("auto", "dataset"):
        name, labels = "dataset.json", by_value
        lut = np.arange(len(by_value), dtype=np.int64)
    elif classes in CLASS_MAP_FILES:
        cmap = load_class_map(classes)
        corr = source_correspondence(by_value[1:], classes)
        unknown = sorted(corr.to_ignore)
        if unknown:
            notes.append(f"{len(unknown)} dataset.json label(s) have no class in map {classes}; their voxels get the "
                         f"ignore label {cmap.ignore_label} (skipped by loss and Dice), not background: {', '.join(unknown)}")
        name, labels = classes, list(cmap.labels)
        lut = np.asarray([cmap.index(n) if n in cmap.labels[1:] else
                          (0 if n == "background" or n in corr.to_background else cmap.ignore_label)
                          for n in by_value], dtype=np.int64)
    else:
        raise DatasetError(f"unknown class map {classes!r}; use auto, {', '.join(CLASS_MAP_FILES)}")
    if raw_ignore is not None:
        lut = np.append(lut, len(labels))  # the raw ignore value -> this store's ignore label
    absent = sorted(n for n in labels[1:] if n not in raw_labels)
    if absent:
        notes.append(f"class map {name} has {len(absent)} class(es) absent from dataset.json; recorded as missing "
                     f"for every case: {', '.join(absent)}")
    return RawDataset(
        root=root, layout="nnunet", cases=cases, class_map_name=name, labels=labels, is_ct=is_ct,
        split_source="default" if folds is None else f"{NNUNET_SPLITS_FILE} (fold 0)",
        source_label_names=set(by_value), nnunet_lut=lut,
        nnunet_values=all_values, notes=notes, absent_in_source=absent,
        ignored_source_names=unknown if classes in CLASS_MAP_FILES else [],
    )


# ------------------------------------------------------------------------------------------------
# Loading one case: image(s) + merged label map, all validated
# ------------------------------------------------------------------------------------------------


@dataclass
class LoadedCase:
    case_id: str
    image: np.ndarray  # [x, y, z] or [c, x, y, z], file voxel order
    affine: np.ndarray
    label: np.ndarray  # [x, y, z] in the store's label values
    missing_classes: list[int]  # unannotated in this case: no mask file / label (the loss marginalises them)
    ignored_masks: list[str]  # source classes whose voxels carry the ignore label
    overlap_voxels: int  # voxels claimed by more than one mask (TotalSegmentator)
    input_sha256: dict[str, str]  # file name relative to the dataset root -> sha256


def _ordered_map(fn: Callable, items: Sequence, threads: int) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, with at most threads + 1 results in memory
    (gunzip releases the GIL; 117 full-size masks must not all sit in RAM at once: each decoded
    mask is 262 MB at 512x512x1000, so the window bounds a worker's memory)."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as ex:
        it = iter(items)
        pending = collections.deque(ex.submit(fn, x) for x in itertools.islice(it, threads + 1))
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(fn, nxt))
            yield result


def load_case(case: RawCase, dataset: RawDataset, threads: int = 1) -> LoadedCase:
    """Read and validate every file of a case; merge TotalSegmentator masks into one label map.

    Overlap rule: masks are written in label-value order and a higher label value overwrites a lower
    one (TotalSegmentator's own converter does the same in its class-map order); the number of
    overlapping voxels is recorded. A mask file that does not exist makes its class *missing* for
    this case (recorded), never background. A mask file whose class is not in the map (v2 ``heart``
    for STU-Net's v1 map) is written first, with the ignore label (``dataset.ignore_label``), so
    any class of the map that overlaps it keeps its voxels: the ignore label only covers what no
    target class claims.
    """
    rel = lambda p: p.relative_to(dataset.root).as_posix()  # noqa: E731
    for p in case.image_files:
        if not p.exists():
            raise CaseError("MISSING_IMAGE", f"{rel(p)} does not exist", p)
    images = [read_nifti(p, "image") for p in case.image_files]
    ref = images[0]
    for other in images[1:]:
        check_same_grid(ref, other)
    shas = {rel(n.path): n.sha256 for n in images}
    image = ref.data if len(images) == 1 else np.stack([n.data for n in images])
    ldtype = np.uint8 if dataset.ignore_label <= 255 else np.uint16  # the ignore label must fit too

    if dataset.layout == "nnunet":
        if case.label_file is None or not case.label_file.exists():
            raise CaseError("MISSING_LABEL", f"{rel(case.label_file)} does not exist", case.label_file)
        lab = read_nifti(case.label_file, "label")
        check_same_grid(ref, lab)
        raw = check_label_values(lab, len(dataset.nnunet_values) - 1, dataset.nnunet_values)
        label = dataset.nnunet_lut.astype(ldtype)[raw]
        shas[rel(lab.path)] = lab.sha256
        missing = [dataset.labels.index(n) for n in dataset.absent_in_source]
        ignored = list(dataset.ignored_source_names)
        return LoadedCase(case.case_id, image, ref.affine, label, missing, ignored, 0, shas)

    # TotalSegmentator: one mask per class
    if not case.mask_dir.is_dir():
        raise CaseError("MISSING_LABEL", f"{rel(case.mask_dir)}/ does not exist", case.mask_dir)
    present_files = {strip_nifti(p.name): p for p in case.mask_dir.iterdir() if p.name.endswith(NIFTI_SUFFIXES)}
    wanted = [(k, n) for k, n in enumerate(dataset.mask_names) if n is not None]
    missing = [k for k, n in wanted if n not in present_files]
    if len(missing) == len(wanted):
        raise CaseError("MISSING_LABEL", f"{rel(case.mask_dir)}/ holds none of the {len(wanted)} mask files of the class map", case.mask_dir)
    # every present mask without a class in the map, also one that only this case has
    ignored = sorted(set(present_files) - set(dataset.mask_names[1:]) - dataset.background_source_names)
    jobs = [(dataset.ignore_label, present_files[n]) for n in ignored]
    jobs += [(k, present_files[n]) for k, n in wanted if n in present_files]

    # Masks are merged in the files' own voxel order (Fortran: x fastest, z slowest), so a mask is
    # never transposed; the label map is built in that order and handed on as a Fortran-order array
    # (the crop copies only the box). Empty masks are the majority of a real case (absent organs) and
    # are mostly byte-identical streams: one that was already decoded and found empty is not decoded
    # again (same deflate payload = same bytes, CRC checked once). Per mask: one decode, one
    # vectorised max per z-slice (validates 0/1, finds the slices it touches), then index work only
    # inside those slices. See the README's Preprocessing section for what this costs at full size.
    n_vox = int(np.prod(ref.shape, dtype=np.int64))
    plane = int(ref.shape[0]) * int(ref.shape[1])  # voxels per z-slice, contiguous in file order
    empty_payloads: set[bytes] = set()

    def read_mask(job):
        k, p = job
        try:
            raw_head = p.read_bytes()
        except OSError:
            raw_head = None
        payload = gzip_payload(raw_head) if raw_head is not None and p.name.endswith(".gz") else None
        key = hashlib.sha256(payload).digest() if payload is not None else None
        if key is not None and key in empty_payloads:
            return k, None, hashlib.sha256(raw_head).hexdigest(), p, None
        m = read_nifti(p, "mask")
        check_same_grid(ref, m)
        data = m.data
        if data.dtype.kind not in "ub" or data.dtype.itemsize != 1:
            data = check_label_values(m, 1)  # floats / wider ints: full check, converted to uint8
        flat = data.reshape(-1, order="F")  # a view for Fortran-contiguous file data
        slice_max = flat.reshape(-1, plane).max(axis=1)
        top = int(slice_max.max()) if slice_max.size else 0
        if top > 1:
            raise CaseError("LABEL_OUT_OF_RANGE", f"{p.name}: label values span [0, {top}], allowed 0..1", p)
        touched = np.flatnonzero(slice_max)
        if touched.size == 0 and key is not None:
            empty_payloads.add(key)
        span = None if touched.size == 0 else (int(touched[0]) * plane, (int(touched[-1]) + 1) * plane)
        return k, flat, m.sha256, p, span

    label_flat = np.zeros(n_vox, dtype=ldtype)  # file (Fortran) voxel order
    overlap = 0
    for k, flat, sha, p, span in _ordered_map(read_mask, jobs, threads):
        shas[rel(p)] = sha
        if span is None:
            continue
        lo, hi = span
        # index lists cost ~ the structure's slices, not the volume (117 times)
        idx = np.flatnonzero(flat[lo:hi])
        target = label_flat[lo:hi]
        overlap += int(np.count_nonzero(target[idx]))
        target[idx] = k
    label = label_flat.reshape(ref.shape, order="F")
    return LoadedCase(case.case_id, image, ref.affine, label, missing, ignored, overlap, shas)


def files_fingerprint(files: Iterable[Path]) -> list[list]:
    """(path, size, mtime_ns) of each file: the cheap first test of "already prepared"."""
    out = []
    for p in files:
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out
