"""ruff with the project's settings (pyproject.toml [tool.ruff]) over the package, tests and launch scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found:
        return [found]
    if os.environ.get("CI"):
        pytest.fail("ruff is not installed; it is in the dev extra (pip install -e '.[dev]')")
    pytest.skip("ruff is not installed (pip install -e '.[dev]')")


def test_ruff_finds_nothing():
    out = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", "stunet_scale", "tests", "launch"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"ruff check (fix with `ruff check --fix`):\n{out.stdout}{out.stderr}"


def test_ruff_is_configured_and_would_catch_a_bug(tmp_path):
    # a control: the project's settings are read (a bare ruff would not sort imports) and an unused
    # import or a loop-variable closure is reported
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nfns = [lambda: i for i in range(3)]\n")
    out = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", "--config",
                          str(REPO / "pyproject.toml"), str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    for rule in ("F401", "I001", "B023"):
        assert rule in out.stdout, out.stdout
