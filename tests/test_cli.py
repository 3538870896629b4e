"""CLI contract: every subcommand has --help, `info --json` has the documented keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stunet_scale.cli import build_parser, main

SUBCOMMANDS = ["info", "config", "demo-data", "prepare", "train", "plan", "bench", "export", "predict", "evaluate",
               "transfer-study"]


def run(*args, check=True, command=None):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    command = command or [sys.executable, "-m", "stunet_scale"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, check=check)


def console_script() -> str:
    """The installed `stunet-scale` entry point of the environment running the tests.

    Next to the interpreter first (a venv's bin/ need not be on PATH), else PATH, so the test
    never picks up a script from some other environment when this one has its own.
    """
    beside = Path(sys.executable).parent / "stunet-scale"
    found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("stunet-scale")
    assert found, f"no `stunet-scale` console script next to {sys.executable} or on PATH; pip install -e . first"
    return found


@pytest.mark.parametrize("command", SUBCOMMANDS + ["bench data", "bench train", "bench prepare"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command.split() + ["--help"])
    assert exit_.value.code == 0
    assert "usage: stunet-scale" in capsys.readouterr().out


def test_parser_lists_all_subcommands():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(SUBCOMMANDS) <= set(choices)


def test_info_json_reports_presets_class_maps_and_environment():
    out = run("info", "--json").stdout
    info = json.loads(out)
    assert info["presets"]["H"]["params"] == 1_457_326_221
    assert info["presets"]["S"]["forward_flops_per_128cube_patch"] == 258_754_215_936
    assert set(info["presets"]) == {"S", "B", "L", "H"}
    maps = info["class_maps"]
    assert maps["totalseg-v1"]["foreground_classes"] == 104
    assert maps["totalseg-v2"]["foreground_classes"] == 117
    assert maps["stunet"]["outputs_with_background"] == 105
    env = info["environment"]
    assert env["packages"]["torch"] and "gpus" in env and "cuda" in env


def test_info_text_and_console_script_agree():
    text = run("info").stdout
    assert "1,457,326,221" in text and "25.187" in text
    # The console script is a separate entry point (pyproject's [project.scripts]); run it for real
    # rather than assuming it maps to the same main() as `python -m stunet_scale`.
    script = run("info", command=[console_script()])
    assert script.stdout == text


def test_config_errors_exit_2_with_the_key_named():
    result = run("config", "optim.lrr=1", check=False)
    assert result.returncode == 2
    assert "did you mean 'optim.lr'" in result.stderr
