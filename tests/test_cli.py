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


# ---------------------------------------------------------------------------------------------
# train --dry-run: the ranks' own validate() (train/preflight.py) in one process, then a summary
# ---------------------------------------------------------------------------------------------


def _debug(tmp_path, root, *overrides):
    from conftest import REPO

    from stunet_scale.config import load_config

    return load_config(REPO / "configs" / "debug.yaml", [f"run_dir={tmp_path / 'run'}", f"data.root={root}", *overrides])


def _dry_run(cfg, world, **kwargs):
    from stunet_scale.train.dry_run import dry_run

    lines = []
    code = dry_run(cfg, world, out=lines.append, **kwargs)
    return code, "\n".join(lines)


def test_dry_run_ok_for_the_debug_recipe(tmp_path, prepared_demo):
    code, text = _dry_run(_debug(tmp_path, prepared_demo), 1)
    assert code == 0, text
    assert "global 2 = micro 2 x 1 ranks x accumulation 1" in text and "training cases in" in text
    assert "dry run OK" in text


def test_dry_run_refuses_what_every_rank_refuses(tmp_path, prepared_demo):
    # backend none cannot run 2 ranks; global batch 2 cannot be split as micro 2 x 2 ranks.
    code, text = _dry_run(_debug(tmp_path, prepared_demo), 2)
    assert code == 2 and "distributed.backend=none" in text and "dry run FAIL" in text
    code, text = _dry_run(_debug(tmp_path, prepared_demo, "distributed.backend=ddp"), 2)
    assert code == 2 and "schedule.global_batch=2" in text
    # the store against the config, as on the ranks (the old dry run only warned about data.root)
    code, text = _dry_run(_debug(tmp_path, tmp_path / "missing"), 1)
    assert code == 2 and "data.root=" in text and "does not exist" in text
    code, text = _dry_run(_debug(tmp_path, prepared_demo, "model.num_classes=7"), 1)
    assert code == 2 and "set model.num_classes=" in text


def test_dry_run_checks_webdataset_shards_against_readers(tmp_path, prepared_demo):
    from stunet_scale.data.store import open_store
    from stunet_scale.data.stream.webdataset_reader import train_shards

    shards = len(train_shards(open_store(prepared_demo), ["train"]))
    wds = ["data.format=wds", "distributed.backend=ddp", "schedule.global_batch=4"]
    code, text = _dry_run(_debug(tmp_path, prepared_demo, *wds, f"data.num_workers={shards}"), 2)
    assert code == 2, text
    assert f"{shards} WebDataset shards for 2 ranks x {shards} workers = {2 * shards} readers" in text
    code, text = _dry_run(_debug(tmp_path, prepared_demo, *wds, "data.num_workers=0", "schedule.global_batch=2",
                                 "schedule.micro_batch=2"), 1)
    assert code == 0, text


def test_dry_run_checkpoint_cadence_uses_where_the_schedule_stops(tmp_path, prepared_demo):
    # The debug recipe is 600 samples / batch 2 = 300 steps; a larger schedule.max_steps does not
    # lengthen it (Schedule.stop_step), so a checkpoint every 500 steps would never be written.
    _, text = _dry_run(_debug(tmp_path, prepared_demo, "schedule.max_steps=1000", "checkpoint.every_steps=500"), 1)
    assert "checkpoint.every_steps=500 > 300 steps in the run" in text, text
    _, text = _dry_run(_debug(tmp_path, prepared_demo, "schedule.max_steps=200", "checkpoint.every_steps=250"), 1)
    assert "checkpoint.every_steps=250 > 200 steps in the run" in text


def test_dry_run_adds_the_planners_lines_it_is_given(tmp_path, prepared_demo):
    seen = []

    def memory_check(cfg, world, accumulation):
        seen.append((world, accumulation))
        return [("error", "memory: too much")]

    code, text = _dry_run(_debug(tmp_path, prepared_demo), 1, memory_check=memory_check)
    assert code == 2 and seen == [(1, 1)] and "FAIL  memory: too much" in text


def test_train_dry_run_from_the_command_line(tmp_path, prepared_demo):
    from conftest import REPO

    for command in ([sys.executable, "-m", "stunet_scale", "train"], [sys.executable, "-m", "stunet_scale.train"]):
        out = run("--config", str(REPO / "configs" / "debug.yaml"), "--dry-run", "--world-size", "2",
                  f"run_dir={tmp_path / 'run'}", f"data.root={prepared_demo}", check=False, command=command)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "distributed.backend=none runs one process but 2 ranks" in out.stdout
    out = run("train", "--config", str(REPO / "configs" / "debug.yaml"), "--dry-run", f"run_dir={tmp_path / 'run'}",
              f"data.root={prepared_demo}", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "memory (" in out.stdout and "dry run OK" in out.stdout  # `stunet-scale train` adds the planner's lines


@pytest.mark.parametrize("overrides, key", [
    (["augmentation.rotation_p=1.5"], "augmentation.rotation_p"),
    (["augmentation.rotation_p=1.5", "data.num_workers=-3"], "data.num_workers"),
])
def test_train_dry_run_refuses_bad_augmentation_and_loader_knobs(tmp_path, overrides, key):
    # These used to be checked only inside the data stream, so the dry run printed "dry run OK".
    from conftest import REPO

    out = run("train", "--config", str(REPO / "configs" / "debug.yaml"), "--dry-run", f"run_dir={tmp_path / 'run'}",
              *overrides, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert key in out.stderr and "dry run OK" not in out.stdout
