"""`stunet-scale plan` and `train --dry-run`: memory from the real module graph, time from counted FLOPs."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO

from stunet_scale.config import load_config
from stunet_scale.models import ModelConfig, count_parameters, train_step_flops
from stunet_scale.planning import (
    GIB,
    Setting,
    Workload,
    activation_profile,
    candidate_settings,
    dry_run_memory_check,
    estimate,
    model_facts,
    model_state_bytes,
    plan,
    step_seconds,
)

# The README's memory-facts table: activations of one 128^3 patch, bf16, no checkpointing, measured
# on the meta device (the saved tensors of the network, conv weights included).
DOCS_ACTIVATION_GIB = {"S": 1.0, "B": 2.1, "L": 7.5, "H": 16.7}
TINY = ModelConfig(size=None, base_width=4, blocks_per_stage=1)  # 105 outputs, as the real head


@pytest.mark.parametrize("size", ["S", "B", "L", "H"])
def test_activation_bytes_match_the_documented_measurements(size):
    prof = activation_profile(size, (128, 128, 128), 1, "none", "bf16", simulate=False)
    got = prof.model_saved / GIB
    # The docs round to 0.1 GiB (S: 1.00 on CPU, 1.03 on meta); 5% covers that rounding, not more.
    assert got == pytest.approx(DOCS_ACTIVATION_GIB[size], rel=0.05), f"{size}: {got:.3f} GiB"
    if size == "H":
        # "includes ~2.7 GiB of saved conv weights": every weight once, in bf16.
        assert prof.weight_saved / GIB == pytest.approx(2 * count_parameters("H") / GIB, rel=0.01)
    # 105 logits maps at full resolution in bf16 plus the coarser deep-supervision heads.
    assert prof.logits == pytest.approx(105 * 128**3 * 2 * (1 + 1 / 8 + 1 / 64 + 1 / 512 + 1 / 4096), rel=1e-6)


def test_checkpointing_reduces_what_backward_keeps():
    none, block, stage = (activation_profile("L", (128,) * 3, 1, ac, simulate=False) for ac in ("none", "block", "stage"))
    assert stage.model_saved < block.model_saved < none.model_saved / 2
    assert block.weight_saved < 0.01 * none.weight_saved  # weights inside checkpointed blocks are not kept


def test_activations_scale_with_micro_batch_and_precision():
    one = activation_profile("S", (64,) * 3, 1, "none", "bf16", simulate=False)
    two = activation_profile("S", (64,) * 3, 2, "none", "bf16", simulate=False)
    fp32 = activation_profile("S", (64,) * 3, 1, "none", "fp32", simulate=False)
    acts = lambda p: p.model_saved - p.weight_saved  # noqa: E731
    assert acts(two) == pytest.approx(2 * acts(one), rel=0.01)
    assert acts(fp32) == pytest.approx(2 * acts(one), rel=0.01)


# ---------------------------------------------------------------------------------------------
# The meta-device replay against a real CPU step
# ---------------------------------------------------------------------------------------------


def _glibc_in_use():
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name)
        fn = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    fn.restype = MallInfo2
    return lambda: fn().uordblks + fn().hblkhd


@pytest.mark.parametrize("checkpointing", ["none", "block"])
def test_meta_prediction_matches_a_real_cpu_step(checkpointing):
    """Run the same step for real on CPU (fp32) and read glibc's bytes in use.

    The CPU allocator does not cache, so bytes in use after forward+loss are what the step holds,
    and a polling thread during backward sees its peak. This is the CPU stand-in for comparing
    with torch.cuda.max_memory_allocated on a GPU (see README, "Capacity planning").
    """
    import torch

    from stunet_scale.models import build_stunet
    from stunet_scale.parallel import apply_activation_checkpointing
    from stunet_scale.planning import _deep_supervision_loss

    in_use = _glibc_in_use()
    if in_use is None:
        pytest.skip("needs glibc's mallinfo2 to read the CPU allocator's bytes in use")
    patch, weights = (64, 64, 32), (8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0)
    predicted = activation_profile(TINY, patch, 1, checkpointing, "fp32")
    assert predicted.peak_method == "simulated"

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_stunet(TINY)
    apply_activation_checkpointing(model, checkpointing)
    x = torch.randn(1, 1, *patch)
    # One warm-up step allocates the gradients, which the planner counts with the model states.
    _deep_supervision_loss(model(x), weights).backward()
    gc.collect()
    base = in_use()
    peak, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], in_use())
            time.sleep(0.0002)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        outputs = model(x)
        loss = _deep_supervision_loss(outputs, weights)
        held = in_use() - base
        loss.backward()
    finally:
        stop.set()
        thread.join()
    measured_peak = peak[0] - base
    assert held == pytest.approx(predicted.saved, rel=0.10), (held / 2**20, predicted.saved / 2**20)
    assert measured_peak == pytest.approx(predicted.peak, rel=0.10), (measured_peak / 2**20, predicted.peak / 2**20)


# ---------------------------------------------------------------------------------------------
# Model states, time, recommendation
# ---------------------------------------------------------------------------------------------


def test_model_states_follow_what_the_trainer_keeps():
    facts = model_facts("H")
    P = facts.params
    w = Workload(model="H", gpus=64)
    ddp = model_state_bytes(facts, Setting(0, "none", "none"), w)
    # fp32 weights + fp32 gradients + SGD momentum, bf16 only inside autocast: 12 B/param, 17.5 GB for H.
    assert ddp["params"] + ddp["grads"] + ddp["optimizer"] == 12 * P
    assert 17e9 < 12 * P < 18e9
    z1, z2, z3 = (model_state_bytes(facts, Setting(z, "none", "none"), w) for z in (1, 2, 3))
    # ZeRO-1/2 keep an fp32 copy of the rank's partition for the update; ZeRO-3 aliases it.
    assert z1["params"] == z1["grads"] == 4 * P and z1["optimizer"] == 8 * P / 64
    assert z2["grads"] == 4 * P / 64 and z2["optimizer"] == 8 * P / 64
    # Tensors below the persistence threshold (norm affines, biases) stay whole on every rank.
    assert z3["params"] == 4 * P / 64 + 4 * facts.persistent_params and z3["optimizer"] == 4 * P / 64
    assert z3["buffers"] > z2["buffers"]  # gathered weights in flight
    off = model_state_bytes(facts, Setting(3, "none", "params"), w)
    assert off["params"] + off["optimizer"] < z3["params"] and off["host_per_gpu"] > 0
    adam = model_state_bytes(facts, Setting(0, "none", "none"), Workload(model="H", gpus=64, optimizer="adamw"))
    assert adam["optimizer"] - ddp["optimizer"] == 4 * P  # exp_avg_sq on top of a momentum-sized state


def test_autocast_weight_copies_count_as_activations():
    bf16 = estimate(Workload(model="S", patch=(64,) * 3, micro_batch=1, gpus=8), Setting(3, "none", "none"))
    fp32 = estimate(Workload(model="S", patch=(64,) * 3, micro_batch=1, gpus=8, precision="fp32"), Setting(3, "none", "none"))
    prof = activation_profile("S", (64,) * 3, 1, "none", "bf16")
    weights = prof.weight_saved / GIB
    assert bf16["memory_gib"]["activation_peak"] == pytest.approx(prof.peak / GIB + weights)
    assert weights == pytest.approx(2 * count_parameters("S") / GIB, rel=0.01)
    assert fp32["memory_gib"]["activation_peak"] > bf16["memory_gib"]["activation_peak"]  # fp32 activations are 2x


def test_step_time_from_counted_flops():
    facts = model_facts("B")
    w = Workload(model="B", micro_batch=2, gpus=8, tflops=50.0)
    plain = step_seconds(facts, Setting(0, "none", "none"), w)
    assert plain["compute"] == pytest.approx(2 * train_step_flops("B") / 50e12)
    recompute = step_seconds(facts, Setting(0, "block", "none"), w)
    assert recompute["compute"] == pytest.approx(plain["compute"] * 4 / 3)
    assert step_seconds(facts, Setting(3, "none", "params"), w)["step"] > plain["step"]


def test_recommends_the_cheapest_setting_that_fits():
    roomy = plan(Workload(model="L", gpus=64, gpu_mem_gb=80))
    best = roomy["recommended"]
    assert best["fits"] and best["setting"] == {"zero": 0, "checkpointing": "none", "offload": "none"}
    assert all(best["gpu_hours"] <= r["gpu_hours"] * 1.01 for r in roomy["candidates"] if r["fits"])
    tight = plan(Workload(model="L", gpus=64, gpu_mem_gb=24))
    assert tight["recommended"]["setting"]["checkpointing"] != "none" or tight["recommended"]["setting"]["zero"] > 0
    assert any(not r["fits"] for r in tight["candidates"])
    none_fit = plan(Workload(model="B", gpus=8, gpu_mem_gb=4, micro_batch=8))
    assert none_fit["recommended"] is None


def test_fixed_choices_are_respected_and_invalid_combinations_dropped():
    settings = candidate_settings(zero=2)
    assert {s.zero for s in settings} == {2}
    assert all(s.offload != "params" for s in settings)  # parameter offload needs ZeRO-3
    assert Setting(0, "none", "optimizer").valid() is not None


def test_cli_json_is_one_object():
    out = subprocess.run(
        [sys.executable, "-m", "stunet_scale", "plan", "--size", "S", "--patch", "64", "--micro-batch", "1",
         "--gpus", "4", "--gpu-mem-gb", "40", "--zero", "2", "--checkpointing", "block", "--offload", "none",
         "--tflops", "40", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    result = json.loads(out.stdout)
    assert len(result["candidates"]) == 1
    r = result["recommended"]
    assert r["label"] == "ZeRO-2, AC block" and r["fits"]
    assert result["assumptions"]["tflops_per_gpu"] == 40
    assert set(r["memory_gib"]) >= {"params", "grads", "optimizer", "activation_peak", "total"}
    assert r["gpu_hours"] == pytest.approx(r["wall_clock_hours"] * 4)


def test_cli_text_and_exit_code_when_nothing_fits():
    out = subprocess.run(
        [sys.executable, "-m", "stunet_scale", "plan", "--size", "B", "--micro-batch", "8", "--gpus", "2",
         "--gpu-mem-gb", "4", "--checkpointing", "none"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1, out.stderr
    assert "nothing fits" in out.stdout


# ---------------------------------------------------------------------------------------------
# train --dry-run
# ---------------------------------------------------------------------------------------------


# (the rest of `train --dry-run` is stunet_scale/train/dry_run.py, tested in tests/test_cli.py)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_buffers_are_the_trainers_deepspeed_config(zero):
    # The planner sizes ZeRO's buckets from the trainer's own zero_defaults (1.2x the largest tensor,
    # 1.6e8 for STU-Net-H), not from a copy of its constants.
    from stunet_scale.parallel.deepspeed_engine import zero_defaults

    facts = model_facts("H")
    knobs = zero_defaults(zero, facts.largest_param)
    assert knobs["reduce_bucket_size"] == 160_000_000
    buffers = model_state_bytes(facts, Setting(zero, "block", "none"), Workload(model="H", gpus=64))["buffers"]
    expected = min(facts.params, knobs["reduce_bucket_size"]) * 4
    if zero == 3:
        expected += min(facts.params, knobs["stage3_prefetch_bucket_size"] + facts.largest_param) * 4
    assert buffers == expected


def test_dry_run_memory_check_uses_the_planner(tmp_path):
    cfg = load_config(REPO / "configs" / "pretrain" / "totalseg_stunet_h.yaml",
                      [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'none'}", "model.size=L",
                       "distributed.activation_checkpointing=none", "schedule.global_batch=16"])
    lines = dry_run_memory_check(cfg, 8, 1, gpu_mem_gb=24)
    assert any(level == "error" and text.startswith("memory") and "the planner suggests" in text
               for level, text in lines), lines


# ---------------------------------------------------------------------------------------------
# On a GPU: prediction vs torch.cuda.max_memory_allocated (skipped on CPU machines)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
# The issue asks for S/B/L/H. H without checkpointing is predicted at ~54.7 GiB at micro-batch 2,
# so it still fits an 80 GB card and is measured too.
@pytest.mark.parametrize("size,checkpointing", [("S", "none"), ("B", "none"), ("B", "block"), ("L", "block"),
                                                ("H", "block"), ("H", "none")])
def test_prediction_matches_cuda_peak_memory(size, checkpointing):
    """One process, the trainer's precision scheme: fp32 weights, SGD momentum, bf16 autocast,
    fp32 loss. Goal from the issue: predicted peak within 15% of the measured one."""
    import torch

    from stunet_scale.models import build_stunet
    from stunet_scale.parallel import apply_activation_checkpointing
    from stunet_scale.planning import _deep_supervision_loss

    patch, micro = (128, 128, 128), 2
    predicted = estimate(Workload(model=size, patch=patch, micro_batch=micro, gpus=1), Setting(0, checkpointing, "none"))
    m = predicted["memory_gib"]
    expected = (m["params"] + m["grads"] + m["optimizer"] + m["activation_peak"]) * GIB  # no DDP buckets in one process
    torch.backends.cudnn.benchmark = True
    model = build_stunet(size).cuda()
    apply_activation_checkpointing(model, checkpointing)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(micro, 1, *patch, device="cuda")
    weights = (8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0)
    for step in range(3):  # step 0 creates grads and momentum; measure a steady-state step
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = model(x)
        loss = _deep_supervision_loss(outputs, weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        del outputs, loss
    measured = torch.cuda.max_memory_allocated()
    print(f"STU-Net-{size} AC {checkpointing}: predicted {expected / GIB:.2f} GiB, measured {measured / GIB:.2f} GiB")
    assert measured == pytest.approx(expected, rel=0.15)
