"""The schedule is a sample budget: steps follow the global batch; poly lr, scaling rules, warm-up."""

from __future__ import annotations

import math

import pytest

from stunet_scale.config import ConfigError, load_config
from stunet_scale.train.schedule import Schedule, resume_step


def _sched(*overrides):
    return Schedule.from_config(load_config(None, ["model.size=S", *overrides]))


def test_paper_recipe_is_two_million_patches_at_any_global_batch():
    s = _sched()  # 4000 epochs x 500 samples, global batch 2
    assert s.total_samples == 2_000_000 and s.total_steps == 1_000_000
    big = _sched("schedule.global_batch=16", "schedule.micro_batch=2")
    assert big.total_steps == 125_000
    # an "epoch" is 500 samples whatever the batch: lr after 250 steps at batch 2 == after 31.25 steps at 16
    assert s.lr(250) == pytest.approx(0.01 * (1 - 1 / 4000) ** 0.9)
    assert big.lr(32) == s.lr(256)


def test_poly_lr_per_epoch_and_per_step():
    s = _sched()
    assert s.lr(0) == 0.01 and s.lr(249) == 0.01  # nnU-Net updates once per epoch
    assert s.lr(s.total_steps - 1) == pytest.approx(0.01 * (1 / 4000) ** 0.9)
    step = _sched("schedule.lr_update=step")
    assert step.lr(1) < 0.01 and step.lr(500_000) == pytest.approx(0.01 * 0.5**0.9)


def test_lr_scaling_rules_and_warmup():
    base = dict(zip(("none", "linear", "sqrt"), (1.0, 8.0, math.sqrt(8.0))))
    for rule, factor in base.items():
        s = _sched("schedule.global_batch=16", f"optim.lr_scaling={rule}")
        assert s.peak_lr == pytest.approx(0.01 * factor)
    w = _sched("schedule.warmup_steps=10", "optim.lr_scaling=linear", "schedule.global_batch=16")
    assert w.lr(0) == pytest.approx(w.peak_lr / 10) and w.lr(9) == pytest.approx(w.peak_lr)


def test_max_steps_stops_without_changing_the_schedule():
    s = _sched("schedule.max_steps=100")
    assert s.stop_step == 100 and s.total_steps == 1_000_000 and s.lr(99) == _sched().lr(99)


def test_epoch_boundaries_with_a_batch_that_does_not_divide_an_epoch():
    s = _sched("schedule.global_batch=3", "schedule.micro_batch=1", "schedule.samples_per_epoch=10")
    ends = [k for k in range(1, 12) if s.epoch_boundary(k)]
    assert ends == [4, 7, 10]  # samples 12, 21, 30 cross 10, 20, 30
    assert [k for k in range(1, 21) if s.epoch_boundary(k, every_epochs=2)] == [7, 14, 20]


def test_resume_step_keeps_the_global_sample_index():
    assert resume_step(1600, 16) == 100 and resume_step(1600, 8) == 200
    with pytest.raises(ConfigError, match="global_batch"):
        resume_step(1602, 16)
