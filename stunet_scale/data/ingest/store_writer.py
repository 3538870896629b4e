"""The write side of the prepared store (``prepare`` is its only caller): one case as a sharded
Zarr v3 group, one case as WebDataset tar members, a tar with fixed metadata. The format itself
(names, codecs, manifest, the read side) is ``stunet_scale/data/store.py``."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..store import ARRAYS, CHUNK, CODECS, FG_CHUNK_ROWS, IMAGE_FILL, blosc_codec, wds_key


def manifest_codecs() -> dict:
    """The per-array codec record of ``manifest.json`` (``storage.codecs``)."""
    return {name: {"blosc": dict(CODECS[name]), "checksum": "crc32c"} for name in ARRAYS}


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()




def _spatial_chunks(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lead = tuple(1 for _ in shape[:-3])
    chunks = lead + (CHUNK,) * 3
    shards = lead + tuple(max(CHUNK, math.ceil(n / CHUNK) * CHUNK) for n in shape[-3:])
    return chunks, shards


def write_case_zarr(path: Path, image: np.ndarray, label: np.ndarray, fg_rows: np.ndarray, attrs: dict) -> dict:
    """Write one case as a standalone Zarr v3 group at ``path`` (a temp dir, renamed into the store
    by the caller). Returns ``{file key relative to the group: size in bytes}`` of the chunk files,
    which the manifest records so a lost file is detected without reading it.
    """
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    def compressors(name):
        return [BloscCodec(**CODECS[name]), Crc32cCodec()]

    cfg = {"write_empty_chunks": True}
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update(attrs)
    for name, data, fill in (("image", image, IMAGE_FILL if image.dtype == np.int16 else 0), ("label", label, 0)):
        chunks, shards = _spatial_chunks(data.shape)
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards,
                                 compressors=compressors(name), fill_value=fill, config=cfg)
        arr[...] = data
    # 4096-row chunks (64 KiB): a forced-foreground sample reads one row, so it decodes one small
    # chunk instead of the case's whole table (up to ~1M rows, ~20 ms of zstd per sample).
    rows = max(1, min(FG_CHUNK_ROWS, fg_rows.shape[0]))
    arr = group.create_array("fg_locations", shape=fg_rows.shape, dtype=np.int32, chunks=(rows, 4),
                             compressors=compressors("fg_locations"), fill_value=0, config=cfg)
    if fg_rows.shape[0]:
        arr[...] = fg_rows
    files = {}
    for name in ARRAYS:
        base = Path(path) / name
        for f in sorted(base.rglob("*")):
            if f.is_file() and f.name != "zarr.json":
                files[f.relative_to(path).as_posix()] = f.stat().st_size
    return files


def encode_wds_case(case_id: str, image: np.ndarray, label: np.ndarray, fg_rows: np.ndarray, meta: dict) -> list[tuple[str, bytes]]:
    """The tar members of one case: arrays compressed with numcodecs Blosc (``CODECS``: zstd +
    bitshuffle, labels lz4hc), shapes, dtypes and crc32c checksums in ``meta.json`` (the case's
    manifest entry)."""
    key = wds_key(case_id)
    out = [(f"{key}.meta.json", _json_bytes(meta))]
    for name, a in (("image", image), ("label", label), ("fg_locations", fg_rows)):
        out.append((f"{key}.{name}.blosc", bytes(blosc_codec(CODECS[name]).encode(np.ascontiguousarray(a)))))
    return out


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write a tar with fixed metadata (mtime 0, uid 0, mode 644), so identical members give
    identical bytes: an interrupted and an uninterrupted build produce the same shard hashes."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
