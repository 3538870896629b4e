"""Commit protocol, verification, fallback, retention, portable state and load_consolidated (one process)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from stunet_scale.checkpointing import CheckpointError, NoValidCheckpoint, load_consolidated
from stunet_scale.checkpointing.commit import (
    MARKER,
    apply_retention,
    clean_stale_tmp,
    commit,
    list_checkpoints,
    read_latest_pointer,
    resolve_newest_valid,
    step_dirname,
    verify,
)
from stunet_scale.checkpointing.manager import CheckpointManager
from stunet_scale.checkpointing.portable import PortableReader, assign_owners
from stunet_scale.checkpointing.state import TrainerState, capture_rng, load_rng, restore_rng, save_rng
from stunet_scale.config import load_config
from stunet_scale.models import build_stunet
from stunet_scale.parallel.distributed import DistEnv
from stunet_scale.parallel.wrap import build_backend

ENV = DistEnv()  # one process: collectives are no-ops


def _fake_ckpt(root: Path, step: int, payload: bytes = b"x" * 1000) -> Path:
    tmp = root / (step_dirname(step) + ".tmp")
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "data.bin").write_bytes(payload)
    (tmp / "trainer_state.json").write_text(TrainerState(step=step, samples_seen=2 * step).to_json())
    return commit(tmp, ENV, step)


def test_commit_writes_manifest_marker_and_latest_last(tmp_path):
    final = _fake_ckpt(tmp_path, 10)
    assert final.name == "step_000000010" and (final / MARKER).is_file()
    manifest = json.loads((final / "manifest.json").read_text())
    assert set(manifest["files"]) == {"sub/data.bin", "trainer_state.json"}
    assert manifest["files"]["sub/data.bin"]["size"] == 1000
    assert read_latest_pointer(tmp_path) == "step_000000010"
    assert verify(final) == (True, "")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "marker", "manifest"])
def test_corrupt_newest_falls_back_to_previous_with_error_log(tmp_path, damage, caplog):
    _fake_ckpt(tmp_path, 10)
    newest = _fake_ckpt(tmp_path, 20)
    f = newest / "sub" / "data.bin"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:500])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[123] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "delete":
        f.unlink()
    elif damage == "marker":
        (newest / MARKER).unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="stunet_scale.checkpointing"):
        found = resolve_newest_valid(tmp_path, ENV)
    assert found.name == "step_000000010"
    assert any("step_000000020" in r.message for r in caplog.records if r.levelno >= logging.ERROR)
    # the bad one is moved aside (kept for inspection) so a later save of step 20 can commit
    assert not newest.exists() and any(p.name.startswith("step_000000020.invalid-") for p in tmp_path.iterdir())


def test_checkpoints_but_none_valid_never_means_fresh_start(tmp_path):
    only = _fake_ckpt(tmp_path, 10)
    (only / "sub" / "data.bin").write_bytes(b"")
    with pytest.raises(NoValidCheckpoint, match="none is valid"):
        resolve_newest_valid(tmp_path, ENV)
    assert resolve_newest_valid(tmp_path / "empty", ENV) is None  # nothing at all: a fresh run is fine


def test_garbage_latest_pointer_is_ignored_and_tmp_leftovers_removed(tmp_path):
    _fake_ckpt(tmp_path, 10)
    (tmp_path / "latest").write_text("../../etc/passwd")
    (tmp_path / "step_000000020.tmp").mkdir()
    assert read_latest_pointer(tmp_path) is None
    assert resolve_newest_valid(tmp_path, ENV).name == "step_000000010"
    assert clean_stale_tmp(tmp_path) == ["step_000000020.tmp"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]


def test_retention_keeps_last_k_and_milestones(tmp_path):
    for step in range(10, 110, 10):
        _fake_ckpt(tmp_path, step)
        apply_retention(tmp_path, keep_last=2, milestone_every=40)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [100, 90, 80, 40]
    with pytest.raises(ValueError):
        apply_retention(tmp_path, keep_last=1, milestone_every=0)


def test_assign_owners_balances_and_is_deterministic():
    sizes = [(f"p{i}", n) for i, n in enumerate([100, 90, 10, 10, 5, 1])]
    a, b = assign_owners(sizes, 2), assign_owners(list(reversed(sizes)), 2)
    assert a == b and set(a.values()) == {0, 1}
    load = [sum(n for name, n in sizes if a[name] == r) for r in (0, 1)]
    assert abs(load[0] - load[1]) <= 10


def test_rng_roundtrip_with_weights_only(tmp_path):
    import random

    import numpy as np

    save_rng(tmp_path, 3)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(load_rng(tmp_path, 3))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    assert capture_rng()["torch"].dtype == torch.uint8


TINY = ["model.size=null", "model.base_width=4", "model.blocks_per_stage=1", "model.num_classes=3",
        "model.width_multipliers=[1,2,4]", "model.pool_strides=[[2,2,2],[2,2,2]]",
        "model.kernel_sizes=[[3,3,3],[3,3,3],[3,3,3]]", "loss.deep_supervision_weights=[0.67,0.33]",
        "data.patch_size=[16,16,16]", "distributed.backend=none", "distributed.precision=fp32"]


def _trained_backend(tmp_path, *extra):
    cfg = load_config(None, [*TINY, f"run_dir={tmp_path}", *extra])
    torch.manual_seed(0)
    backend = build_backend(build_stunet(cfg.model), cfg, ENV, grad_accumulation=1)
    out = backend.forward(torch.randn(1, 1, 16, 16, 16))
    backend.backward(sum(o.float().square().mean() for o in out))
    backend.step()
    return cfg, backend


def test_portable_save_and_load_consolidated_keys_and_values(tmp_path):
    cfg, backend = _trained_backend(tmp_path, "distributed.activation_checkpointing=block")
    manager = CheckpointManager(tmp_path, cfg.checkpoint, ENV)
    state = TrainerState(step=7, samples_seen=14, backend="none", world_size=1, mlflow_run_id="abc")
    path, norms = manager.save(7, backend, state, cfg)
    reader = PortableReader(path / "portable")
    ref = backend.module.state_dict()
    for name, value in ref.items():
        assert torch.equal(reader.param(name), value)
        buf = backend.optimizer.state[dict(backend.module.named_parameters())[name]]["momentum_buffer"]
        assert torch.equal(reader.momentum(name), buf)
    assert norms["param_sq"] == pytest.approx(sum(float(v.double().square().sum()) for v in ref.values()))
    for where in (tmp_path, tmp_path / "checkpoints", path):
        ck = load_consolidated(where)
        assert list(ck.state_dict) == list(ref) and all(torch.equal(ck.state_dict[k], ref[k]) for k in ref)
        assert ck.step == 7 and ck.samples_seen == 14 and ck.meta["mlflow_run_id"] == "abc"
        assert ck.config["model"]["base_width"] == 4 and ck.meta["backend"] == "none"
    # the resulting state dict loads strictly into a fresh model of the run's config
    build_stunet(cfg.model).load_state_dict(ck.state_dict, strict=True)


def test_load_consolidated_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_consolidated(tmp_path / "missing")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        load_consolidated(tmp_path)


def test_untrusted_pickle_in_rng_file_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "rng").mkdir()
    torch.save({"python": Evil()}, tmp_path / "rng" / "rank_00000.pt")
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; the marker file is what matters
        load_rng(tmp_path, 0)
    assert not (tmp_path / "pwned").exists()


def test_check_same_plan_names_both_values_and_honours_the_override(tmp_path):
    from stunet_scale.checkpointing.state import check_same_plan
    from stunet_scale.config import ConfigError

    saved = TrainerState(step=4, seed=0, plan_fingerprint="aaaa")
    assert check_same_plan(saved, tmp_path, seed=0, fingerprint="aaaa", allow_change=False) == []
    with pytest.raises(ConfigError, match=r"seed 0 in the checkpoint, 1 now.*allow_plan_change=true"):
        check_same_plan(saved, tmp_path, seed=1, fingerprint="aaaa", allow_change=False)
    with pytest.raises(ConfigError, match=r"fingerprint aaaa in the checkpoint, bbbb now"):
        check_same_plan(saved, tmp_path, seed=0, fingerprint="bbbb", allow_change=False)
    warnings = check_same_plan(saved, tmp_path, seed=1, fingerprint="bbbb", allow_change=True)
    assert len(warnings) == 2 and "allow_plan_change=true" in warnings[0]
    # a checkpoint from before fingerprints were stored: only the seed can be compared
    old = TrainerState.from_file(_write_state_without(tmp_path / "old.json", "plan_fingerprint"))
    assert old.plan_fingerprint is None
    assert check_same_plan(old, tmp_path, seed=0, fingerprint="bbbb", allow_change=False) == []


def _write_state_without(path: Path, key: str) -> Path:
    data = json.loads(TrainerState(step=4).to_json())
    del data[key]
    path.write_text(json.dumps(data))
    return path


def _PlannedData(fingerprint: str):
    """A synthetic data source whose streams carry a sample-plan fingerprint, as the real TrainStream does."""
    from synthetic_data import SyntheticDataSource

    class Planned(SyntheticDataSource):
        def train_stream(self, **kwargs):
            stream = super().train_stream(**kwargs)
            stream.fingerprint = fingerprint
            return stream

    return Planned


def test_resume_with_another_seed_or_sample_plan_stops_with_exit_2(tmp_path, caplog):
    from conftest import REPO

    from stunet_scale.train import EXIT_CONFIG, EXIT_OK, main

    args = ["--config", str(REPO / "configs" / "debug.yaml"), f"run_dir={tmp_path}", *TINY, "seed=0",
            "schedule.samples_per_epoch=8", "validation.enabled=false", "tracking.enabled=false",
            "checkpoint.every_steps=2"]
    assert main([*args, "schedule.max_steps=2"], data=_PlannedData("aaaa")) == EXIT_OK
    saved = json.loads(next((tmp_path / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert saved["plan_fingerprint"] == "aaaa" and saved["seed"] == 0
    with caplog.at_level(logging.WARNING):
        assert main([*args, "schedule.max_steps=4"], data=_PlannedData("bbbb")) == EXIT_CONFIG
        assert "fingerprint aaaa in the checkpoint, bbbb now" in caplog.text
        assert main([*args, "schedule.max_steps=4", "seed=7"], data=_PlannedData("aaaa")) == EXIT_CONFIG
        assert "seed 0 in the checkpoint, 7 now" in caplog.text
        caplog.clear()
        assert main([*args, "schedule.max_steps=4", "checkpoint.allow_plan_change=true"],
                    data=_PlannedData("bbbb")) == EXIT_OK
        assert "allow_plan_change=true: continuing with sample-plan fingerprint aaaa" in caplog.text
    newest = max((tmp_path / "checkpoints").glob("step_*/trainer_state.json"))
    assert json.loads(newest.read_text())["plan_fingerprint"] == "bbbb"
