"""`stunet-scale bench train` runs both steps on CPU and reports measured numbers (tiny model here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.timeout(600)
def test_bench_train_json_on_cpu():
    cmd = [sys.executable, "-m", "stunet_scale", "bench", "train", "--base-width", "2", "--patch", "64", "--batch", "1",
           "--num-classes", "3", "--steps", "1", "--warmup", "1", "--device", "cpu", "--json"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout)
    assert res["device"].startswith("cpu") and res["patch"] == 64
    ours, ref = res["ours"], res["reference"]
    assert ours["precision"] == "bf16 autocast" and ours["checkpointing"] == "block"
    assert ref["precision"] == "fp16 autocast + GradScaler" and ref["checkpointing"] == "none"
    for m in (ours, ref):
        assert m["patches_per_s"] > 0 and m["tflops"] > 0 and m["peak_memory_bytes"] > 100 * 2**20
        assert m["memory_kind"].startswith("peak RSS")
    assert res["speedup"] == pytest.approx(ours["patches_per_s"] / ref["patches_per_s"])
