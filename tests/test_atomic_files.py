"""stunet_scale/atomic_files.py: the target holds the old or the whole new content, never a part."""

from __future__ import annotations

import json
import os
import stat

import pytest

from stunet_scale.atomic_files import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_writes_replace_the_target_and_leave_no_temporary_file(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_text(target, "old\n")
    atomic_write_json(target, {"b": [1, 2], "a": 1}, indent=1)
    assert json.loads(target.read_text()) == {"a": 1, "b": [1, 2]} and target.read_text().endswith("\n")
    atomic_write_bytes(tmp_path / "blob", b"\x00\x01", mode=0o644)
    assert (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(os.stat(tmp_path / "blob").st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "manifest.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "case.nii.gz"
    target.write_bytes(b"old")
    seen = []
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target, keep_suffix=True) as tmp:
            seen.append(tmp.name)
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert seen[0].startswith(".tmp-") and seen[0].endswith(".nii.gz")  # nibabel picks the format by the suffix
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]
