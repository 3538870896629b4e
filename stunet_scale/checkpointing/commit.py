"""The commit protocol: a checkpoint either is complete and verifiable, or it does not count.

    checkpoints/
      latest                      text: the newest committed directory name (updated last)
      step_000000050/             committed: COMMITTED marker + manifest.json verify
      step_000000100.tmp/         being written (or left by a kill): never loaded, removed at start
      step_000000150.invalid-.../ failed verification once; kept for inspection, never loaded

Writing (all ranks): every rank writes its files into ``step_N.tmp/``; barrier; the ranks hash
disjoint slices of the file list in parallel (crc32c: hardware-accelerated, GB/s); rank 0 writes
``manifest.json`` (every file's size and crc32c) and the ``COMMITTED`` marker, fsyncs, renames
``step_N.tmp`` to ``step_N`` (atomic on POSIX), fsyncs the parent, then replaces ``latest`` via a
temporary file + ``os.replace``; barrier. DeepSpeed alone writes its ``latest`` before other ranks
finish their shards (``runtime/engine.py``'s ``save_checkpoint``: rank 0 writes ``latest`` before the final
barrier); here nothing is visible until everything is durable.

Reading: the newest directory whose marker exists and whose manifest verifies wins. A newer one
that fails is logged as an ERROR and renamed ``*.invalid-<time>`` (so a later save of that step
can be committed), and the previous valid one is used. Checkpoint directories but none valid is
an error (``NoValidCheckpoint``), never a silent fresh start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from ..atomic_files import atomic_write_text, fsync_dir

log = logging.getLogger("stunet_scale.checkpointing")

MARKER = "COMMITTED"
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on; the message names the directory and the fix."""


class NoValidCheckpoint(CheckpointError):
    pass


def step_dirname(step: int) -> str:
    return f"step_{step:09d}"


def file_crc32c(path: Path) -> str:
    import crc32c

    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = crc32c.crc32c(chunk, value)
    return f"{value:08x}"


def list_files(directory: Path) -> list[str]:
    """Relative paths of all regular files under ``directory`` except the manifest and marker."""
    out = []
    for root, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel not in (MANIFEST, MARKER):
                out.append(rel)
    return sorted(out)


def hash_files(directory: Path, files: list[str], rank: int = 0, world_size: int = 1) -> dict[str, dict]:
    """Size and crc32c of this rank's share (every world_size-th file) of ``files``."""
    out = {}
    for rel in files[rank::world_size]:
        p = directory / rel
        out[rel] = {"size": p.stat().st_size, "crc32c": file_crc32c(p)}
    return out


def commit(tmp_dir: Path, env, step: int, extra: dict | None = None, hook=None) -> Path:
    """Turn a fully written ``step_N.tmp`` into ``step_N`` (collective; see the module docstring)."""
    tmp_dir = Path(tmp_dir)
    final = tmp_dir.with_name(tmp_dir.name[: -len(".tmp")])
    env.barrier()  # every rank's files are written
    files = list_files(tmp_dir) if env.is_main else None
    files = env.broadcast_object(files)
    parts = env.all_gather_object(hash_files(tmp_dir, files, env.rank, env.world_size))
    if env.is_main:
        manifest = {"step": step, "files": {k: v for part in parts for k, v in part.items()}, **(extra or {})}
        atomic_write_text(tmp_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        if hook:
            hook("before_marker")
        atomic_write_text(tmp_dir / MARKER, json.dumps({"step": step, "time": time.time()}))
        if final.exists():  # a stale copy of the same step (e.g. after a rollback): move it aside
            final.rename(final.with_name(f"{final.name}.replaced-{int(time.time())}"))
        os.rename(tmp_dir, final)
        fsync_dir(final.parent)
        atomic_write_text(final.parent / LATEST, final.name + "\n")  # fsyncs the parent again
    env.barrier()
    return final


def verify(directory: Path, env=None) -> tuple[bool, str]:
    """(ok, reason). With ``env`` the ranks share the hashing and agree on the answer."""
    directory = Path(directory)
    reason = ""
    manifest = None
    if not (directory / MARKER).is_file():
        reason = f"no {MARKER} marker (the save did not finish)"
    else:
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = f"unreadable {MANIFEST} ({e.__class__.__name__})"
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    if not reason:
        names = sorted(manifest["files"])
        for rel in names[rank::world]:
            want = manifest["files"][rel]
            p = directory / rel
            if not p.is_file():
                reason = f"missing file {rel}"
                break
            size = p.stat().st_size
            if size != want["size"]:
                reason = f"{rel} has {size} bytes, manifest says {want['size']}"
                break
            if file_crc32c(p) != want["crc32c"]:
                reason = f"{rel} checksum mismatch (corrupted)"
                break
    if env is not None and env.world_size > 1:
        reasons = env.all_gather_object(reason)
        reason = next((r for r in reasons if r), "")
    return (not reason), reason


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Committed-looking checkpoint directories, newest first (tmp/invalid ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def clean_stale_tmp(root: Path) -> list[str]:
    """Remove ``*.tmp`` leftovers of a killed save (rank 0, before any new save)."""
    removed = []
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".tmp") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def resolve_newest_valid(root: Path, env=None, quarantine: bool = True) -> Path | None:
    """Newest valid checkpoint under ``root``; None when there are none at all.

    Raises NoValidCheckpoint when checkpoint directories exist but none verifies.
    """
    root = Path(root)
    candidates = list_checkpoints(root)
    failures = []
    for _step, path in candidates:
        ok, reason = verify(path, env)
        if ok:
            if failures:
                log.error("falling back to %s: newer checkpoint(s) failed verification: %s", path.name, "; ".join(failures))
            return path
        failures.append(f"{path.name}: {reason}")
        log.error("checkpoint %s is not valid: %s", path, reason)
        if quarantine and (env is None or env.is_main):
            try:
                path.rename(path.with_name(f"{path.name}.invalid-{int(time.time())}"))
            except OSError as e:
                log.error("could not rename invalid checkpoint %s aside: %s", path, e)
        if env is not None:
            env.barrier()
    if failures:
        raise NoValidCheckpoint(
            f"{root} holds {len(failures)} checkpoint(s) and none is valid ({'; '.join(failures)}). "
            "Refusing to start from scratch over them: restore a good copy, point checkpoint.resume at one, "
            "or use a new run_dir"
        )
    return None


def read_latest_pointer(root: Path) -> str | None:
    """The name in ``latest`` if it is well-formed; a hint for humans and tools, not trusted."""
    try:
        name = (Path(root) / LATEST).read_text().strip()
    except OSError:
        return None
    return name if _STEP_RE.match(name) else None


def apply_retention(root: Path, keep_last: int, milestone_every: int) -> list[str]:
    """Delete old checkpoints: keep the newest ``keep_last`` valid-looking ones and milestones.

    Never deletes the newest directory; a failed delete is logged, not fatal (torchtitan's rule).
    """
    if keep_last < 2:
        raise ValueError("keep_last must be >= 2")
    removed = []
    entries = [(s, p) for s, p in list_checkpoints(root) if (p / MARKER).is_file()]
    for i, (step, path) in enumerate(entries):
        if i < keep_last or (milestone_every and step % milestone_every == 0):
            continue
        try:
            shutil.rmtree(path)
            removed.append(path.name)
        except OSError as e:
            log.warning("could not delete old checkpoint %s: %s", path, e)
    return removed
