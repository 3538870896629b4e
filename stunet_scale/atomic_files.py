"""Write a file so that readers see the old content or the whole new content, never a part.

The one recipe for every file whose readers must not see a torn write (checkpoint manifests and
markers, the store's manifest and shard records, predicted label maps, the resolved config):
write a temporary file in the same directory, fsync it, ``os.replace`` it over the target
(atomic on POSIX within one filesystem), then fsync the directory so the rename itself survives
a crash. A failure on the way removes the temporary file and leaves the target as it was.

The temporary name is ``.<name>.<random>.tmp``: hidden, unique per writer, and matched by no
reader's ``*.json`` / ``*.nii.gz`` pattern. Writers that pick a format from the file name
(nibabel's ``.nii.gz``) ask ``atomic_path(..., keep_suffix=True)`` for ``.tmp-<random>-<name>``.

Directory renames (a checkpoint's ``step_N.tmp`` -> ``step_N``, an export's ``OUT.partial-*``) and
the run lease's link(2)/rename(2) protocol are not plain file writes and have their own code
(checkpointing/commit.py, train/run_lease.py); they use ``fsync_dir`` from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir"]


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable; best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """A temporary path to write to (by any means, e.g. ``nib.save``); on a clean exit it is
    fsynced and replaces ``path``, on an exception it is removed and ``path`` is untouched.

    ``keep_suffix``: the temporary name ends like ``path`` (for writers that choose the format by it).
    """
    path = Path(path)
    tag = uuid.uuid4().hex[:8]
    tmp = path.with_name(f".tmp-{tag}-{path.name}" if keep_suffix else f".{path.name}.{tag}.tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a replace; a leftover only after a failure
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically and durably; ``mode`` (e.g. 0o644) is set before the rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
    return path


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | Path, obj, indent: int | None = None, sort_keys: bool = True) -> Path:
    """``obj`` as JSON plus a final newline, written atomically and durably."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
