"""`stunet-scale bench gpu` on the CPU: its dry run, its caps, its handling of a failing or hanging
part, and the syntax of the two shell scripts that run it on a lent GPU machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from stunet_scale.bench import gpu as G


def _bench_gpu(out, *args, env=None):
    cmd = [sys.executable, "-m", "stunet_scale", "bench", "gpu", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def test_cpu_dry_run_writes_json_and_table(tmp_path):
    # The cheap parts (the train parts take ~1 min on 2 cores; the full dry run is ~2 min)
    parts = "cudnn_probe,train_h,planner,augment"
    r = _bench_gpu(tmp_path, "--cpu-dry-run", "--parts", parts)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["dry_run"] is True and rep["environment"]["dry_run"] is True
    for key in ("torch", "cuda", "cudnn", "device_name", "driver", "git_revision", "python"):
        assert key in rep["environment"]
    assert list(rep["parts"]) == parts.split(",")
    # the caps share what the environment probe left of the budget
    assert sum(rep["caps_s"].values()) + rep["environment"]["seconds"] == pytest.approx(rep["budget_s"], abs=0.1)
    for name, p in rep["parts"].items():
        assert p["status"] == "ok", (name, p)
        assert p["met"] is None and "dry run" in p["met_reason"]  # no goal is judged on CPU numbers
        assert p["seconds"] > 0 and p["goal"] == G.GOALS[name] and p["numbers"]
    h = rep["parts"]["train_h"]["numbers"]
    assert h["seconds_per_step"] > 0 and h["tflops"] > 0 and h["peak_memory_bytes"] > 0
    assert h["mfu"] is None and h["device_peak_bf16_tflops"] is None  # no GPU: no peak to divide by
    # the planner saw the measured H peak, and refused to compare a CPU RSS with device bytes
    row = rep["parts"]["planner"]["numbers"]["sizes"]["H"]
    assert row["predicted_gib"] > 0 and row["measured_gib"] > 0 and row["relative_error"] is None
    aug = rep["parts"]["augment"]["numbers"]
    assert aug["ms_per_batch"] > 0 and aug["parity_ok"] is True
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| part | status | s | number | goal | met |" in md and "CPU dry run" in md
    for name in parts.split(","):
        assert f"| {name} | ok |" in md


def test_failing_and_hanging_parts_do_not_stop_the_others(tmp_path):
    # budget 45 s, less the environment probe, over weights (1, 1.5, 2): caps of ~9, ~13 and ~18 s.
    # A relative --out: the parts run in the repo, and must still write where the user meant.
    r = subprocess.run([sys.executable, "-m", "stunet_scale", "bench", "gpu", "--out", "rel", "--cpu-dry-run",
                        "--parts", "cudnn_probe,augment,predict", "--budget-s", "45"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                                                        **{G.FAULT_ENV: "augment:fail,predict:hang"}))
    tmp_path = tmp_path / "rel"
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    p = rep["parts"]
    assert p["cudnn_probe"]["status"] == "ok"
    assert p["augment"]["status"] == "failed" and "injected fault" in p["augment"]["stderr_tail"]
    assert p["predict"]["status"] == "timeout" and p["predict"]["returncode"] is None
    assert p["predict"]["seconds"] == pytest.approx(p["predict"]["cap_s"], abs=5)
    assert rep["total_seconds"] < 45 + 5  # the caps held, the environment probe included
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| augment | failed |" in md and "| predict | timeout |" in md


def test_usage_errors_exit_2(tmp_path):
    assert _bench_gpu(tmp_path, "--parts", "train_b,nonsense").returncode == 2
    assert _bench_gpu(tmp_path, "--budget-s", "0").returncode == 2
    assert not (tmp_path / "gpu_check.json").exists()


def test_budget_split_is_proportional_and_sums_to_the_budget():
    caps = G.split_budget(G.PARTS, 480)
    assert sum(caps.values()) == pytest.approx(480)
    total_w = sum(G.WEIGHTS.values())
    for name in G.PARTS:
        assert caps[name] == pytest.approx(480 * G.WEIGHTS[name] / total_w)
    assert G.split_budget(["augment", "predict"], 35) == pytest.approx({"augment": 15, "predict": 20})
    assert G.split_budget(["x"], 10, weights={}) == {"x": 10}  # unknown weight counts 1
    with pytest.raises(ValueError):
        G.split_budget([], 10)
    with pytest.raises(ValueError):
        G.split_budget(["augment"], 0)


def test_parts_are_run_in_canonical_order():
    assert G.parse_parts(None) == list(G.PARTS)
    assert G.parse_parts("planner, train_h,train_b") == ["train_b", "train_h", "planner"]
    with pytest.raises(ValueError):
        G.parse_parts("train_x")


def test_pytest_summary_and_peak_table():
    s = G.parse_pytest_summary("....\n3 passed, 1 failed, 2 skipped, 78 deselected, 1 error in 4.2s\n")
    assert (s["passed"], s["failed"], s["skipped"], s["deselected"], s["errors"]) == (3, 1, 2, 78, 1)
    assert G.parse_pytest_summary("no tests ran")["passed"] == 0
    from stunet_scale.bench.train import peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_bf16_tflops("NVIDIA H200") == 989
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_bf16_tflops("NVIDIA L4") is None and peak_bf16_tflops(None) is None


@pytest.mark.parametrize("script", ["launch/gpu_check.sh", "launch/gather_gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-S", "warning", str(REPO / script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
