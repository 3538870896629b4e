"""Row 24 of the README's Reliability checks: untrusted artefacts never run code.

A pickle payload (``__reduce__`` that creates a marker file) is planted in every file of a run
directory and of an export that a downstream user may be handed: DeepSpeed ``*_model_states.pt`` /
``*_optim_states.pt``, DCP ``.metadata`` / ``.distcp``, the ``portable/`` safetensors, the per-rank RNG
files, ``trainer_state.json``, ``config.yaml``, the exported ``.model`` / ``.pth`` / ``model.safetensors``.
The commit manifest is recomputed each time, so checksum verification passes and only the readers
stand between the payload and execution. Export, ``load_pretrained``, ``predict`` (and ``evaluate``,
which reads NIfTI files only) must never create the marker.

Trust boundary, on purpose and documented (README, "Checkpoints"): *resuming* a run unpickles its own
``native/`` files (DeepSpeed's loader, DCP's ``.metadata``), because a run dir is the user's own
output; ``test_resume_reads_native_files_by_design`` pins that rule. The only other reader of native
files is the explicit ``python -m stunet_scale.checkpointing.trust_native --trust-native`` conversion.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from stunet_scale.checkpointing import CheckpointError as TrainingCheckpointError
from stunet_scale.checkpointing import load_consolidated
from stunet_scale.checkpointing.commit import MANIFEST, hash_files, list_files
from stunet_scale.checkpointing.manager import CheckpointManager
from stunet_scale.checkpointing.state import TrainerState
from stunet_scale.checkpointing.trust_native import add_portable_copy
from stunet_scale.checkpointing.trust_native import main as trust_native_main
from stunet_scale.config import ConfigError, load_config
from stunet_scale.data.store import StoreIntegrityError, iter_wds_groups, read_tar_members
from stunet_scale.export import export, load_pretrained, read_weights
from stunet_scale.export.checkpoint_io import CheckpointError, UnsafeCheckpointError
from stunet_scale.models import build_stunet
from stunet_scale.parallel.distributed import DistEnv
from stunet_scale.parallel.wrap import build_backend
from stunet_scale.predict import predict

ENV = DistEnv()
TINY = ["model.size=null", "model.base_width=4", "model.blocks_per_stage=1", "model.num_classes=3",
        "model.width_multipliers=[1,2,4]", "model.pool_strides=[[2,2,2],[2,2,2]]",
        "model.kernel_sizes=[[3,3,3],[3,3,3],[3,3,3]]", "loss.deep_supervision_weights=[0.67,0.33]",
        "data.patch_size=[16,16,16]", "data.spacing=[2.0,2.0,2.0]", "distributed.backend=none",
        "distributed.precision=fp32"]
QUIET = {"log": lambda *a: None}


class Payload:
    """Unpickling this creates ``marker`` (via ``open(marker, "w")``): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_torch(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {"x": torch.ones(1)}, "evil": Payload(marker)}, path)


def plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2))


def rehash(ckpt: Path) -> None:
    """Recompute the commit manifest, as an attacker would, so verification passes."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = hash_files(ckpt, list_files(ckpt))
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A committed training checkpoint of a tiny STU-Net (one process), and its weights."""
    root = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*TINY, f"run_dir={root}"])
    torch.manual_seed(0)
    backend = build_backend(build_stunet(cfg.model), cfg, ENV, grad_accumulation=1)
    out = backend.forward(torch.randn(1, 1, 16, 16, 16))
    backend.backward(sum(o.float().square().mean() for o in out))
    backend.step()
    state = TrainerState(step=3, samples_seen=6, backend="none", world_size=1, seed=cfg.seed)
    ckpt, _ = CheckpointManager(root, cfg.checkpoint, ENV).save(3, backend, state, cfg)
    weights = {k: v.clone() for k, v in backend.module.state_dict().items()}
    return root, ckpt.name, weights


@pytest.fixture
def run(clean_run, tmp_path):
    root, name, weights = clean_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    return copy, copy / "checkpoints" / name, weights


@pytest.fixture
def ct(tmp_path):
    path = tmp_path / "ct.nii.gz"
    image = np.random.default_rng(0).normal(0, 100, (20, 18, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def as_backend(ckpt: Path, backend: str) -> None:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state.update(backend=backend, zero_stage=3 if backend == "deepspeed" else None)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def plant_native(ckpt: Path, backend: str, marker: Path) -> None:
    """Payloads in every native file a backend writes, plus the RNG file."""
    as_backend(ckpt, backend)
    if backend == "deepspeed":
        plant_torch(ckpt / "native" / "native" / "mp_rank_00_model_states.pt", marker)
        plant_torch(ckpt / "native" / "native" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    else:
        plant_pickle(ckpt / "native" / ".metadata", marker)
        plant_torch(ckpt / "native" / "__0_0.distcp", marker)
    plant_torch(ckpt / "rng" / "rank_00000.pt", marker)
    rehash(ckpt)


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_payload_in_native_files_never_runs_on_export_load_pretrained_predict(run, backend, ct, tmp_path):
    root, ckpt, weights = run
    marker = tmp_path / "pwned"
    plant_native(ckpt, backend, marker)
    w = read_weights(root)
    assert w.format == "training-checkpoint" and all(torch.equal(w.state_dict[k], weights[k]) for k in weights)
    assert load_consolidated(root).meta["source"] == "portable"
    result = export(root, tmp_path / "export", **QUIET)
    model = load_pretrained(root)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    load_pretrained(result.out)
    done = predict(root, ct, tmp_path / "seg.nii.gz", device="cpu")
    assert len(done["written"]) == 1 and not done["failed"]
    assert not marker.exists()


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_checkpoint_without_portable_copy_is_refused_naming_the_trusted_conversion(run, backend, ct, tmp_path):
    root, ckpt, _ = run
    marker = tmp_path / "pwned"
    shutil.rmtree(ckpt / "portable")  # what an older version (or portable_copy=false) committed
    plant_native(ckpt, backend, marker)
    for load in (lambda: read_weights(root), lambda: load_pretrained(root),
                 lambda: export(root, tmp_path / "export", **QUIET)):
        with pytest.raises(CheckpointError, match=r"no portable/ copy.*pickles.*trust_native --trust-native"):
            load()
    with pytest.raises(CheckpointError, match="trust_native --trust-native"):
        predict(root, ct, tmp_path / "seg.nii.gz", device="cpu")
    with pytest.raises(TrainingCheckpointError, match="trust_native"):
        load_consolidated(ckpt)
    # The conversion opens pickles only when the user says the run is theirs.
    assert trust_native_main([str(root)]) == 2
    with pytest.raises(TrainingCheckpointError, match="trust_native=True"):
        add_portable_copy(root, trust_native=False)
    assert not marker.exists() and not (ckpt / "portable").exists()


def test_trusted_conversion_of_an_old_dcp_checkpoint_adds_a_verified_portable_copy(run):
    import torch.distributed.checkpoint as dcp

    from stunet_scale.checkpointing.commit import verify

    root, ckpt, weights = run
    shutil.rmtree(ckpt / "portable")
    as_backend(ckpt, "fsdp2")
    momentum = {f"optim.state.{k}.momentum_buffer": torch.full_like(v, 0.5) for k, v in weights.items()}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*in a single process.*")
        dcp.save({**{f"model.{k}": v for k, v in weights.items()}, **momentum},
                 storage_writer=dcp.FileSystemWriter(str(ckpt / "native")), no_dist=True)
    rehash(ckpt)
    assert add_portable_copy(root, trust_native=True) == ckpt
    assert verify(ckpt) == (True, "")  # the new files are in the commit manifest
    ck = load_consolidated(root)
    assert list(ck.state_dict) == list(weights) and all(torch.equal(ck.state_dict[k], weights[k]) for k in weights)
    from stunet_scale.checkpointing.portable import PortableReader

    reader = PortableReader(ckpt / "portable")
    name = next(iter(weights))
    assert torch.equal(reader.momentum(name), torch.full_like(weights[name], 0.5))


@pytest.mark.parametrize("victim", ["portable", "trainer_state.json", "config.yaml"])
def test_payload_in_our_own_checkpoint_files_is_refused(run, victim, tmp_path):
    root, ckpt, _ = run
    marker = tmp_path / "pwned"
    if victim == "portable":
        target = next((ckpt / "portable").glob("*.safetensors"))
        plant_pickle(target, marker)
    elif victim == "trainer_state.json":
        plant_pickle(ckpt / "trainer_state.json", marker)
    else:
        (ckpt / "config.yaml").write_text(f"model: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    rehash(ckpt)
    with pytest.raises(CheckpointError, match=victim.split(".")[0]):
        read_weights(root)
    with pytest.raises(CheckpointError):
        load_pretrained(root)
    assert not marker.exists()


@pytest.fixture(scope="module")
def clean_export(clean_run, tmp_path_factory):
    root, _, _ = clean_run
    out = tmp_path_factory.mktemp("exported") / "export"
    return export(root, out, formats=["stunet", "nnunet", "safetensors"], verify=False, **QUIET).out


def test_payload_in_exported_files_is_refused(clean_export, ct, tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "export"
    shutil.copytree(clean_export, out)
    torch_files = [out / "stunet" / "checkpoint_final.pth", *out.glob("stunet/*.model"),
                   *out.glob("nnunet/*/*/fold_0/checkpoint_final.pth")]
    assert len(torch_files) == 3
    for path in torch_files:
        plant_torch(path, marker)
        with pytest.raises(UnsafeCheckpointError, match="refused to load"):
            read_weights(path)
    plant_pickle(out / "hf" / "model.safetensors", marker)
    for load in (lambda: read_weights(out), lambda: load_pretrained(out),
                 lambda: export(out, tmp_path / "again", **QUIET)):
        with pytest.raises(CheckpointError, match="not a readable safetensors"):
            load()
    with pytest.raises(UnsafeCheckpointError):
        predict(out / "stunet" / "checkpoint_final.pth", ct, tmp_path / "seg.nii.gz", device="cpu")
    assert not marker.exists()


def test_yaml_python_tags_in_overrides_stay_literal(tmp_path):
    # (a YAML file with a python tag: tests/test_config.py::test_yaml_is_never_executed)
    # A dotted override is parsed with the same safe loader; a tag it refuses stays a literal string,
    # which a typed key then rejects.
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:builtins.open ['{marker}', 'w']"
    assert load_config(None, [f"run_dir={tag}"]).run_dir == tag
    with pytest.raises(ConfigError, match="model.num_classes' must be an integer"):
        load_config(None, [f"model.num_classes={tag}"])
    assert not marker.exists()


def test_dollar_expressions_in_config_values_stay_literal(tmp_path, monkeypatch):
    # Nothing in a config is interpolated: no environment lookups, no shell, no resolver syntax.
    marker = tmp_path / "pwned"
    monkeypatch.setenv("STUNET_TEST_SECRET", "expanded")
    config = tmp_path / "c.yaml"
    config.write_text("tracking:\n  run_name: ${STUNET_TEST_SECRET}\n")
    cfg = load_config(config, [f"tracking.experiment=$(touch {marker})", "run_dir=$STUNET_TEST_SECRET/x",
                               "checkpoint.init_from=${oc.env:STUNET_TEST_SECRET}"])
    assert cfg.tracking.run_name == "${STUNET_TEST_SECRET}"
    assert cfg.tracking.experiment == f"$(touch {marker})"
    assert cfg.run_dir == "$STUNET_TEST_SECRET/x"
    assert cfg.checkpoint.init_from == "${oc.env:STUNET_TEST_SECRET}"
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../x.meta.json", "/tmp/x.meta.json", "case/../../x.image.blosc"])
def test_tar_members_escaping_the_shard_are_rejected(tmp_path, name):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(StoreIntegrityError, match="unsafe path"):
        list(iter_wds_groups(shard))
    with pytest.raises(StoreIntegrityError, match="unsafe path"):
        read_tar_members(shard)
    assert not (tmp_path / "x.meta.json").exists()


def test_resume_reads_native_files_by_design(run):
    # The trust boundary: resuming with the same backend and world size loads native/ (bit-exact),
    # which for DeepSpeed and DCP means unpickling the user's own files. Documented, not a leak.
    root, ckpt, _ = run
    as_backend(ckpt, "deepspeed")
    (ckpt / "native").mkdir()
    cfg = load_config(None, [*TINY, f"run_dir={root}", "distributed.backend=deepspeed"])
    plan = CheckpointManager(root, cfg.checkpoint, ENV).plan(ckpt, "deepspeed", 3)
    assert plan.mode == "native"
    # ...while another topology resumes from the safetensors copy, and portable_copy=false refuses that.
    assert CheckpointManager(root, cfg.checkpoint, ENV).plan(ckpt, "ddp", None).mode == "portable"
    strict = load_config(None, [*TINY, f"run_dir={root}", "checkpoint.portable_copy=false"])
    with pytest.raises(TrainingCheckpointError, match="portable_copy=false"):
        CheckpointManager(root, strict.checkpoint, ENV).plan(ckpt, "ddp", None)
