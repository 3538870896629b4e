"""``stunet-scale export SOURCE OUT``: one checkpoint -> every format downstream teams load.

    OUT/
      stunet/<name>.model                 nnU-Net v1 / STU-Net release layout: {"state_dict", "epoch", ...}
      stunet/checkpoint_final.pth         nnU-Net v2 trainer layout: {"network_weights", "init_args", ...}
      nnunet/DatasetNNN_<name>/nnUNetTrainer__nnUNetPlans__3d_fullres/
        dataset.json, plans.json, fold_0/checkpoint_final.pth    drop-in nnUNet_results folder
      hf/model.safetensors, hf/config.json, hf/README.md          safetensors + spec + model card
      onnx/model.onnx                     only with --formats onnx: the network for onnxruntime/TensorRT
                                          (``stunet_scale.export.onnx_model``: opset, tolerance, I/O)
      README.md                           the model card again, at the root
      SHA256SUMS                          `sha256sum -c SHA256SUMS` checks the copy

SOURCE may be a training run directory or checkpoint (consolidated from any backend and world
size by ``stunet_scale.checkpointing.load_consolidated``, from its safetensors ``portable/`` copy:
nothing in a run dir is unpickled), one of our exports, or a released STU-Net file (torch files
with ``weights_only=True``). Every written file is team-readable (0666 minus the umask). Everything is written into ``OUT.partial-*`` and renamed into place at the end, so
an interrupted export never looks complete. Before the rename every written format is read back
and compared bit-for-bit with the source tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpointing.portable import make_team_readable
from ..models.stunet import RELEASE_NAMES, STUNet
from ..tracking import git_revision
from .axes import TRANSFER_AXIS_ORDER, to_axis_order
from .checkpoint_io import CheckpointError, Weights, read_weights, safe_torch_load
from .hf_bundle import build_card, build_config_json, write_safetensors
from .nnunet_folder import CHECKPOINT_NAME as NNUNET_CHECKPOINT
from .nnunet_folder import (
    DEFAULT_DATASET_ID,
    build_dataset_json,
    build_plans,
    dataset_name,
    nnunet_checkpoint,
    write_nnunet_folder,
)
from .spec import generic_labels

FORMATS = ("stunet", "nnunet", "safetensors", "onnx")
# ONNX needs the optional onnx + onnxruntime packages, so it is written only when asked for.
DEFAULT_FORMATS = ("stunet", "nnunet", "safetensors")


@dataclass
class ExportResult:
    out: Path
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    name: str = ""
    nnunet_folder: Path | None = None
    seconds: float = 0.0


def default_name(weights: Weights) -> str:
    """``base_ep4k`` like the release when epochs are known, else ``base_step1234``."""
    size = weights.spec.model.get("size")
    stem = RELEASE_NAMES.get(size, "stunet") if size else "stunet"
    t = weights.spec.training or {}
    epoch = t.get("epoch", t.get("epochs"))
    if epoch is not None and float(epoch) > 0 and float(epoch).is_integer():
        ep = int(epoch)
        return f"{stem}_ep{ep // 1000}k" if ep >= 1000 and ep % 1000 == 0 else f"{stem}_ep{ep}"
    if t.get("steps"):
        return f"{stem}_step{int(t['steps'])}"
    return stem


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_fits(weights: Weights) -> int:
    """The weights must load strictly into the model the spec describes; returns the parameter count."""
    with torch.device("meta"):
        model = STUNet(weights.spec.model_config)
    target = model.state_dict()
    sd = weights.state_dict
    bad = [k for k in target if k not in sd or tuple(sd[k].shape) != tuple(target[k].shape)]
    extra = [k for k in sd if k not in target]
    if bad or extra:
        raise CheckpointError(
            f"{weights.path}: weights do not match the architecture recorded with them "
            f"(missing/mismatched: {bad[:3]}, unexpected: {extra[:3]})"
        )
    return sum(v.numel() for v in target.values())


def export(
    source: str | Path,
    out: str | Path,
    formats: list[str] | None = None,
    *,
    name: str | None = None,
    nnunet_dataset_id: int = DEFAULT_DATASET_ID,
    license_id: str = "other",
    manifest: str | Path | None = None,
    validation: str | Path | None = None,
    overwrite: bool = False,
    verify: bool = True,
    log=print,
) -> ExportResult:
    t0 = time.time()
    formats = list(formats or DEFAULT_FORMATS)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    if "onnx" in formats:
        from .onnx_model import require

        # Fail before reading any weights, with the pip install to run.
        require("onnx")
        require("onnxruntime")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another OUT or pass --overwrite")

    manifest_dict = json.loads(Path(manifest).read_text()) if manifest else None
    weights = read_weights(source, manifest=manifest_dict)
    if validation:
        weights.spec.training = dict(weights.spec.training, validation=json.loads(Path(validation).read_text()))
    # Every file we write holds the release's convention, whatever the source ran in (one function).
    weights.state_dict, weights.spec = to_axis_order(weights.state_dict, weights.spec, TRANSFER_AXIS_ORDER,
                                                       in_place=True)
    params = _check_fits(weights)
    spec = weights.spec
    name = name or default_name(weights)
    if spec.labels[1:] == generic_labels(spec.num_classes)[1:]:
        log(f"export: WARNING label names of the {spec.num_classes} outputs are unknown (class_1, ...); pass "
            f"--manifest <prepared store>/manifest.json to record them")
    log(f"export: {weights.path} ({weights.format}), STU-Net {spec.model.get('size') or 'custom'}, "
        f"{params:,} parameters, {spec.num_classes} classes -> {out} [{', '.join(formats)}]")

    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    sd = weights.state_dict
    ds_name = dataset_name(spec, nnunet_dataset_id)
    export_info = {
        "source": str(weights.path),
        "source_format": weights.format,
        "name": name,
        "parameters": params,
        "formats": formats,
        "nnunet_dataset_id": nnunet_dataset_id,
        "nnunet_dataset_name": ds_name,
        "stunet_scale_version": _version(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "exported_by_git_revision": git_revision(),
    }
    result = ExportResult(out=out, name=name)
    files: dict[str, str] = {}  # relative path -> sha256, each file hashed once right after it is final
    try:
        dataset_json = build_dataset_json(spec, ds_name, spec.training.get("num_training_cases"))
        plans = build_plans(spec, ds_name)
        weight_files: list[Path] = []
        # checkpoint_final.pth goes straight to where each requested format wants it; nothing is
        # written to a scratch place and copied or deleted afterwards.
        pth_targets = []
        if "stunet" in formats:
            pth_targets.append(partial / "stunet" / "checkpoint_final.pth")
        if "nnunet" in formats:
            folder = write_nnunet_folder(partial / "nnunet", spec, plans, dataset_json, ds_name)
            result.nnunet_folder = out / folder.relative_to(partial)
            files.update(_hash(partial, folder / "dataset.json", folder / "plans.json"))
            pth_targets.append(folder / "fold_0" / NNUNET_CHECKPOINT)
        if pth_targets:
            checkpoint = nnunet_checkpoint(sd, spec, plans, dataset_json)
            for target in pth_targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.save(checkpoint, target)  # streams each storage to the file; no copy of the weights
            del checkpoint
            weight_files += pth_targets
        if "stunet" in formats:
            epoch = spec.training.get("epoch", spec.training.get("epochs", 0)) or 0
            v1 = {
                "epoch": int(round(float(epoch))),
                "state_dict": sd,
                "optimizer_state_dict": None,
                "lr_scheduler_state_dict": None,
                "plot_stuff": ([], [], [], []),  # nnU-Net v1 unpacks these four lists when it resumes
                "stunet_scale_spec": spec.to_dict(),
            }
            torch.save(v1, partial / "stunet" / f"{name}.model")
            weight_files.append(partial / "stunet" / f"{name}.model")
        if "onnx" in formats:
            # Not a weights file (no bit-exact read-back): export_onnx checks onnxruntime against
            # PyTorch numerically instead (random and real-geometry input, dynamic batch). Before
            # the safetensors bundle, so hf/config.json records the check's numbers.
            from .onnx_model import ONNX_RELPATH, export_onnx

            onnx_report = export_onnx(sd, spec, partial / ONNX_RELPATH, verify=verify, log=log)
            export_info["onnx"] = {k: v for k, v in onnx_report.items() if k != "checked"}
            files.update(_hash(partial, *sorted((partial / ONNX_RELPATH.parent).iterdir())))
        if "safetensors" in formats:
            hf = partial / "hf"
            hf.mkdir()
            write_safetensors(sd, hf / "model.safetensors", spec)
            (hf / "config.json").write_text(json_text(build_config_json(spec, export_info)))
            files.update(_hash(partial, hf / "config.json"))
            weight_files.append(hf / "model.safetensors")
        for path in weight_files:
            if verify:
                # One file at a time, freed before the next: peak memory is the source weights plus
                # one exported file (mmap'd / read tensor by tensor), not all formats at once.
                _verify_file(partial, path, sd, log)
            files.update(_hash(partial, path))
        # The card lists every file's sha256, so it is written after them; only the cards (and
        # SHA256SUMS, which cannot list itself) are hashed after that.
        card = build_card(spec, export_info, files, license_id)
        cards = [partial / "README.md"] + ([partial / "hf" / "README.md"] if "safetensors" in formats else [])
        for path in cards:
            path.write_text(card)
        files.update(_hash(partial, *cards))
        (partial / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in sorted(files.items())))
        # Team-readable (0644 under the usual umask): safetensors creates its files 0600.
        for path in partial.rglob("*"):
            if path.is_file():
                make_team_readable(path)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    result.files = dict(sorted(files.items()))
    result.seconds = time.time() - t0
    log(f"export: wrote {len(files) + 1} files to {out} in {result.seconds:.1f} s")
    if result.nnunet_folder is not None:
        log(f"  nnU-Net: export nnUNet_results={out / 'nnunet'}; "
            f"nnUNetv2_predict -i IN -o OUT -d {nnunet_dataset_id} -c 3d_fullres -f 0")
    return result


def _hash(root: Path, *paths: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in paths}


def json_text(obj) -> str:
    """Strict JSON (RFC 8259 has no NaN/Infinity): non-finite floats, e.g. the Dice of a class absent
    from every validation case, are written as null so every JSON parser reads the file."""
    return json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _weight_files(out: Path) -> list[Path]:
    return [p for p in sorted(out.rglob("*"))
            if p.suffix in (".model", ".safetensors") or p.name == NNUNET_CHECKPOINT]


def reload_one(path: Path) -> OrderedDict[str, torch.Tensor]:
    """One exported weights file, read back the way its consumers read it (torch files memory-mapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return OrderedDict(load_file(str(path)))
    obj = safe_torch_load(path, mmap=True)
    return obj["state_dict"] if path.suffix == ".model" else obj["network_weights"]


def iter_reloaded(out: Path):
    """(relative path, state dict) for every weights file under an export, one file at a time."""
    for p in _weight_files(out):
        yield str(p.relative_to(out)), reload_one(p)


def reload_all(out: Path) -> dict[str, OrderedDict[str, torch.Tensor]]:
    """Every weights file under an export at once (tests and small models; ``iter_reloaded`` streams)."""
    return dict(iter_reloaded(out))


def _verify_file(root: Path, path: Path, sd: dict, log) -> None:
    rel = str(path.relative_to(root))

    def check(key: str, other: torch.Tensor) -> None:
        tensor = sd[key]
        if other.dtype != tensor.dtype or other.shape != tensor.shape or not torch.equal(other, tensor):
            raise CheckpointError(f"export check failed: {rel} {key} differs from the source tensor")

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        # Tensor by tensor from the mapped file: never more than one exported tensor in memory.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            # safetensors stores keys sorted, so compare as sets there.
            if set(keys) != set(sd):
                raise CheckpointError(f"export check failed: {rel} has different keys than the source")
            for key in keys:
                check(key, f.get_tensor(key))
    else:
        loaded = reload_one(path)
        # torch files keep the released key order
        if list(loaded) != list(sd):
            raise CheckpointError(f"export check failed: {rel} has different keys than the source")
        for key, other in loaded.items():
            check(key, other)
        del loaded
    log(f"  verified {rel}: {len(sd)} tensors bit-identical to the source")


def _version() -> str:
    from ..version import __version__

    return __version__


def run_export(args) -> int:
    """CLI handler body for ``stunet-scale export``."""
    import sys

    try:
        export(args.source, args.out, args.formats, name=args.name, nnunet_dataset_id=args.nnunet_dataset_id,
               license_id=args.license, manifest=args.manifest, validation=args.validation,
               overwrite=args.overwrite, verify=not args.no_verify)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    return 0


