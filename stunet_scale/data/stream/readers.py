"""Patch readers: the prepared Zarr store -> raw micro-batches for ``transforms.augment_batch``.

A DataLoader worker asks for the global sample indices of one micro-batch; for each sample it
resolves the plan (``plan.py``), reads from the case's Zarr arrays only the chunks under the voxels
the sample needs, and writes image (int16 HU; float32 for non-CT stores) and label voxels into the
raw micro-batch layout of ``raw_batch.allocate_raw``:

- no rotation/scaling (64 % of samples with nnU-Net's probabilities): the final patch itself, read
  at the crop position of the initial patch and flipped while it is copied;
- rotated/scaled: only the box of the initial patch (205^3 for 128^3) that the sample's grid
  touches (``patch_geometry.spatial_box_and_affine``), shipped at its own size; nnU-Net always reads and
  moves the whole initial patch.

Outside the volume the image is padded with air (-1024 HU; a non-CT store's fill value) and the
label with background, before normalisation, so normalisation (per-image z-score as STU-Net, or nnU-Net's CT clip + pooled z-score) treats the
padding like real air. Normalisation itself is one fused op on the augmentation device.

Reading: zarr-python 3.1 spends more time per 64^3 chunk on its async machinery than on decoding
it, so ``ShardReader`` reads the store's fixed layout (one ``sharding_indexed`` shard per volume,
bytes + blosc + crc32c per inner chunk, crc32c'd index at the end) directly: ``preadv`` the chunk
into a reused buffer, check its crc32c, decode it into another, copy the needed sub-block. Any blosc
frame decodes (labels are lz4hc, images zstd + bitshuffle, older stores bitshuffled both). The shard index is
read once per case and worker, and the shard file stays open while the worker caches the case
(closed when ``ZarrPatchReader`` evicts it); a forced-foreground voxel is one row of ``fg_locations`` (one
4096-row chunk). Any array in another layout falls back to zarr-python. A missing shard, a bad
index, a missing/corrupt chunk raise ``StoreIntegrityError`` naming case, array and chunk; nothing
is ever silently replaced by the fill value. Inside a DataLoader worker the raw tensors are
allocated in shared memory (a recycled slab when the loader gives a ``SlabPool``), so handing them
to the main process copies nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..store import IMAGE_FILL, REBUILD_HINT, ZARR_DIR, CheckedArray, PreparedStore, StoreIntegrityError
from .patch_geometry import crop_offset, mirror_view, spatial_box_and_affine
from .plan import PlanCase, SamplePlan, resolve_origin
from .raw_batch import allocate_raw, set_spatial_affine, stack_params

_MISSING = np.uint64(2**64 - 1)


# --------------------------------------------------------------------------------------------
# What the plan and the normalisation need from the manifest
# --------------------------------------------------------------------------------------------


def image_format(store: PreparedStore) -> tuple[torch.dtype, float]:
    """The stored image dtype (int16 HU for CT, float32 otherwise) and the value that pads outside
    the volume (air, -1024 HU, for CT; the store's fill value otherwise)."""
    name = (store.manifest.get("preprocessing") or {}).get("image_dtype", "int16")
    dtype = {"int16": torch.int16, "float32": torch.float32}.get(name)
    if dtype is None:
        raise StoreIntegrityError(f"{store.root}/manifest.json: image dtype {name!r} is not int16 or float32")
    fill = (store.manifest.get("storage") or {}).get("image_fill_value", IMAGE_FILL if dtype == torch.int16 else 0)
    return dtype, float(fill)


def plan_cases(store: PreparedStore, splits: Sequence[str]) -> list[PlanCase]:
    """The plan's view of the cases of ``splits``, in sorted-id order (the canonical order)."""
    out = []
    for cid in store.case_ids(splits):
        meta = store.meta(cid)
        ranges = (meta.get("fg_locations") or {}).get("ranges") or {}
        # the ignore label (value num_classes) is never a class to oversample; prepare leaves it
        # out of the table already, this keeps it out of the plan whatever wrote the store
        items = sorted((int(k), int(v[0]), int(v[1])) for k, v in ranges.items()
                       if 0 < int(k) < store.num_classes and v[1] > v[0])
        out.append(PlanCase(
            case_id=cid,
            shape=tuple(int(s) for s in meta["shape"][-3:]),
            split=meta.get("split", ""),
            fg_labels=np.array([i[0] for i in items], np.int64),
            fg_starts=np.array([i[1] for i in items], np.int64),
            fg_counts=np.array([i[2] - i[1] for i in items], np.int64),
        ))
    return out


def normalization(store: PreparedStore, meta: dict, mode: str, channels: int = 1) -> np.ndarray:
    """(clip low, clip high, scale, shift) per channel, float32 [C, 4]: y = clamp(x, lo, hi) * scale + shift.

    ``zscore`` (default): STU-Net's "nonCT" scheme exactly as nnU-Net v2 computes it
    (``ZScoreNormalization``, ``use_mask_for_norm`` off): (x - mean) / max(std, 1e-8) with the mean
    and std of the *original* image over its nonzero bounding box (``intensity.nonzero``, recorded
    by ``prepare`` before cropping and resampling). Applied to the stored (resampled, tighter) crop
    this gives nnU-Net's network input up to float rounding: resampling commutes with an affine map.
    ``zscore_stored``: (x - mean) / (std + 1e-8) over the stored volume (its crop, e.g. the body box);
    what stunet-scale did before it followed the release.
    ``ct``: nnU-Net's CTNormalization: clip to the pooled foreground 0.5/99.5 percentiles, then
    (x - mean) / max(std, 1e-8) with the pooled foreground mean/std of the training set.
    """
    if mode in ("zscore", "zscore_stored"):
        per_channel = meta.get("intensity_channels") or [meta.get("intensity") or {}]
        rows = []
        for c in range(channels):
            stats = per_channel[c] if c < len(per_channel) else {}
            if mode == "zscore":
                stats = stats.get("nonzero") or {}
            if "mean" not in stats or "std" not in stats:
                raise StoreIntegrityError(f"case {meta.get('id')!r}: the manifest has no intensity statistics "
                                          f"for data.normalization={mode} (channel {c}). {REBUILD_HINT}")
            std = float(stats["std"])
            scale = 1.0 / (max(std, 1e-8) if mode == "zscore" else std + 1e-8)
            rows.append([-math.inf, math.inf, scale, -float(stats["mean"]) * scale])
        return np.array(rows, np.float32)
    if mode == "ct":
        stats = store.intensity or {}
        stats = stats.get("foreground", stats) if isinstance(stats, dict) else {}
        need = ("mean", "std", "percentile_00_5", "percentile_99_5")
        if not stats or any(k not in stats for k in need):
            raise StoreIntegrityError(
                f"{store.root}/manifest.json: no pooled foreground statistics {list(need)} for "
                f"data.normalization=ct (a store without labelled voxels cannot use it; use zscore)")
        scale = 1.0 / max(float(stats["std"]), 1e-8)
        row = [float(stats["percentile_00_5"]), float(stats["percentile_99_5"]), scale, -float(stats["mean"]) * scale]
    else:
        raise ValueError(f"data.normalization must be zscore, zscore_stored or ct, got {mode!r}")
    return np.array([row] * channels, np.float32)


# --------------------------------------------------------------------------------------------
# Direct reads of the store's sharded arrays
# --------------------------------------------------------------------------------------------


class UnsupportedLayout(Exception):
    """The array is not in the layout ShardReader reads directly; use zarr-python instead."""


class ShardReader:
    """Reads boxes of one sharded Zarr v3 array (``ingest/store_writer.write_case_zarr``'s layout) without zarr-python."""

    def __init__(self, array_dir: Path, case_id: str, name: str):
        import numcodecs

        self.case_id, self.name, self.dir = case_id, name, Path(array_dir)
        try:
            meta = json.loads((self.dir / "zarr.json").read_text())
        except FileNotFoundError:
            raise StoreIntegrityError(f"case {case_id!r}: {ZARR_DIR}/{case_id}/{name}/zarr.json is missing. {REBUILD_HINT}") from None
        try:
            self.shape = tuple(int(s) for s in meta["shape"])
            self.shard = tuple(int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"])
            (codec,) = meta["codecs"]
            if codec["name"] != "sharding_indexed" or meta["chunk_grid"]["name"] != "regular":
                raise UnsupportedLayout(codec["name"])
            conf = codec["configuration"]
            self.chunk = tuple(int(s) for s in conf["chunk_shape"])
            inner = [c["name"] for c in conf["codecs"]]
            index = [c["name"] for c in conf["index_codecs"]]
            if inner != ["bytes", "blosc", "crc32c"] or index != ["bytes", "crc32c"] or conf.get("index_location", "end") != "end":
                raise UnsupportedLayout(f"{inner} / {index}")
            endian = conf["codecs"][0].get("configuration", {}).get("endian", "little")
            self.dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
            sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
            if meta.get("chunk_key_encoding", {}).get("name", "default") != "default":
                raise UnsupportedLayout("chunk key encoding")
        except (KeyError, ValueError, TypeError) as e:
            raise UnsupportedLayout(str(e)) from e
        self.sep = sep
        self.per_shard = tuple(s // c for s, c in zip(self.shard, self.chunk))
        self.n_inner = int(np.prod(self.per_shard))
        self._indexes: dict[tuple, np.ndarray] = {}
        self._buf = np.empty(self.chunk, self.dtype)
        self._codec = numcodecs.Blosc()  # decodes any blosc frame (codec and shuffle are in its header)
        # compressed bytes land in one reused buffer: a fresh bytes object per chunk costs page
        # faults (~2 ms per 128^3 int16 crop on a VM) that reusing memory does not
        self._raw = bytearray(self._buf.nbytes + 64)
        self._fds: dict[tuple, tuple[int, int]] = {}  # shard -> (fd, size), see _open
        self._pid = os.getpid()

    def _shard_path(self, s: tuple) -> Path:
        return self.dir / ("c" + self.sep + self.sep.join(str(i) for i in s))

    def _shard_name(self, s: tuple) -> str:
        return f"{ZARR_DIR}/{self.case_id}/{self.name}/{self._shard_path(s).relative_to(self.dir)}"

    def _open(self, s: tuple) -> tuple[int, int]:
        """(fd, byte size) of shard ``s``, opened once and kept until ``close``.

        Reopening and fstat-ing the shard for every box (every sample, array and channel) cost more
        than reading a small crop. The descriptors belong to the process that opened them: a
        DataLoader worker forked from a process that already read this case drops the inherited
        table and opens its own, so no two processes ever share a reader's descriptors or caches.
        """
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()  # the inherited descriptors stay the parent's business
        got = self._fds.get(s)
        if got is None:
            try:
                fd = os.open(self._shard_path(s), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                raise StoreIntegrityError(f"case {self.case_id!r}, array {self.name!r}: shard file "
                                          f"{self._shard_name(s)} is missing. {REBUILD_HINT}") from None
            got = self._fds[s] = (fd, os.fstat(fd).st_size)
        return got

    def close(self) -> None:
        """Close the shard files this process opened (the case handle was evicted or is done)."""
        fds, self._fds = self._fds, {}
        if self._pid == os.getpid():
            for fd, _ in fds.values():
                os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}  # descriptors are per process; the receiver opens its own
        return state

    def _index(self, s: tuple, fd: int, size: int) -> np.ndarray:
        import crc32c

        idx = self._indexes.get(s)
        if idx is not None:
            return idx
        nbytes = self.n_inner * 16 + 4
        if size < nbytes:
            raise StoreIntegrityError(f"{self._where_shard(s)}: {size} bytes, too short for its index (truncated). {REBUILD_HINT}")
        raw = os.pread(fd, nbytes, size - nbytes)
        if crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise StoreIntegrityError(f"{self._where_shard(s)}: shard index checksum mismatch (corrupt or truncated). {REBUILD_HINT}")
        idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(*self.per_shard, 2)
        self._indexes[s] = idx
        return idx

    def _where_shard(self, s: tuple) -> str:
        return f"case {self.case_id!r}, array {self.name!r}, shard file {self._shard_name(s)}"

    def _where(self, chunk: tuple) -> str:
        # built only when raising: formatting it for every chunk read cost more than the checks
        return f"case {self.case_id!r}, array {self.name!r}, inner chunk {chunk}"

    def read(self, lo: Sequence[int], hi: Sequence[int], out: np.ndarray) -> None:
        """Copy array[lo:hi] (inside the array) into ``out`` (shape hi - lo, any strides).

        Reads and decodes exactly the inner chunks the box overlaps, nothing else.
        """
        import crc32c

        lo = [int(v) for v in lo]
        hi = [int(v) for v in hi]
        if any(h <= l_ for l_, h in zip(lo, hi)):
            return
        c0 = [l_ // c for l_, c in zip(lo, self.chunk)]
        c1 = [(h - 1) // c for h, c in zip(hi, self.chunk)]
        index_bytes = self.n_inner * 16 + 4
        for ci in np.ndindex(*[b - a + 1 for a, b in zip(c0, c1)]):
            chunk = tuple(a + i for a, i in zip(c0, ci))
            s = tuple(ch * c // sh for ch, c, sh in zip(chunk, self.chunk, self.shard))
            fd, size = self._open(s)
            idx = self._index(s, fd, size)
            local = tuple(ch - sh * (self.shard[d] // self.chunk[d]) for d, (ch, sh) in enumerate(zip(chunk, s)))
            off, n = idx[local]
            if off == _MISSING or n == _MISSING:
                raise StoreIntegrityError(f"{self._where(chunk)} is missing from its shard (every chunk is written). {REBUILD_HINT}")
            if int(off) + int(n) > size - index_bytes or n < 4:
                raise StoreIntegrityError(f"{self._where(chunk)}: byte range beyond the shard data (truncated). {REBUILD_HINT}")
            n = int(n)
            if n > len(self._raw):  # incompressible chunk: blosc stores it with a header
                self._raw = bytearray(n)
            data = memoryview(self._raw)[:n]
            got = os.preadv(fd, [data], int(off))
            if got != n or crc32c.crc32c(data[:-4]) != int.from_bytes(data[-4:], "little"):
                raise StoreIntegrityError(f"{self._where(chunk)}: checksum mismatch (corrupt chunk). {REBUILD_HINT}")
            try:
                self._codec.decode(data[:-4], out=self._buf)
            except Exception as e:
                raise StoreIntegrityError(f"{self._where(chunk)}: does not decode ({type(e).__name__}: {e}). {REBUILD_HINT}") from e
            a = [max(l_, ch * c) for l_, ch, c in zip(lo, chunk, self.chunk)]
            b = [min(h, (ch + 1) * c) for h, ch, c in zip(hi, chunk, self.chunk)]
            src = tuple(slice(x - ch * c, y - ch * c) for x, y, ch, c in zip(a, b, chunk, self.chunk))
            dst = tuple(slice(x - l_, y - l_) for x, y, l_ in zip(a, b, lo))
            out[dst] = self._buf[src]


class RowReader:
    """Rows of an unsharded 2D Zarr v3 array (``fg_locations``: bytes + blosc + crc32c per chunk).

    A forced-foreground sample needs one row; with the store's 4096-row chunks that is one 64 KiB
    decode. The last decoded chunk is kept (consecutive rows of a class share it).
    """

    def __init__(self, array_dir: Path, case_id: str, name: str):
        import numcodecs

        self.case_id, self.name, self.dir = case_id, name, Path(array_dir)
        try:
            meta = json.loads((self.dir / "zarr.json").read_text())
            self.shape = tuple(int(s) for s in meta["shape"])
            self.chunk = tuple(int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"])
            if meta["chunk_grid"]["name"] != "regular" or [c["name"] for c in meta["codecs"]] != ["bytes", "blosc", "crc32c"]:
                raise UnsupportedLayout("codecs")
            if len(self.shape) != 2 or self.chunk[1] != self.shape[1]:
                raise UnsupportedLayout("not a row-chunked table")
            endian = meta["codecs"][0].get("configuration", {}).get("endian", "little")
            self.dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
            self.sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        except FileNotFoundError:
            raise StoreIntegrityError(f"case {case_id!r}: {ZARR_DIR}/{case_id}/{name}/zarr.json is missing. {REBUILD_HINT}") from None
        except (KeyError, ValueError, TypeError) as e:
            raise UnsupportedLayout(str(e)) from e
        self._codec = numcodecs.Blosc()
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def row(self, r: int) -> np.ndarray:
        import crc32c

        c = r // self.chunk[0]
        if self._cached is None or self._cached[0] != c:
            key = f"c{self.sep}{c}{self.sep}0"
            where = f"case {self.case_id!r}, array {self.name!r}, chunk ({c}, 0)"
            try:
                data = (self.dir / key.replace(self.sep, "/")).read_bytes()
            except FileNotFoundError:
                raise StoreIntegrityError(f"{where}: chunk file {ZARR_DIR}/{self.case_id}/{self.name}/{key} is missing. {REBUILD_HINT}") from None
            if len(data) < 4 or crc32c.crc32c(memoryview(data)[:-4]) != int.from_bytes(data[-4:], "little"):
                raise StoreIntegrityError(f"{where}: checksum mismatch (corrupt chunk). {REBUILD_HINT}")
            try:
                table = np.frombuffer(self._codec.decode(memoryview(data)[:-4]), dtype=self.dtype).reshape(-1, self.shape[1])
            except Exception as e:
                raise StoreIntegrityError(f"{where}: does not decode ({type(e).__name__}: {e}). {REBUILD_HINT}") from e
            self._cached = (c, table)
        return self._cached[1][r - c * self.chunk[0]]

    @property
    def nbytes(self) -> int:
        return 0 if self._cached is None else self._cached[1].nbytes


class _ZarrFallback:
    """zarr-python through the store's CheckedArray, for arrays ShardReader does not understand."""

    def __init__(self, array: CheckedArray):
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype

    def read(self, lo, hi, out):
        out[...] = self.array[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]


# --------------------------------------------------------------------------------------------
# One case, one worker
# --------------------------------------------------------------------------------------------


class CaseHandle:
    """A case opened in one worker: box readers for image and label, its foreground rows, its stats."""

    def __init__(self, store: PreparedStore, case_id: str, normalization_mode: str, channels: int):
        self.case_id = case_id
        self.meta = store.meta(case_id)
        base = store.root / store.manifest["storage"]["zarr"] / case_id
        store.check_case_files(case_id)  # existence and size of every chunk file (a few stat calls, once)
        group = None
        readers = {}
        for name in ("image", "label"):
            try:
                readers[name] = ShardReader(base / name, case_id, name)
            except UnsupportedLayout:
                group = group if group is not None else store._zarr()[case_id]
                readers[name] = _ZarrFallback(CheckedArray(group[name], case_id, name))
        self.image, self.label = readers["image"], readers["label"]
        self.shape = tuple(self.label.shape[-3:])
        self.image_has_channels = len(self.image.shape) == 4
        self.num_classes = store.num_classes
        self._store = store
        self._fg = None
        self.norm = normalization(store, self.meta, normalization_mode, channels)

    def fg_voxel(self, row: int) -> np.ndarray:
        """(x, y, z) of row ``row`` of fg_locations (reads the one chunk holding it)."""
        if self._fg is None:
            try:
                self._fg = RowReader(self._store.root / self._store.manifest["storage"]["zarr"] / self.case_id / "fg_locations",
                                     self.case_id, "fg_locations")
            except UnsupportedLayout:
                group = self._store._zarr()[self.case_id]
                self._fg = _RowFallback(CheckedArray(group["fg_locations"], self.case_id, "fg_locations"))
        if not 0 <= row < len(self._fg):
            raise StoreIntegrityError(f"case {self.case_id!r}: fg_locations has {len(self._fg)} rows, the manifest "
                                      f"ranges point at row {row}. {REBUILD_HINT}")
        return self._fg.row(row)[1:4]

    @property
    def nbytes(self) -> int:
        return 0 if self._fg is None else self._fg.nbytes

    def close(self) -> None:
        """Close the shard files the direct readers keep open (zarr-python fallbacks hold none)."""
        for r in (self.image, self.label):
            if isinstance(r, ShardReader):
                r.close()


class _RowFallback:
    def __init__(self, array: CheckedArray):
        self.array = array

    def __len__(self) -> int:
        return self.array.shape[0]

    def row(self, r: int) -> np.ndarray:
        return np.asarray(self.array[r], np.int32)

    nbytes = 0


def read_box(reader, lo: Sequence[int], hi: Sequence[int], out: np.ndarray, fill, shape: Sequence[int],
             lead: tuple = ()) -> None:
    """out = volume[lo:hi] with ``fill`` outside the volume (``out`` may be a flipped view)."""
    a = [max(0, v) for v in lo]
    b = [min(s, v) for s, v in zip(shape, hi)]
    inner = tuple(slice(x - l_, y - l_) for x, y, l_ in zip(a, b, lo))
    if any(y <= x for x, y in zip(a, b)):
        out[...] = fill
        return
    # fill only the slabs outside the volume, not the whole box
    for d in range(3):
        n = out.shape[len(lead) + d]
        if inner[d].start > 0:
            out[(Ellipsis,) + tuple(slice(None) if k != d else slice(0, inner[d].start) for k in range(3))] = fill
        if inner[d].stop < n:
            out[(Ellipsis,) + tuple(slice(None) if k != d else slice(inner[d].stop, n) for k in range(3))] = fill
    target = out[(Ellipsis, *inner)]
    if lead:
        for c in range(lead[0]):
            reader.read((c, *a), (c + 1, *b), target[c:c + 1])
    else:
        reader.read(a, b, target)


class ZarrPatchReader:
    """Reads raw micro-batches for a plan from the Zarr store. One instance per worker (lazy, picklable)."""

    def __init__(self, store: PreparedStore, plan: SamplePlan, *, normalization_mode: str, channels: int = 1,
                 max_open_cases: int = 64, max_cached_bytes: int = 256 << 20):
        self.store = store
        self.plan = plan
        self.normalization_mode = normalization_mode
        self.channels = channels
        self.max_open_cases = max_open_cases
        self.max_cached_bytes = max_cached_bytes
        self.image_format = image_format(store)
        self._cases: OrderedDict[str, CaseHandle] = OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cases"] = OrderedDict()
        return state

    def case(self, case_id: str) -> CaseHandle:
        h = self._cases.get(case_id)
        if h is None:
            h = CaseHandle(self.store, case_id, self.normalization_mode, self.channels)
            self._cases[case_id] = h
            # few handles, and few bytes of decoded foreground tables (one whole table per case in
            # stores written before fg_locations was chunked)
            while len(self._cases) > self.max_open_cases or (
                    len(self._cases) > 1 and sum(c.nbytes for c in self._cases.values()) > self.max_cached_bytes):
                self._cases.popitem(last=False)[1].close()
        else:
            self._cases.move_to_end(case_id)
        return h

    def close(self) -> None:
        """Close every open case's shard files (they reopen on the next read)."""
        while self._cases:
            self._cases.popitem()[1].close()

    def read_micro_batch(self, indices: Sequence[int], shared=None) -> dict:
        """The raw micro-batch of the given global sample indices (``raw_batch.allocate_raw`` layout)."""
        specs = [self.plan.sample(i) for i in indices]
        return assemble_micro_batch(specs, [self.case(s.case_id) for s in specs], self.plan, self.channels,
                                    *self.image_format, shared=shared)


class ArrayReader:
    """The box-reader interface over an in-memory array (WebDataset volumes, tests)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def read(self, lo, hi, out):
        out[...] = self.array[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]


def annotated_mask(handles) -> np.ndarray | None:
    """bool [m, num_classes]: False where a class is unannotated in the sample's case (its mask file
    was missing, ``missing_classes`` of the manifest), for the loss to marginalise. None when the
    handles do not know their class count (then every class counts as annotated)."""
    n = {getattr(h, "num_classes", None) for h in handles}
    if not handles or None in n or len(n) != 1:
        return None
    out = np.ones((len(handles), n.pop()), dtype=bool)
    for b, h in enumerate(handles):
        meta = getattr(h, "meta", None) or {}
        missing = [int(k) for k in (meta.get("missing_classes") or []) if 0 < int(k) < out.shape[1]]
        out[b, missing] = False
    return out


def assemble_micro_batch(specs, handles, plan: SamplePlan, channels: int,
                         image_dtype: torch.dtype = torch.int16, pad: float = IMAGE_FILL,
                         shared=None) -> dict:
    """Read each planned sample from its case handle into a raw micro-batch.

    A handle has ``image``/``label`` box readers, ``shape``, ``norm`` [C, 4], ``image_has_channels``,
    ``num_classes``, ``meta`` (its ``missing_classes`` become ``raw["annotated"]``, see
    ``annotated_mask``) and ``fg_voxel(row)`` (``CaseHandle`` for Zarr, ``WdsCaseHandle`` for decoded tar samples).
    ``shared``: where the voxel tensors live (``raw_batch.allocate_raw``: False when this process
    augments the batch itself, a ``SlabPool`` for recycled shared memory).
    """
    patch, initial = plan.patch, plan.initial
    noisy = [float(s.aug["noise_std"]) > 0 for s in specs]
    label_dtype = torch.int16 if any(np.dtype(h.label.dtype).itemsize > 1 for h in handles) else torch.uint8
    placed = [spatial_box_and_affine(s.aug, patch, initial) for s in specs if s.spatial]  # (lo, hi, affine)
    boxes = [(lo, hi) for lo, hi, _ in placed]
    raw = allocate_raw([s.spatial for s in specs], noisy, channels, patch, boxes, label_dtype, image_dtype, shared)
    off = crop_offset(patch, initial)
    ic = js = jn = 0
    for b, (spec, h) in enumerate(zip(specs, handles)):
        raw["sample_index"][b] = spec.index
        raw["norm"][b] = h.norm
        fg = h.fg_voxel(spec.fg_row) if spec.fg_row >= 0 else None
        origin = resolve_origin(spec, h.shape, initial, patch, fg)
        lead = (channels,) if h.image_has_channels else ()
        if spec.spatial:
            # only the box of the initial patch this sample's rotated/scaled grid touches
            lo, hi = boxes[js]
            img = raw["spatial_image"][js].numpy()
            lab = raw["spatial_label"][js][0].numpy()
            glo = [o + a for o, a in zip(origin, lo)]
            ghi = [o + b_ for o, b_ in zip(origin, hi)]
            read_box(h.image, glo, ghi, img if lead else img[0], pad, h.shape, lead)
            read_box(h.label, glo, ghi, lab, 0, h.shape)
            raw["spatial_box"][js] = (lo, hi)
            set_spatial_affine(raw, js, spec.aug, patch, initial, placed[js][2])
            js += 1
        else:
            glo = [o + d for o, d in zip(origin, off)]
            ghi = [a + p for a, p in zip(glo, patch)]
            mir = spec.aug["mirror"]
            img = mirror_view(raw["crop_image"][ic].numpy(), mir)
            lab = mirror_view(raw["crop_label"][ic, 0].numpy(), mir)
            read_box(h.image, glo, ghi, img if lead else img[0], pad, h.shape, lead)
            read_box(h.label, glo, ghi, lab, 0, h.shape)
            ic += 1
        if noisy[b]:
            raw["noise_key"][jn] = plan.noise_key(spec.index)  # the field is made where it is augmented
            jn += 1
    raw["params"] = stack_params([s.aug for s in specs])
    raw["annotated"] = annotated_mask(handles)  # numpy, pickled by value like the other small fields
    return raw
