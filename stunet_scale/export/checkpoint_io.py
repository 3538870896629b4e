"""Read STU-Net weights from anything a downstream team may hold, safely.

``read_weights(path)`` -> ``Weights(state_dict, spec, format, path)`` for:

* our exports: an export folder (``hf/``, ``stunet/``, ``nnunet/`` inside), ``model.safetensors``
  (+ ``config.json`` beside it), ``<name>.model`` / ``checkpoint_final.pth``, an nnU-Net v2 model
  folder (``plans.json`` + ``fold_N/checkpoint_final.pth``);
* the STU-Net release: ``*_ep4k.model`` (nnU-Net v1: ``state_dict``), v2 ``.pth`` (``network_weights``),
  a bare state dict; the architecture is read off the tensor shapes and the paper's preprocessing
  is assumed (``spec.released_spec``);
* training runs and checkpoints of ``stunet-scale train`` (any backend / world size), via
  ``stunet_scale.checkpointing.load_consolidated``, which reads their ``portable/`` safetensors copy
  only (never the backends' pickled native files).

Security: torch files are opened with ``weights_only=True`` plus an allow-list of numpy scalar and
array reconstructors (nnU-Net v1 stores its metrics as numpy floats in ``plot_stuff``). Anything
else in the pickle - a class, a function call - is refused with an error naming the file and the
offending globals; there is no fallback to ``weights_only=False`` (tests/test_untrusted_artifacts.py).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpointing.consolidated import clean_key
from ..models.stunet import PRESETS, ModelConfig
from .spec import RELEASED_POOL_STRIDES, ModelSpec, released_spec

# Prefixes wrappers add to state-dict keys: DDP/DeepSpeed (module.), torch.compile (_orig_mod.),
# activation-checkpoint wrappers (_checkpoint_wrapped_module.). Exports never contain them.
STEM_KEYS = ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle inside a torch file references code outside the weights-only allow-list."""


@dataclass
class Weights:
    state_dict: OrderedDict[str, torch.Tensor]  # fp32 tensors under the released key names
    spec: ModelSpec
    format: str  # safetensors, stunet-v1-model, nnunet-v2-pth, nnunet-folder, state-dict, training-checkpoint
    path: Path


# --------------------------------------------------------------------------------------------
# Safe torch.load
# --------------------------------------------------------------------------------------------


def _numpy_allow_list() -> list:
    """numpy scalar/array reconstructors, under their numpy 1.x and 2.x module names.

    Allowing them is safe: they build plain data, and an object array's elements still pass
    through the same restricted unpickler.
    """
    core = np._core if hasattr(np, "_core") else np.core
    allowed: list = []
    for fn in (core.multiarray.scalar, core.multiarray._reconstruct):
        allowed.append(fn)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed.append((fn, f"{module}.{fn.__name__}"))
    allowed += [np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and not n.startswith("_")
                    and n not in ("StringDType", "ObjectDType", "VoidDType")]
    return allowed


def safe_torch_load(path: str | Path, mmap: bool = False) -> object:
    """``torch.load(weights_only=True)`` with clear errors: missing, truncated, or unsafe files.

    ``mmap=True`` maps the tensors from the file instead of reading them into fresh memory (the export
    check reads files back this way: pages are the page cache's, dropped with the returned object).
    Only zip-format files (torch >= 1.6 ``torch.save``) can be mapped; legacy ones are read normally.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted copy or download?); fetch it again")
    kwargs = {"mmap": True} if mmap and zipfile.is_zipfile(path) else {}
    # torch < 2.5 has no safe_globals: weights_only still holds, only the numpy allow-list is missing.
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        if allow is None:
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
        with allow(_numpy_allow_list()):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(
                f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0][:200]}). The file is probably "
                f"truncated or corrupted; copy it again and compare its sha256 with the model card"
            ) from None
        offending = _unsafe_globals(path)
        detail = f" It references: {', '.join(offending)}." if offending else ""
        raise UnsafeCheckpointError(
            f"{path}: refused to load - the pickle inside asks to run code outside the weights-only allow-list."
            f"{detail} A checkpoint that needs this can execute arbitrary code when opened. If you trust its "
            f"origin, open it in an isolated environment and save only its tensors (torch.save of the state dict, "
            f"or safetensors), then load that."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"The file is probably truncated or corrupted; copy it again and compare its sha256 with the model card"
        ) from None


def _unsafe_globals(path: Path) -> list[str]:
    """Names the pickle would import, found without executing it (zip checkpoints via torch, legacy
    pickles by walking their opcodes)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        pass
    import pickletools

    names, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # truncated or not a pickle: report what was found so far
        pass
    allowed = ("torch.", "collections.OrderedDict", "numpy.core.multiarray.", "numpy._core.multiarray.", "numpy.dtype")
    return sorted({n for n in names if not n.startswith(allowed)})


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------


def clean_state_dict(sd: dict, source: str | Path = "<memory>") -> OrderedDict[str, torch.Tensor]:
    """Strip wrapper prefixes, check every value is a tensor, make tensors fp32 and contiguous."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        clean = clean_key(str(key))
        if clean in out:
            raise CheckpointError(f"{source}: keys {key!r} and another map to the same name {clean!r}")
        tensor = value.detach()
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor = tensor.float()
        out[clean] = tensor.contiguous()
    return out


def infer_model_config(sd: dict, source: str | Path = "<memory>", pool_strides: list | None = None) -> ModelConfig:
    """Read the STU-Net architecture off the tensor shapes (all but the pool strides are visible there)."""
    stem = sd.get(STEM_KEYS[0])
    heads = sd.get("seg_outputs.0.weight")
    if stem is None or heads is None:
        sample = ", ".join(list(sd)[:4])
        raise CheckpointError(
            f"{source}: not an STU-Net state dict (no {STEM_KEYS[0]} / seg_outputs.0.weight; keys start with {sample})"
        )
    blocks: dict[int, set[int]] = {}
    for key in sd:
        m = re.match(r"conv_blocks_context\.(\d+)\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(blocks)
    if stages != list(range(len(stages))) or len(stages) < 2:
        raise CheckpointError(f"{source}: encoder stages {stages} are not 0..N")
    widths = [int(sd[f"conv_blocks_context.{d}.0.conv1.weight"].shape[0]) for d in stages]
    kernels = [list(sd[f"conv_blocks_context.{d}.0.conv1.weight"].shape[2:]) for d in stages]
    base = widths[0]
    if any(w % base for w in widths):
        raise CheckpointError(f"{source}: stage widths {widths} are not multiples of {base}")
    per_stage = [len(blocks[d]) for d in stages]
    blocks_value: int | list[int] = per_stage[0] if len(set(per_stage)) == 1 else per_stage
    size = next((name for name, p in PRESETS.items()
                 if p["base_width"] == base and [p["blocks_per_stage"]] * len(stages) == per_stage
                 and [w // base for w in widths] == [1, 2, 4, 8, 16, 16]), None)
    n_pool = len(stages) - 1
    strides = pool_strides if pool_strides is not None else [[2, 2, 2]] * n_pool
    return ModelConfig(
        size=size,
        base_width=None if size else base,
        blocks_per_stage=None if size else blocks_value,
        width_multipliers=[w // base for w in widths],
        in_channels=int(stem.shape[1]),
        num_classes=int(heads.shape[0]),
        pool_strides=[list(s) for s in strides],
        kernel_sizes=kernels,
        deep_supervision=True,
    ).resolved()


def _released_like(sd: dict, path: Path, fmt: str) -> Weights:
    sd = clean_state_dict(sd, path)
    n_pool = len({k.split(".")[1] for k in sd if k.startswith("conv_blocks_context.")}) - 1
    strides = RELEASED_POOL_STRIDES if n_pool == len(RELEASED_POOL_STRIDES) else None
    return Weights(sd, released_spec(infer_model_config(sd, path, strides)), fmt, path)


# --------------------------------------------------------------------------------------------
# Reading every supported source
# --------------------------------------------------------------------------------------------


def read_weights(path: str | Path, manifest: dict | None = None) -> Weights:
    """Weights + spec from an export, a released STU-Net file, or a training run/checkpoint.

    ``manifest``: the prepared store's manifest.json (labels, intensity statistics) for a training
    run whose ``data.root`` is not reachable from here.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_dir(path, manifest)
    name = path.name
    if name.endswith(".safetensors"):
        return _read_safetensors(path)
    if name.endswith(".json"):
        raise CheckpointError(f"{path}: give the folder or the weights file, not the JSON beside it")
    return _read_torch_file(path, manifest)


def _read_dir(path: Path, manifest: dict | None = None) -> Weights:
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    if (path / "hf" / "model.safetensors").is_file():  # an export root
        return _read_safetensors(path / "hf" / "model.safetensors")
    if (path / "plans.json").is_file():
        ckpts = sorted(path.glob("fold_*/checkpoint_final.pth")) or sorted(path.glob("fold_*/checkpoint_best.pth"))
        if not ckpts:
            raise CheckpointError(f"{path}: nnU-Net model folder without fold_*/checkpoint_final.pth")
        w = _read_torch_file(ckpts[0])
        w.format = "nnunet-folder"
        return w
    # An export root written with a subset of formats, or an nnUNet_results dataset folder.
    for candidate in (path / "stunet" / "checkpoint_final.pth", *sorted((path / "stunet").glob("*.model"))):
        if candidate.is_file():
            return _read_torch_file(candidate)
    plans = sorted(path.glob("nnunet/*/*/plans.json")) + sorted(path.glob("*/plans.json"))
    if plans:
        return _read_dir(plans[0].parent)
    return _read_training(path, manifest)


def _read_safetensors(path: Path) -> Weights:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({str(e)[:200]}); it is probably truncated - copy it again "
            f"and compare its sha256 with the model card"
        ) from None
    # safetensors stores tensors alphabetically; restore the released key order from a fresh model.
    config = path.with_name("config.json")
    if config.is_file():
        import json

        try:
            spec = ModelSpec.from_dict(json.loads(config.read_text())["spec"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{config}: not a stunet-scale config.json ({e})") from None
        sd = clean_state_dict(_released_order(raw, spec.model_config), path)
        return Weights(sd, spec, "safetensors", path)
    w = _released_like(raw, path, "safetensors")
    w.state_dict = OrderedDict(_released_order(w.state_dict, w.spec.model_config))
    return w


def _released_order(sd: dict, config: ModelConfig) -> OrderedDict[str, torch.Tensor]:
    from ..models.stunet import STUNet

    with torch.device("meta"):
        order = list(STUNet(config).state_dict())
    ordered = OrderedDict((k, sd[k]) for k in order if k in sd)
    ordered.update((k, v) for k, v in sd.items() if k not in ordered)  # unknown keys stay, checked at load
    return ordered


def _read_torch_file(path: Path, manifest: dict | None = None) -> Weights:
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict in the torch file, found {type(obj).__name__}")
    spec_dict = obj.get("stunet_scale_spec")
    if "network_weights" in obj:
        sd, fmt = obj["network_weights"], "nnunet-v2-pth"
    elif "state_dict" in obj:
        sd, fmt = obj["state_dict"], "stunet-v1-model"
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, fmt = obj, "state-dict"
    else:
        # Not an export layout: maybe a training checkpoint of ours (the trainer's own format).
        try:
            return _read_training(path, manifest)
        except CheckpointError:
            raise CheckpointError(
                f"{path}: no 'state_dict' (nnU-Net v1 / STU-Net .model) or 'network_weights' (nnU-Net v2 .pth) "
                f"inside; top-level keys: {sorted(map(str, obj))[:8]}"
            ) from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: the weights entry is a {type(sd).__name__}, not a state dict")
    if spec_dict is not None:
        spec = ModelSpec.from_dict(spec_dict)
        return Weights(clean_state_dict(sd, path), spec, fmt, path)
    plans_spec = _spec_from_nnunet_init_args(obj, path)
    if plans_spec is not None:
        return Weights(clean_state_dict(sd, path), plans_spec, fmt, path)
    return _released_like(sd, path, fmt)


def _spec_from_nnunet_init_args(obj: dict, path: Path) -> ModelSpec | None:
    # An nnU-Net v2 checkpoint whose plans name our network (an nnunet folder export that lost its spec).
    try:
        plans = obj["init_args"]["plans"]
        conf = plans["configurations"][obj["init_args"]["configuration"]]
        arch = conf["architecture"]
    except (KeyError, TypeError):
        return None
    if not str(arch.get("network_class_name", "")).startswith("stunet_scale."):
        return None
    from .nnunet_folder import spec_from_plans

    return spec_from_plans(plans, obj["init_args"]["configuration"], obj["init_args"].get("dataset_json", {}), obj)


def _read_training(path: Path, manifest: dict | None = None) -> Weights:
    try:
        from ..checkpointing import CheckpointError as TrainingCheckpointError
        from ..checkpointing import load_consolidated  # consolidates any backend / world size, on CPU
    except ImportError:
        raise CheckpointError(
            f"{path}: looks like a training run or checkpoint, but this build cannot consolidate training "
            f"checkpoints (stunet_scale.checkpointing is missing)"
        ) from None
    from ..checkpointing import NoPortableCopy

    try:
        ckpt = load_consolidated(path)
    except NoPortableCopy as e:  # a training checkpoint indeed, but only its pickles hold the weights
        raise CheckpointError(str(e)) from None
    except (TrainingCheckpointError, FileNotFoundError) as e:
        raise CheckpointError(
            f"{path}: not an export, a released STU-Net file, or a training run/checkpoint ({e})"
        ) from None
    from .spec import spec_from_train_config

    meta = dict(getattr(ckpt, "meta", None) or {})
    training = {
        "steps": getattr(ckpt, "step", None),
        "samples_seen": getattr(ckpt, "samples_seen", None),
        **{k: v for k, v in meta.items() if k in ("git_revision", "git_commit", "epoch", "validation",
                                                   "world_size", "backend", "saved_at", "time", "mlflow_run_id")},
    }
    cfg = ckpt.config
    if hasattr(cfg, "__dataclass_fields__"):
        from ..config import to_dict

        cfg = to_dict(cfg)
    samples_per_epoch = (cfg.get("schedule") or {}).get("samples_per_epoch")
    if training.get("samples_seen") is not None and samples_per_epoch:
        training.setdefault("epoch", training["samples_seen"] / samples_per_epoch)
    validation = _last_validation(Path(meta.get("path", path)), training.get("steps"))
    if validation:
        training["validation"] = validation
    spec = spec_from_train_config(cfg, training=training, manifest=manifest)
    sd = clean_state_dict(ckpt.state_dict, path)
    return Weights(_released_order(sd, spec.model_config), spec, "training-checkpoint", path)


def _last_validation(checkpoint_dir: Path, step: int | None) -> dict | None:
    """The run's newest full validation at or before ``step``, from ``<run_dir>/metrics.jsonl``."""
    import json

    for run_dir in (checkpoint_dir.parent.parent, checkpoint_dir.parent, checkpoint_dir):
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            break
    else:
        return None
    best = None
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "val" and isinstance(rec.get("per_class"), dict) and (step is None or rec.get("step", 0) <= step):
            best = rec
    if best is None:
        return None
    return {"dice_per_class": best["per_class"], "mean_dice": best.get("mean_dice"), "step": best.get("step"),
            "epoch": best.get("epoch")}
