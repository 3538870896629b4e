"""The prepared dataset on disk: Zarr v3 store + WebDataset shards + manifest. The format and its read
API; the write side is ``stunet_scale/data/ingest/store_writer.py``.

Layout (the contract is ``data_shards/README.md``)::

    OUT/manifest.json            written last: its presence means the build is complete
    OUT/quarantine.jsonl         one line per rejected case
    OUT/store.zarr/<case>/{image,label,fg_locations}
    OUT/wds/shard-NNNNNN.tar     members <key>.meta.json, <key>.image.blosc, <key>.label.blosc,
                                 <key>.fg_locations.blosc (key = case id with '.' -> '_')
    OUT/parts/                   per-case records of the build (resume state; not read by training)

Integrity on read, because zarr-python 3.1 silently returns the fill value for a missing chunk:

* every array is written with ``write_empty_chunks=True``, so every inner chunk is in its shard,
  and with a ``crc32c`` codec on every inner chunk and on the shard index;
* the store is opened through ``ChunkStrictStore``, which turns a missing chunk/shard file into
  ``StoreIntegrityError`` (naming case, array and shard) instead of a fill value;
* ``CheckedArray`` re-raises a decode/checksum failure naming the case and the exact inner chunk;
* WebDataset samples are checked for required members and crc32c checksums of the decoded arrays
  (against the sample's own ``meta.json`` and, when given, the manifest).

Read API (what the sampler, the trainer and the tests use)::

    store = open_store("data_shards/demo")
    store.case_ids(["train"])            # sorted ids of the split(s)
    case = store.case("s0001")
    patch = case.image[0:128, 0:128, 0:128]   # reads only the touched 64^3 chunks
    rows = case.fg_rows(5)               # int32 [n, 4] (label, x, y, z) of class 5
    for case in iter_wds_cases(store.wds_shard_paths(["train"]), store.manifest): ...
"""

from __future__ import annotations

import json
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "stunet-scale-prepared"
FORMAT_VERSION = 2  # 2: per-case nnU-Net z-score statistics (intensity.nonzero)
CHUNK = 64  # inner chunk edge (voxels); one shard holds the whole volume
FG_CHUNK_ROWS = 4096  # fg_locations rows per chunk (one forced sample reads one row)
IMAGE_FILL = -1024  # air: an absent CT chunk would otherwise read as 0 HU (water)
BLOSC = {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"}
# Label maps: bitshuffle does nothing useful for 1-byte values that repeat in long runs, and its
# bit transpose is most of the decode time (zstd + bitshuffle: ~4.5 ms for the 27 label chunks of
# a 128^3 crop; lz4hc-5 without shuffle: ~0.4 ms, still ~50-130x smaller than raw).
LABEL_BLOSC = {"cname": "lz4hc", "clevel": 5, "shuffle": "noshuffle"}
CODECS = {"image": BLOSC, "label": LABEL_BLOSC, "fg_locations": BLOSC}  # blosc settings per array
WDS_MEMBERS = ("meta.json", "image.blosc", "label.blosc", "fg_locations.blosc")
ARRAYS = ("image", "label", "fg_locations")

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
ZARR_DIR = "store.zarr"
STORE_CHANNELS = 1  # prepare writes single-channel CT; the training stream reads that
WDS_DIR = "wds"


class StoreIntegrityError(RuntimeError):
    """A prepared dataset is damaged or incomplete (missing/corrupt chunk, truncated shard, ...)."""


REBUILD_HINT = (
    "The prepared dataset is damaged; rebuild the affected case(s) with "
    "`stunet-scale prepare SOURCE OUT --verify` (finished, intact cases are kept)."
)


# ------------------------------------------------------------------------------------------------
# Small helpers shared by writer (``ingest/store_writer.py``) and reader
# ------------------------------------------------------------------------------------------------


def array_checksum(array: np.ndarray) -> str:
    """crc32c of the array's C-order little-endian bytes, as ``crc32c:xxxxxxxx``."""
    import crc32c

    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    return f"crc32c:{crc32c.crc32c(a.reshape(-1).view(np.uint8)):08x}"


def label_dtype(num_classes: int) -> np.dtype:
    """uint8 up to 255 classes (background included), uint16 above: the ignore label, value
    ``num_classes`` (nnU-Net v2: one above the last class), must fit as well."""
    return np.dtype(np.uint8) if num_classes <= 255 else np.dtype(np.uint16)


def wds_key(case_id: str) -> str:
    """WebDataset splits member names at the first dot, so a case id's dots become underscores."""
    return case_id.replace(".", "_")


def blosc_codec(settings: dict | None = None):
    """A numcodecs Blosc with ``settings`` (one of ``CODECS``). Any instance decodes any blosc
    frame (the frame header names codec and shuffle), so stores written with other settings (e.g.
    bitshuffled labels before LABEL_BLOSC existed) still read."""
    import numcodecs

    settings = settings or BLOSC
    shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
               "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[settings["shuffle"]]
    return numcodecs.Blosc(cname=settings["cname"], clevel=settings["clevel"], shuffle=shuffle)


def read_tar_members(path: Path) -> list[tuple[str, bytes]]:
    """All (name, bytes) of a tar, in order; raises StoreIntegrityError naming the shard if damaged."""
    out = []
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                _check_member_name(info.name, path)
                if not info.isfile():
                    continue
                out.append((info.name, tar.extractfile(info).read()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise StoreIntegrityError(f"{path}: unreadable or truncated tar ({e}). {REBUILD_HINT}") from e
    return out


def _check_member_name(name: str, shard: Any) -> None:
    if name.startswith("/") or ".." in Path(name).parts:
        raise StoreIntegrityError(f"{shard}: refusing tar member with an unsafe path {name!r}")


# ------------------------------------------------------------------------------------------------
# Read side: Zarr
# ------------------------------------------------------------------------------------------------


def _strict_store_class():
    from zarr.storage import WrapperStore

    class ChunkStrictStore(WrapperStore):
        """A store wrapper that makes a missing chunk file an error instead of the fill value.

        Metadata keys (``zarr.json``) may be absent (zarr probes for them); chunk keys (``.../c/...``)
        may not, because every chunk was written (``write_empty_chunks=True``).
        """

        async def get(self, key, prototype=None, byte_range=None):
            value = await self._store.get(key, prototype, byte_range)
            if value is None and _is_chunk_key(key):
                raise StoreIntegrityError(_missing_chunk_message(key))
            return value

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            values = await self._store.get_partial_values(prototype, key_ranges)
            for (key, _), value in zip(key_ranges, values):
                if value is None and _is_chunk_key(key):
                    raise StoreIntegrityError(_missing_chunk_message(key))
            return values

    return ChunkStrictStore


def _is_chunk_key(key: str) -> bool:
    return "/c/" in f"/{key}" and not key.endswith("zarr.json")


def _missing_chunk_message(key: str) -> str:
    parts = key.split("/")
    i = parts.index("c") if "c" in parts else len(parts)
    case, array = "/".join(parts[: max(0, i - 1)]), parts[i - 1] if i >= 1 else "?"
    return (f"case {case!r}, array {array!r}: chunk file {ZARR_DIR}/{key} is missing "
            f"(shard {tuple(int(p) for p in parts[i + 1:] if p.isdigit())}). {REBUILD_HINT}")


class CheckedArray:
    """A read-only view of one Zarr array of a case. Slicing reads only the chunks it touches; a
    failure names the case, the array and the inner chunk(s) that did not decode."""

    def __init__(self, array, case_id: str, name: str):
        self._array = array
        self.case_id = case_id
        self.name = name

    @property
    def zarr(self):
        """The underlying ``zarr.Array`` (no integrity wrapping beyond the strict store)."""
        return self._array

    shape = property(lambda self: tuple(self._array.shape))
    dtype = property(lambda self: np.dtype(self._array.dtype))
    ndim = property(lambda self: len(self._array.shape))
    chunks = property(lambda self: tuple(self._array.chunks))
    fill_value = property(lambda self: self._array.fill_value)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        a = self[...]
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, selection) -> np.ndarray:
        try:
            return self._array[selection]
        except StoreIntegrityError:
            raise
        except Exception as e:  # checksum mismatch, decompression error, truncated shard
            raise StoreIntegrityError(self._locate(selection, e)) from e

    def _locate(self, selection, error: Exception) -> str:
        """Find which inner chunk(s) of the selection fail, for an actionable message."""
        bad = []
        try:
            sel = selection if isinstance(selection, tuple) else (selection,)
            if any(s is Ellipsis for s in sel) or len(sel) < self.ndim:
                sel = tuple(slice(None) for _ in range(self.ndim))
            ranges = []
            for s, n, c in zip(sel, self.shape, self.chunks):
                if isinstance(s, slice):
                    lo, hi, _ = s.indices(n)
                else:
                    lo, hi = int(s), int(s) + 1
                ranges.append(range(lo // c, max(lo // c + 1, -(-hi // c))))
            import itertools

            for idx in itertools.product(*ranges):
                region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, self.chunks, self.shape))
                try:
                    self._array[region]
                except Exception:
                    bad.append(idx)
                if len(bad) >= 8:
                    break
        except Exception:
            pass
        where = f"inner chunk(s) {bad}" if bad else "the selection"
        return (f"case {self.case_id!r}, array {self.name!r}: {where} of {ZARR_DIR}/{self.case_id}/{self.name} "
                f"failed to decode ({type(error).__name__}: {error}). {REBUILD_HINT}")


@dataclass
class StoredCase:
    """One prepared case. ``image``/``label`` are lazily read arrays ([x, y, z], RAS, or
    [c, x, y, z] for multi-channel images); ``fg_locations`` is int32 [M, 4] (label, x, y, z) sorted
    by label; ``meta`` is the case's manifest entry."""

    case_id: str
    image: Any
    label: Any
    fg_locations: np.ndarray
    meta: dict

    @property
    def fg_ranges(self) -> dict[int, tuple[int, int]]:
        """{label: (start, stop)} rows of ``fg_locations``."""
        return {int(k): (int(v[0]), int(v[1])) for k, v in self.meta["fg_locations"]["ranges"].items()}

    def fg_rows(self, label: int) -> np.ndarray:
        """The ``fg_locations`` rows of one label (empty [0, 4] when it is absent)."""
        r = self.fg_ranges.get(int(label))
        return self.fg_locations[r[0]:r[1]] if r else self.fg_locations[:0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    @property
    def present_classes(self) -> list[int]:
        return list(self.meta["present_classes"])

    @property
    def missing_classes(self) -> list[int]:
        """Classes unannotated in this case (no mask file): the loss marginalises them, Dice skips them."""
        return list(self.meta["missing_classes"])

    @property
    def split(self) -> str:
        return self.meta["split"]


class PreparedStore:
    """A finished ``stunet-scale prepare`` output directory. Cheap to pickle (DataLoader workers
    re-open the Zarr store lazily in their own process)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {self.root} is not a finished prepared dataset. Run "
                f"`stunet-scale prepare SOURCE {self.root}` (or `--finalize` after a Slurm array)."
            )
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT_NAME or self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreIntegrityError(
                f"{path}: format {self.manifest.get('format')!r} v{self.manifest.get('format_version')} is not "
                f"{FORMAT_NAME!r} v{FORMAT_VERSION}; re-run `stunet-scale prepare` with this version"
            )
        self._group = None

    def __getstate__(self):
        return {"root": self.root, "manifest": self.manifest, "_group": None}

    def __setstate__(self, state):
        self.__dict__.update(state)

    # -- dataset level ------------------------------------------------------------------------
    @property
    def class_map(self) -> list[str]:
        """Label names; index k is label value k (0 = background)."""
        return list(self.manifest["class_map"]["labels"])

    @property
    def class_map_name(self) -> str:
        return self.manifest["class_map"]["name"]

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_map"]["labels"])

    @property
    def ignore_label(self) -> int:
        """The label value of voxels the loss and Dice skip (``num_classes``; stores written before
        it was recorded hold no such voxel, and the value is the same)."""
        return int(self.manifest["class_map"].get("ignore_label", self.num_classes))

    @property
    def target_spacing(self) -> list[float]:
        return list(self.manifest["preprocessing"]["target_spacing"])

    @property
    def intensity(self) -> dict:
        """Pooled foreground intensity statistics (nnU-Net CT normalisation)."""
        return self.manifest["intensity"]

    @property
    def has_zarr(self) -> bool:
        return bool(self.manifest["storage"].get("zarr"))

    def case_ids(self, splits: Sequence[str] | None = None) -> list[str]:
        """Sorted ids of the prepared (not quarantined) cases, optionally of some splits only."""
        cases = self.manifest["cases"]
        return sorted(c for c, m in cases.items() if splits is None or m["split"] in splits)

    def meta(self, case_id: str) -> dict:
        try:
            return self.manifest["cases"][case_id]
        except KeyError:
            raise KeyError(f"case {case_id!r} is not in {self.root / MANIFEST}") from None

    def wds_shard_paths(self, splits: Sequence[str] | None = None) -> list[str]:
        """Absolute paths of the WebDataset shards (whole shards hold one split each)."""
        shards = self.manifest.get("wds_shards") or []
        return [str(self.root / s["path"]) for s in shards if splits is None or s["split"] in splits]

    # -- Zarr ---------------------------------------------------------------------------------
    def _zarr(self):
        if self._group is None:
            if not self.has_zarr:
                raise StoreIntegrityError(f"{self.root} was prepared with --format wds: no Zarr store to open")
            import zarr
            from zarr.storage import LocalStore

            path = self.root / self.manifest["storage"]["zarr"]
            store = _strict_store_class()(LocalStore(str(path), read_only=True))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
                self._group = zarr.open_group(store=store, mode="r", use_consolidated=True)
        return self._group

    def check_case_files(self, case_id: str) -> None:
        """Raise ``StoreIntegrityError`` unless every chunk file of the case exists with the byte size
        prepare recorded in the manifest (a few ``stat`` calls: catches truncated or replaced files
        before any read). Shared by ``case`` and the training reader's ``CaseHandle``."""
        base = self.root / self.manifest["storage"]["zarr"] / case_id
        for key, size in (self.meta(case_id).get("zarr_files") or {}).items():
            try:
                actual = (base / key).stat().st_size
            except FileNotFoundError:
                raise StoreIntegrityError(
                    f"case {case_id!r}: chunk file {ZARR_DIR}/{case_id}/{key} is missing. {REBUILD_HINT}") from None
            if actual != size:
                raise StoreIntegrityError(
                    f"case {case_id!r}: chunk file {ZARR_DIR}/{case_id}/{key} has {actual} bytes, the manifest "
                    f"recorded {size} (truncated or replaced). {REBUILD_HINT}")

    def case(self, case_id: str) -> StoredCase:
        """Open one case of the Zarr store. Checks that its chunk files exist with the recorded
        sizes (a few ``stat`` calls), then returns lazily read arrays."""
        meta = self.meta(case_id)
        if not self.has_zarr:
            raise StoreIntegrityError(f"{self.root} was prepared with --format wds: read it with iter_wds_cases")
        self.check_case_files(case_id)
        group = self._zarr()[case_id]
        image = CheckedArray(group["image"], case_id, "image")
        label = CheckedArray(group["label"], case_id, "label")
        fg = CheckedArray(group["fg_locations"], case_id, "fg_locations")[...]
        return StoredCase(case_id, image, label, np.asarray(fg, dtype=np.int32).reshape(-1, 4), meta)

    def verify(self, case_ids: Sequence[str] | None = None, wds: bool = True) -> list[str]:
        """Full check: decode every array and compare crc32c checksums with the manifest; hash every
        WebDataset shard. Returns a list of problems (empty when everything is intact)."""
        problems = []
        if self.has_zarr:
            for cid in case_ids or self.case_ids():
                try:
                    case = self.case(cid)
                    for name, arr in (("image", case.image), ("label", case.label), ("fg_locations", case.fg_locations)):
                        got = array_checksum(np.asarray(arr[...]) if name != "fg_locations" else arr)
                        if got != case.meta["checksums"][name]:
                            problems.append(f"case {cid!r} array {name!r}: checksum {got} != manifest {case.meta['checksums'][name]}")
                except StoreIntegrityError as e:
                    problems.append(str(e))
        if wds:
            problems += verify_wds_shards(self.root, self.manifest, full=True)
        return problems


def open_store(root: str | Path) -> PreparedStore:
    """Open a finished prepared dataset (the OUT directory of ``stunet-scale prepare``)."""
    return PreparedStore(root)


# ------------------------------------------------------------------------------------------------
# Read side: WebDataset
# ------------------------------------------------------------------------------------------------


@dataclass
class WdsCase(StoredCase):
    """A case decoded from a WebDataset sample: same fields as ``StoredCase``, numpy-backed."""

    shard: str = ""


def decode_wds_sample(sample: dict, manifest: dict | None = None) -> WdsCase:
    """Decode one WebDataset sample (``{"__key__", "__url__", "meta.json", "image.blosc", ...}``,
    as ``webdataset.WebDataset(urls)`` yields it without ``.decode()``) into a ``WdsCase``.

    Raises ``StoreIntegrityError`` naming shard and key when a member is missing (truncated shard),
    meta.json's case id does not match the sample key, an array does not decode to its recorded shape/dtype, or a checksum differs from the sample's
    ``meta.json`` or from ``manifest`` (when given, the authority).
    """
    key = sample.get("__key__", "?")
    shard = str(sample.get("__url__", "?"))
    missing = [m for m in WDS_MEMBERS if m not in sample]
    if missing:
        raise StoreIntegrityError(
            f"shard {shard}: sample {key!r} lacks member(s) {missing} (truncated or damaged shard). {REBUILD_HINT}")
    try:
        raw = sample["meta.json"]  # bytes, or a dict when the pipeline ran webdataset's .decode()
        meta = raw if isinstance(raw, dict) else json.loads(raw if isinstance(raw, (str, bytes)) else bytes(raw))
    except Exception as e:
        raise StoreIntegrityError(f"shard {shard}: sample {key!r}: meta.json is not valid JSON ({e}). {REBUILD_HINT}") from e
    case_id = meta.get("id", key)
    if "__key__" in sample and wds_key(str(case_id)) != key:
        # a sample whose meta.json names another case (members spliced from two samples, a
        # renamed member) would otherwise be trained on under the wrong id
        raise StoreIntegrityError(
            f"shard {shard}: sample {key!r}: meta.json names case {case_id!r}, whose key is "
            f"{wds_key(str(case_id))!r} (spliced or renamed members). {REBUILD_HINT}")
    if manifest is not None:
        entry = manifest["cases"].get(case_id)
        if entry is None:
            raise StoreIntegrityError(f"shard {shard}: sample {key!r} (case {case_id!r}) is not in the manifest")
        if entry["checksums"] != meta.get("checksums"):
            raise StoreIntegrityError(
                f"shard {shard}: sample {key!r}: checksums in meta.json differ from the manifest (stale or tampered shard). {REBUILD_HINT}")
    codec = blosc_codec()  # decodes any blosc frame, whatever codec/shuffle wrote it
    arrays = {}
    for name, shape, dtype in (
        ("image", meta["image_shape"], meta["image_dtype"]),
        ("label", meta["shape"], meta["label_dtype"]),
        ("fg_locations", [meta["fg_locations"]["rows"], 4], "int32"),
    ):
        try:
            if int(np.prod(shape)) == 0:  # blosc cannot decode its own empty frame (no foreground)
                a = np.zeros(shape, dtype=np.dtype(dtype))
            else:
                buf = codec.decode(bytes(sample[f"{name}.blosc"]))
                a = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
        except Exception as e:
            raise StoreIntegrityError(
                f"shard {shard}: sample {key!r} member {name}.blosc does not decode to {dtype}{list(shape)} ({e}). {REBUILD_HINT}") from e
        got = array_checksum(a)
        if got != meta["checksums"][name]:
            raise StoreIntegrityError(
                f"shard {shard}: sample {key!r} member {name}.blosc: checksum {got} != recorded {meta['checksums'][name]}. {REBUILD_HINT}")
        arrays[name] = a
    return WdsCase(case_id, arrays["image"], arrays["label"], arrays["fg_locations"], meta, shard=shard)


def iter_wds_groups(path: str | Path, expected_keys: Sequence[str] | None = None) -> Iterator[dict]:
    """Stream a tar shard as one ``{"__key__", "__url__", ext: bytes}`` dict per sample, in order.

    Members are read one sample at a time (``tarfile`` "r|"), so a consumer that stops early never
    reads the rest of the shard. With ``expected_keys`` (the manifest's list for this shard) the key
    order is checked as it streams and once more at the end, so a shard truncated at a member
    boundary (which tar readers may end silently) or replaced by another is an error naming it.
    """
    path = Path(path)
    expected = None if expected_keys is None else list(expected_keys)
    seen: list[str] = []

    def done(group):
        seen.append(group["__key__"])
        if expected is not None and seen != expected[:len(seen)]:
            raise StoreIntegrityError(f"shard {path}: sample order {seen} differs from the manifest's {expected} "
                                      f"(replaced shard). {REBUILD_HINT}")
        return group

    try:
        with tarfile.open(path, mode="r|*") as tar:
            group = None
            for info in tar:
                _check_member_name(info.name, path)
                if not info.isfile():
                    continue
                key, _, ext = Path(info.name).name.partition(".")
                if group is not None and key != group["__key__"]:
                    yield done(group)
                    group = None
                if group is None:
                    group = {"__key__": key, "__url__": str(path)}
                group[ext] = tar.extractfile(info).read()
            if group is not None:
                yield done(group)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise StoreIntegrityError(f"{path}: unreadable or truncated tar ({e}). {REBUILD_HINT}") from e
    if expected is not None and seen != expected:
        raise StoreIntegrityError(f"shard {path}: holds samples {seen}, the manifest lists {expected} "
                                  f"(truncated or replaced shard). {REBUILD_HINT}")


def iter_wds_cases(shard_paths: Iterable[str | Path], manifest: dict | None = None) -> Iterator[WdsCase]:
    """Decode every case of the given shards in order (tar streaming, no webdataset needed).

    With ``manifest``, also checks that each shard holds exactly the cases the manifest lists, so a
    shard truncated at a member boundary (which tar readers may end silently) is still an error.
    """
    listed = {s["path"]: s for s in (manifest or {}).get("wds_shards") or []}
    for path in shard_paths:
        path = Path(path)
        entry = next((s for p, s in listed.items() if path.as_posix().endswith(p)), None)
        expected = None if entry is None else [wds_key(c) for c in entry["cases"]]
        for group in iter_wds_groups(path, expected):
            yield decode_wds_sample(group, manifest)


def verify_wds_shards(root: str | Path, manifest: dict, full: bool = False) -> list[str]:
    """Pre-flight check of the WebDataset shards listed in the manifest: existence and byte size
    (cheap), plus sha256 of the whole file with ``full=True``. Returns the problems found."""
    import hashlib

    problems = []
    for s in manifest.get("wds_shards") or []:
        p = Path(root) / s["path"]
        if not p.is_file():
            problems.append(f"shard {p} is missing")
            continue
        if p.stat().st_size != s["bytes"]:
            problems.append(f"shard {p} has {p.stat().st_size} bytes, the manifest recorded {s['bytes']} (truncated?)")
            continue
        if full:
            with open(p, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != s["sha256"]:
                problems.append(f"shard {p}: sha256 differs from the manifest (corrupt or replaced)")
    return problems
