"""Row 16 of the README's Reliability checks: loss-spike skips, rollback past the bad sample range, fatal repeat.

In-process single-rank runs of the real trainer (tests/test_train_single.py's tiny STU-Net on the
synthetic stream, a second or two each); faults come from $STUNET_FAULTS like in production
tests. The 2-rank version (the skip decided on every rank) is
test_train_distributed.py::test_nonfinite_loss_skips_on_all_ranks_then_rollback_then_stop.
"""

from __future__ import annotations

import json
import logging
import statistics

import pytest
from conftest import REPO
from test_train_single import run, train_records

from stunet_scale.config import ConfigError, load_config
from stunet_scale.train import EXIT_DIVERGED, EXIT_OK

GLOBAL_BATCH = 2  # configs/debug.yaml's schedule.global_batch, which the tiny runs keep


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def saved_state(run_dir, step):
    return json.loads((run_dir / "checkpoints" / f"step_{step:09d}" / "trainer_state.json").read_text())


def faults(monkeypatch, spec):
    monkeypatch.setenv("STUNET_FAULTS", json.dumps(spec))


def test_a_spike_is_skipped_and_leaves_the_parameters_unchanged(tmp_path, monkeypatch):
    faults(monkeypatch, {"spike": {"rank": 0, "steps": [4], "factor": 1000}})
    monkeypatch.setenv("STUNET_LOG_PARAM_NORMS", "1")
    assert run(tmp_path, "schedule.max_steps=6", "checkpoint.spike_window=3") == EXIT_OK
    by_step = {r["step"]: r for r in train_records(tmp_path)}
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]
    spike = by_step[5]
    assert spike["skipped"] == "loss_spike" and spike.get("loss") is None and spike["skipped_spikes"] == 1
    assert spike["spike_loss"] > spike["spike_limit"] == pytest.approx(
        5.0 * statistics.median(by_step[s]["loss"] for s in (2, 3, 4)))
    assert spike["param_sq"] == by_step[4]["param_sq"] and spike["momentum_sq"] == by_step[4]["momentum_sq"]
    assert all(by_step[s].get("skipped") is None for s in (1, 2, 3, 4, 6))
    assert by_step[6]["param_sq"] != by_step[5]["param_sq"]  # training goes on after the skip
    assert saved_state(tmp_path, 6)["skipped_spikes"] == 1


def test_k_spikes_roll_back_to_the_last_good_checkpoint_and_skip_the_bad_samples(tmp_path, monkeypatch, caplog):
    # steps (1-based) 6 and 7 spike; the checkpoint at step 6 was saved mid-streak, so the target is step 4
    faults(monkeypatch, {"spike": {"rank": 0, "steps": [5, 6], "factor": 1000}})
    with caplog.at_level(logging.ERROR):
        assert run(tmp_path, "schedule.max_steps=10", "checkpoint.spike_window=2", "checkpoint.rollback_after_skips=2",
                   "checkpoint.keep_last=3") == EXIT_OK
    assert saved_state(tmp_path, 6)["consecutive_skips"] == 1
    [rollback] = records(tmp_path, "rollback")
    want = {"from_step": 7, "to_step": 4, "resume_step": 7, "skipped_samples": [4 * GLOBAL_BATCH, 7 * GLOBAL_BATCH]}
    assert {k: rollback[k] for k in want} == want
    assert [json.loads(x)["skipped_samples"] for x in (tmp_path / "rollbacks.jsonl").read_text().splitlines()] == \
        [want["skipped_samples"]]
    assert "skipping global samples [8, 14)" in caplog.text
    # the step counter continues after the bad range: no step is replayed, the run ends at its stop step
    train = train_records(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 11))
    assert [r["step"] for r in train if r.get("skipped")] == [6, 7]
    assert train[-1]["samples_seen"] == 10 * GLOBAL_BATCH
    final = saved_state(tmp_path, 10)
    # 4 updates before the target, 3 after it (steps 8-10); steps 5-7 are not in the restored weights
    assert final["optimizer_steps"] == 7 and final["skipped_spikes"] == 2 and final["step"] == 10
    assert final["rollbacks"][0]["to_step"] == 4


def test_a_rollback_at_the_last_step_saves_the_final_checkpoint(tmp_path, monkeypatch):
    faults(monkeypatch, {"spike": {"rank": 0, "steps": [4, 5], "factor": 1000}})
    args = ("schedule.max_steps=6", "checkpoint.spike_window=2", "checkpoint.rollback_after_skips=2")
    assert run(tmp_path, *args) == EXIT_OK
    final = saved_state(tmp_path, 6)  # a rerun has nothing left to train (not a resume at step 4)
    assert final["step"] == 6 and final["optimizer_steps"] == 4 and final["rollbacks"][0]["skipped_samples"] == [8, 12]
    assert run(tmp_path, *args) == EXIT_OK
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_second_rollback_to_the_same_checkpoint_is_fatal(tmp_path, monkeypatch, caplog):
    faults(monkeypatch, {"spike": {"rank": 0, "steps": [4, 5, 6, 7], "factor": 1000}})
    with caplog.at_level(logging.ERROR):
        assert run(tmp_path, "schedule.max_steps=10", "checkpoint.spike_window=2",
                   "checkpoint.rollback_after_skips=2") == EXIT_DIVERGED
    assert [(r["to_step"], r["skipped_samples"]) for r in records(tmp_path, "rollback")] == [(4, [8, 12])]
    assert "second rollback to the same checkpoint" in caplog.text
    # after the first rollback the run went on at step 7 (not a replay of step 5)
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_the_spike_window_is_checkpointed_and_a_resume_decides_the_same(tmp_path, monkeypatch):
    # The spike at step 7 is only seen with the window of steps 4-6 (spike_window=3): a resume at
    # step 4 that lost the window would still be warming up there and train on the spike.
    faults(monkeypatch, {"spike": {"rank": 0, "steps": [6], "factor": 1000}})
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run(whole, "schedule.max_steps=8", "checkpoint.spike_window=3") == EXIT_OK
    assert run(split, "schedule.max_steps=4", "checkpoint.spike_window=3") == EXIT_OK
    losses = {r["step"]: r.get("loss") for r in train_records(whole)}
    assert saved_state(split, 4)["loss_window"] == [losses[2], losses[3], losses[4]]
    assert run(split, "schedule.max_steps=8", "checkpoint.spike_window=3") == EXIT_OK
    assert [(r["step"], r.get("loss"), r.get("skipped")) for r in train_records(split)] == \
        [(r["step"], r.get("loss"), r.get("skipped")) for r in train_records(whole)]
    assert train_records(split)[6]["skipped"] == "loss_spike"
    assert saved_state(split, 8)["loss_window"] == saved_state(whole, 8)["loss_window"] == \
        [losses[5], losses[6], losses[8]]


def test_normal_training_never_trips_the_default_detector(tmp_path):
    # The default factor (5) with a short window, so the check is live for most of the run; the
    # worst ratio of a step's loss to its window's median stays far below it (measured: 1.05).
    window = 4
    assert run(tmp_path, "schedule.max_steps=24", f"checkpoint.spike_window={window}", "checkpoint.every_steps=100") == EXIT_OK
    train = train_records(tmp_path)
    assert not [r for r in train if r.get("skipped")]
    losses = [r["loss"] for r in train]
    worst = max(losses[i] / statistics.median(losses[i - window:i]) for i in range(window, len(losses)))
    assert worst < 2.0, worst


@pytest.mark.parametrize("override, message", [
    ("checkpoint.spike_factor=0.5", "checkpoint.spike_factor=0.5 must be 0 (off) or > 1"),
    ("checkpoint.spike_window=0", "checkpoint.spike_window=0 must be >= 1"),
    ("checkpoint.spike_factr=3", "spike_factr"),
])
def test_spike_settings_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(REPO / "configs" / "debug.yaml", [override])
    load_config(REPO / "configs" / "debug.yaml", ["checkpoint.spike_factor=0"])  # off is allowed
