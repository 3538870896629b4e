"""Typed run configuration: one dataclass per component, YAML files, dotted CLI overrides.

    cfg = load_config("configs/pretrain/totalseg_stunet_h.yaml", ["optim.lr=0.005", "model.size=L"])

Rules (Lingua's mechanics, made strict):
- YAML is read with ``yaml.safe_load``; nothing in a config is executed or interpolated.
- A top-level ``base: FILE`` (relative to the file) makes a recipe extend another: merged deep,
  the file's values win (``read_config_file``). ``configs/pretrain/base.yaml`` is the shared
  pretraining recipe; ``totalseg_stunet_{s,b,l,h}.yaml`` hold only what differs per size.
- A YAML file may leave keys out (the dataclass default applies) but may not invent keys: an
  unknown key fails and names the closest valid one.
- Override values are parsed as YAML scalars/lists (``[1,2]``, ``null``, ``true``, ``1e-3``).
- Every value is type-checked against the dataclass annotation; errors name the dotted key.
- ``validate(cfg)`` checks relations between keys at start-up, before any process group exists.
- The resolved config (presets filled in) is written next to every run and into every checkpoint.

Each field carries a one-line ``help``; ``to_yaml(cfg, comments=True)`` prints it as a comment,
which is how the shipped recipes under ``configs/`` are written.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .atomic_files import atomic_write_text
from .models.model_config import ModelConfig  # torch-free: the config never imports the model code


class ConfigError(ValueError):
    """A config problem; the message names the dotted key to change."""


def knob(default: Any, help: str) -> Any:
    """A dataclass field with a one-line help text (rendered as the YAML comment)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: _copy(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(value):
    return copy.deepcopy(value)


class _NoAliasDumper(yaml.SafeDumper):
    # [[2,2,2]] * 5 repeats one list object; plain YAML must not turn that into &anchors.
    def ignore_aliases(self, data):
        return True


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    root: str = knob("data_shards/demo", "prepared dataset directory (output of `stunet-scale prepare`)")
    format: Literal["zarr", "wds"] = knob("zarr", "reader: zarr (random access, exact resume) or wds (tar streaming)")
    patch_size: list[int] = knob([128, 128, 128], "training patch in voxels (each a multiple of the model's total pool stride)")
    normalization: Literal["zscore", "zscore_stored", "ct"] = knob("zscore", "zscore = per-image z-score over nnU-Net's nonzero box of the original image (STU-Net release); zscore_stored = over the stored crop; ct = nnU-Net CT clip + global z-score")
    oversample_foreground: float = knob(0.33, "nnU-Net rule: the last round(b*p) samples of each batch are forced foreground")
    case_weighting: Literal["uniform", "split", "class_rarity"] = knob("uniform", "how cases are drawn: uniform; split = each train split gets split_weights' share; class_rarity = a uniformly drawn class, then a case containing it")
    split_weights: list[float] = knob([], "case_weighting=split: one weight per data.train_splits entry; [] = equal shares")
    spacing: list[float] = knob([1.5, 1.5, 1.5], "voxel spacing (mm) the store was prepared at; checked against manifest.json")
    class_map: str = knob("stunet", "label order the store was prepared with (stunet, totalseg-v1, totalseg-v2); checked against manifest.json")
    train_splits: list[str] = knob(["train"], "meta.csv splits used for training")
    val_splits: list[str] = knob(["val"], "meta.csv splits used for validation")
    num_workers: int = knob(4, "DataLoader worker processes per rank")
    prefetch_factor: int = knob(2, "batches prefetched per worker")
    pin_memory: bool = knob(True, "pin host memory for faster host-to-GPU copies")
    wds_buffer_cases: int = knob(4, "format=wds: decoded volumes each worker keeps to draw patches from")
    wds_patches_per_case: int = knob(8, "format=wds: patches drawn from a volume before it leaves the buffer")
    verify_shards: Literal["size", "sha256"] = knob("size", "format=wds: trainer pre-flight of every shard against manifest.json before training: size (cheap, finds truncation) or sha256 (reads every byte, also finds tampering)")


@dataclass
class AugmentationConfig:
    enabled: bool = knob(True, "apply augmentation at all (off = centre crop only)")
    device: Literal["auto", "gpu", "cpu"] = knob("auto", "where batched augmentation runs: gpu = on the rank's device in the main process; cpu = in the DataLoader workers; auto = gpu if the rank has a GPU, else cpu")
    rotation_p: float = knob(0.2, "probability a sample is rotated (all three axes)")
    rotation_max_deg: float = knob(30.0, "rotation angle range +/- degrees per axis")
    scaling_p: float = knob(0.2, "probability a sample is scaled")
    scaling_range: list[float] = knob([0.7, 1.4], "isotropic zoom range")
    noise_p: float = knob(0.1, "probability of additive Gaussian noise")
    noise_variance: list[float] = knob([0.0, 0.1], "noise variance range")
    blur_p: float = knob(0.2, "probability of Gaussian blur")
    blur_sigma: list[float] = knob([0.5, 1.0], "blur sigma range in voxels")
    blur_per_channel_p: float = knob(0.5, "when blur fires, probability each channel is blurred (nnU-Net: 0.5)")
    brightness_p: float = knob(0.15, "probability of multiplicative brightness")
    brightness_range: list[float] = knob([0.75, 1.25], "brightness factor range")
    contrast_p: float = knob(0.15, "probability of contrast change (range preserved)")
    contrast_range: list[float] = knob([0.75, 1.25], "contrast factor range")
    lowres_p: float = knob(0.25, "probability of low-resolution simulation")
    lowres_zoom: list[float] = knob([0.5, 1.0], "down-sampling factor range of the low-res simulation")
    lowres_per_channel_p: float = knob(0.5, "when low-res simulation fires, probability per channel (nnU-Net: 0.5)")
    gamma_inverted_p: float = knob(0.1, "probability of gamma on the inverted image")
    gamma_p: float = knob(0.3, "probability of gamma")
    gamma_range: list[float] = knob([0.7, 1.5], "gamma range")
    mirror: bool = knob(True, "random flips (STU-Net trains with them; TotalSegmentator without, for left/right classes)")
    mirror_axes: list[int] = knob([0, 1, 2], "spatial axes that may be flipped, each with p=0.5")
    label_interpolation: Literal["nearest", "linear"] = knob("nearest", "label resampling in spatial transforms: nearest, or nnU-Net's per-label linear")


@dataclass
class OptimConfig:
    name: Literal["sgd"] = knob("sgd", "optimizer (SGD with Nesterov momentum, as nnU-Net)")
    lr: float = knob(0.01, "peak learning rate at the reference global batch")
    momentum: float = knob(0.99, "SGD momentum")
    nesterov: bool = knob(True, "Nesterov momentum")
    weight_decay: float = knob(3e-5, "L2 weight decay")
    grad_clip: float = knob(12.0, "clip the global grad norm to this (nnU-Net: 12); 0 disables")
    lr_scaling: Literal["none", "linear", "sqrt"] = knob("none", "scale lr when global batch differs from reference_global_batch")
    reference_global_batch: int = knob(2, "global batch the lr was tuned for (paper: 2)")
    backbone_lr_scale: float = knob(1.0, "lr multiplier for everything except the seg_outputs heads (fine-tuning)")


@dataclass
class LossConfig:
    dice_weight: float = knob(1.0, "weight of the soft Dice term")
    ce_weight: float = knob(1.0, "weight of the cross-entropy term")
    dice_smooth: float = knob(1e-5, "Dice smoothing constant")
    batch_dice: bool = knob(False, "Dice over the whole batch instead of per sample (STU-Net: per sample)")
    deep_supervision_weights: list[float] = knob(
        [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0],
        "loss weight per output, full resolution first (nnU-Net: 1/2^i, last zeroed, normalised)",
    )


@dataclass
class ScheduleConfig:
    epochs: int = knob(4000, "length of the run in epochs (paper: 4000)")
    samples_per_epoch: int = knob(500, "an epoch is a sample count (paper: 250 steps x batch 2), the same at any world size")
    global_batch: int = knob(2, "samples per optimizer step over all ranks")
    micro_batch: int = knob(2, "samples per forward on one rank; accumulation = global_batch / (micro_batch * world)")
    poly_power: float = knob(0.9, "poly decay exponent: lr * (1 - progress)^power")
    lr_update: Literal["step", "epoch"] = knob("epoch", "update lr every step, or once per epoch as nnU-Net")
    warmup_steps: int = knob(0, "linear lr warm-up steps (useful with scaled lr)")
    max_steps: int | None = knob(None, "stop after this many steps without changing the schedule (smoke tests); null = full run")


@dataclass
class DistributedConfig:
    backend: Literal["none", "ddp", "deepspeed", "fsdp2"] = knob("deepspeed", "none = one process; ddp; deepspeed (ZeRO 0-3); fsdp2 (fully_shard)")
    zero_stage: int = knob(3, "DeepSpeed ZeRO stage 0/1/2/3")
    offload_optimizer: bool = knob(False, "DeepSpeed: keep optimizer states in CPU memory")
    offload_params: bool = knob(False, "DeepSpeed ZeRO-3: keep parameters in CPU memory")
    deepspeed_config: str | None = knob(None, "DeepSpeed JSON with extra knobs (buckets, persistence); null = $ACCELERATE_DEEPSPEED_CONFIG_FILE if set; our keys win on conflict")
    fsdp_reshard_after_forward: bool = knob(True, "FSDP2: free gathered params after forward (ZeRO-3-like); false keeps them for backward (ZeRO-2-like)")
    precision: Literal["bf16", "fp16", "fp32"] = knob("bf16", "compute precision: bf16 autocast; fp16 with loss scaling; fp32")
    activation_checkpointing: Literal["none", "block", "stage"] = knob("block", "recompute activations per residual block, per stage, or never")
    channels_last: bool = knob(False, "channels_last_3d memory format (slower with InstanceNorm today)")
    compile: bool = knob(False, "torch.compile each residual block")
    deterministic: bool = knob(False, "bitwise-reproducible GPU kernels (slower): cudnn.deterministic, no cudnn.benchmark")
    cudnn_check: Literal["error", "warn", "off"] = knob("error", "on CUDA, probe at start that bf16 conv3d runs on a known-good cuDNN (torch 2.9.0 / cuDNN 9.8-9.10 are not)")
    timeout_s: int = knob(1800, "collective timeout in seconds (a hung rank fails instead of hanging)")


@dataclass
class CheckpointConfig:
    every_steps: int = knob(12500, "save every N optimizer steps (paper: every 50 epochs)")
    keep_last: int = knob(3, "rolling checkpoints kept (>= 2: the newest may be mid-write)")
    milestone_every_steps: int = knob(250000, "also keep every N-th step forever; 0 = none")
    resume: str = knob("auto", "auto = continue from the newest valid checkpoint in run_dir; never; or a checkpoint path")
    init_from: str | None = knob(None, "initialise weights from an export or released STU-Net file (fine-tuning)")
    portable_copy: bool = knob(True, "resume on another backend/world size/ZeRO stage from portable/ (written by every save: the safetensors copy export reads); false = native bit-exact resume only")
    allow_plan_change: bool = knob(False, "resume even though the sample-plan fingerprint or seed differs from the checkpoint's (changed store, sampling settings, global_batch or seed); false stops with exit 2")
    rollback_after_skips: int = knob(5, "after this many consecutive skipped steps (non-finite or spike) reload the last checkpoint saved outside a skip streak and skip the bad sample range; a second rollback to the same checkpoint stops the run")
    spike_factor: float = knob(5.0, "skip a step whose global loss exceeds this x the median of the last spike_window accepted steps' losses; 0 = off")
    spike_window: int = knob(50, "accepted steps in the spike detector's median (and its warm-up: no spike check before the window is full)")


@dataclass
class LeaseConfig:
    renew_every_s: int = knob(30, "rank 0 renews the run-dir lease (run_dir/LEASE) this often while the job is alive")
    stale_after_s: int = knob(300, "a lease not renewed for this long (file mtimes on the run dir's filesystem) is taken over by the next job")
    take_over: bool = knob(False, "take the lease even from a holder that looks alive (only when you know it is dead, e.g. its node is down)")


@dataclass
class TrackingConfig:
    enabled: bool = knob(True, "log to MLflow on rank 0")
    mlflow_uri: str | None = knob(None, "tracking URI; null = sqlite:///<run_dir>/mlflow.db")
    experiment: str = knob("stunet-pretrain", "MLflow experiment name")
    run_name: str | None = knob(None, "MLflow run name; null = run_dir's name")
    log_every_steps: int = knob(10, "one console line and one metrics row every N steps")
    straggler_factor: float = knob(1.5, "a rank whose step time (data wait + compute) over a log window exceeds this x the median rank's is slow")
    straggler_windows: int = knob(3, "warn (host, data-wait vs compute split) when a rank is slow in this many consecutive log windows")


@dataclass
class ValidationConfig:
    enabled: bool = knob(True, "run validation during training")
    every_epochs: int = knob(50, "full-case sliding-window validation every N epochs")
    max_cases: int | None = knob(None, "validate on at most this many cases; null = all")
    step_size: float = knob(0.5, "sliding-window stride as a fraction of the patch")
    mirroring: bool = knob(False, "mirror test-time augmentation during validation")
    pseudo_dice_batches: int = knob(1, "training-like patches scored for pseudo-Dice each epoch (nnU-Net style)")
    surface_metrics: bool = knob(True, "full validations also score HD95 and NSD per class (CPU, cropped per class)")
    nsd_tolerance_mm: float = knob(2.0, "normalised surface Dice tolerance (mm) for every class")


@dataclass
class TrainConfig:
    run_dir: str = knob("runs/debug", "where checkpoints, logs, plots and the resolved config go")
    seed: int = knob(0, "seed of the sample plan and of weight init")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


SECTION_HELP = {
    "model": "STU-Net architecture",
    "data": "prepared store and patch sampling",
    "augmentation": "nnU-Net's augmentation list, batched in torch",
    "optim": "optimizer",
    "loss": "Dice + CE with deep supervision",
    "schedule": "sample budget, batch arithmetic, poly lr",
    "distributed": "backend, precision, memory",
    "checkpoint": "saving, retention, resume",
    "lease": "one job per run_dir: rank 0 holds run_dir/LEASE while the job runs",
    "tracking": "MLflow and console",
    "validation": "sliding-window validation",
}


# --------------------------------------------------------------------------------------------
# dict -> dataclass with strict keys and types
# --------------------------------------------------------------------------------------------


def from_dict(cls: type, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a plain dict; unknown keys and wrong types raise ConfigError."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(key, names, prefix)}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys here: {', '.join(prefix + n for n in names)}"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"'{key}' must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)  # 1e6 in YAML is a float; accept whole numbers
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"'{key}': unsupported annotation {tp}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# YAML and overrides
# --------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        # safe_load refuses !!python/... tags: configs never construct objects.
        raise ConfigError(f"{path}: not a plain YAML config ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


BASE_KEY = "base"  # top-level key of a recipe naming the file it extends (a path relative to the recipe)


def read_config_file(path: str | Path) -> dict:
    """A recipe as one nested dict: the file, merged deep over the chain of files its ``base:`` names.

    ``base: base.yaml`` (relative to the file naming it) makes a recipe a small file of what
    differs: sections merge key by key, a value (list included) replaces the base's. The merged
    dict is checked like any config, so an unknown key in either file still fails; a file reached
    twice in one chain is refused (a cycle).
    """
    return _read_with_bases(Path(path), [])


def _read_with_bases(path: Path, chain: list[Path]) -> dict:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in [*chain, resolved])
        raise ConfigError(f"{path}: '{BASE_KEY}' chain returns to a file it started from ({cycle}); remove one '{BASE_KEY}:'")
    data = read_yaml(path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: '{BASE_KEY}' must name a YAML file (relative to {path.parent}), got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: '{BASE_KEY}: {base}' not found (looked for {base_path})")
    return merge_deep(_read_with_bases(base_path, [*chain, resolved]), data)


def merge_deep(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else in ``over`` replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_deep(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict (in place and returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    validate_config: bool = True,
    resolve_presets: bool = True,
) -> TrainConfig:
    """YAML file (optional) + dotted overrides -> checked TrainConfig.

    ``resolve_presets=False`` keeps ``model.base_width``/``blocks_per_stage`` null where the file
    leaves them to the preset; that form is what recipes are written in, so that overriding
    ``model.size`` on a recipe changes the whole architecture.
    """
    data = read_config_file(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    cfg = from_dict(TrainConfig, data)
    resolved = resolve(cfg)
    if validate_config:
        validate(resolved)
    return resolved if resolve_presets else cfg


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill derived values (model preset) so the saved config says exactly what ran."""
    try:
        model = cfg.model.resolved()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(cfg, model=model)


def validate(cfg: TrainConfig) -> None:
    """Every check that needs only the config: values and relations between keys. Messages name the
    key to change. The checks against the world size, the prepared store and the filesystem build on
    this in ``stunet_scale/train/preflight.py::validate``, which the CLI, ``--dry-run`` and every rank call."""
    m, d, s, o, dist = cfg.model, cfg.data, cfg.schedule, cfg.optim, cfg.distributed
    div = m.patch_divisor
    if len(d.patch_size) != 3 or any(p < 1 for p in d.patch_size):
        raise ConfigError(f"data.patch_size must be 3 positive ints, got {d.patch_size}")
    for axis, (p, q) in enumerate(zip(d.patch_size, div)):
        if p % q:
            raise ConfigError(
                f"data.patch_size[{axis}]={p} is not a multiple of {q}, the product of model.pool_strides on that axis"
            )
    if all(p // q == 1 for p, q in zip(d.patch_size, div)):
        # InstanceNorm normalises over space; a single bottleneck voxel makes it undefined.
        raise ConfigError(
            f"data.patch_size={d.patch_size} leaves a 1x1x1 bottleneck; InstanceNorm needs more than one voxel there. "
            f"Use a larger patch or fewer/anisotropic model.pool_strides"
        )
    if len(cfg.loss.deep_supervision_weights) != len(m.pool_strides):
        raise ConfigError(
            f"loss.deep_supervision_weights needs {len(m.pool_strides)} entries (one per decoder output), "
            f"got {len(cfg.loss.deep_supervision_weights)}"
        )
    if m.deep_supervision and sum(cfg.loss.deep_supervision_weights) <= 0:
        raise ConfigError("loss.deep_supervision_weights must not all be zero")
    if not 0.0 <= d.oversample_foreground <= 1.0:
        raise ConfigError(f"data.oversample_foreground must be in [0, 1], got {d.oversample_foreground}")
    _validate_data_knobs(d)
    _validate_augmentation(cfg.augmentation)
    for name in ("epochs", "samples_per_epoch", "global_batch", "micro_batch"):
        if getattr(s, name) < 1:
            raise ConfigError(f"schedule.{name} must be >= 1, got {getattr(s, name)}")
    if s.global_batch % s.micro_batch:
        raise ConfigError(
            f"schedule.global_batch={s.global_batch} must be a multiple of schedule.micro_batch={s.micro_batch}"
        )
    if s.max_steps is not None and s.max_steps < 1:
        raise ConfigError("schedule.max_steps must be >= 1 or null")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if o.grad_clip < 0:
        raise ConfigError("optim.grad_clip must be >= 0 (0 disables clipping)")
    if dist.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.zero_stage must be 0, 1, 2 or 3, got {dist.zero_stage}")
    if dist.offload_params and (dist.backend != "deepspeed" or dist.zero_stage != 3):
        raise ConfigError("distributed.offload_params needs distributed.backend=deepspeed and distributed.zero_stage=3")
    # DeepSpeed offloads only what ZeRO partitions: optimizer states from stage 1 on (its
    # DeepSpeedZeroOffloadOptimizerConfig: "Valid with stage 1, 2, and 3"), parameters at stage 3.
    # Checked here so `train --dry-run` and the planner's Setting.valid() agree, before W ranks start.
    if dist.offload_optimizer and (dist.backend != "deepspeed" or dist.zero_stage < 1):
        raise ConfigError(
            f"distributed.offload_optimizer needs distributed.backend=deepspeed and distributed.zero_stage >= 1 "
            f"(got backend={dist.backend}, zero_stage={dist.zero_stage})"
        )
    if cfg.checkpoint.keep_last < 2:
        raise ConfigError("checkpoint.keep_last must be >= 2: the newest checkpoint may be the one being written")
    if cfg.checkpoint.every_steps < 1:
        raise ConfigError("checkpoint.every_steps must be >= 1")
    if cfg.checkpoint.rollback_after_skips < 1:
        raise ConfigError("checkpoint.rollback_after_skips must be >= 1")
    if cfg.checkpoint.spike_factor != 0 and not cfg.checkpoint.spike_factor > 1.0:
        # a factor <= 1 would skip every step above the median, i.e. half of normal training
        raise ConfigError(f"checkpoint.spike_factor={cfg.checkpoint.spike_factor} must be 0 (off) or > 1 (e.g. 5.0)")
    if cfg.checkpoint.spike_window < 1:
        raise ConfigError(f"checkpoint.spike_window={cfg.checkpoint.spike_window} must be >= 1 (e.g. 50)")
    if cfg.tracking.straggler_factor <= 1.0:
        raise ConfigError(f"tracking.straggler_factor={cfg.tracking.straggler_factor} must be > 1 (e.g. 1.5: 50% slower than the median rank)")
    if cfg.tracking.straggler_windows < 1:
        raise ConfigError("tracking.straggler_windows must be >= 1")
    if cfg.lease.renew_every_s < 1:
        raise ConfigError(f"lease.renew_every_s must be >= 1 (got {cfg.lease.renew_every_s})")
    if cfg.lease.stale_after_s < 3 * cfg.lease.renew_every_s:
        # a holder that is only slow (a renewal delayed by a busy filesystem) must not look dead
        raise ConfigError(f"lease.stale_after_s must be >= 3 * lease.renew_every_s ({3 * cfg.lease.renew_every_s}); "
                          f"got {cfg.lease.stale_after_s}")
    if dist.backend == "fsdp2" and dist.precision == "fp16":
        raise ConfigError("distributed.precision=fp16 is not supported with distributed.backend=fsdp2; use bf16 (no loss scaling needed)")
    if dist.timeout_s < 1:
        raise ConfigError("distributed.timeout_s must be >= 1")
    if cfg.tracking.log_every_steps < 1:
        raise ConfigError("tracking.log_every_steps must be >= 1")
    if not 0 < cfg.validation.step_size <= 1:
        raise ConfigError("validation.step_size must be in (0, 1]")
    if not cfg.validation.nsd_tolerance_mm >= 0:
        raise ConfigError(f"validation.nsd_tolerance_mm must be >= 0 (mm), got {cfg.validation.nsd_tolerance_mm}")


def _validate_data_knobs(d: DataConfig) -> None:
    """Loader knobs and case weighting of ``data.*`` (the store itself is checked by the trainer's pre-flight)."""
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
    if d.prefetch_factor < 1:
        raise ConfigError(f"data.prefetch_factor must be >= 1, got {d.prefetch_factor}")
    if d.wds_buffer_cases < 1 or d.wds_patches_per_case < 1:
        raise ConfigError("data.wds_buffer_cases and data.wds_patches_per_case must be >= 1")
    if d.case_weighting == "split" and d.split_weights and len(d.split_weights) != len(d.train_splits):
        raise ConfigError(f"data.split_weights needs one weight per data.train_splits entry "
                          f"({len(d.train_splits)}: {d.train_splits}), got {d.split_weights}")
    if any(w < 0 for w in d.split_weights) or (d.split_weights and sum(d.split_weights) <= 0):
        raise ConfigError(f"data.split_weights must be >= 0 and not all 0, got {d.split_weights}")


def _check_range(key: str, value, lo=None, hi=None, positive=False) -> None:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and value[0] <= value[1]):
        raise ConfigError(f"{key} must be [low, high] with low <= high, got {value}")
    if positive and value[0] <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")
    if lo is not None and value[0] < lo or hi is not None and value[1] > hi:
        raise ConfigError(f"{key} must lie in [{lo}, {hi}], got {value}")


def _validate_augmentation(a: AugmentationConfig) -> None:
    """Ranges and probabilities of ``augmentation.*``; errors name the key."""
    for name in ("rotation_p", "scaling_p", "noise_p", "blur_p", "brightness_p", "contrast_p", "lowres_p",
                 "gamma_inverted_p", "gamma_p", "blur_per_channel_p", "lowres_per_channel_p"):
        v = getattr(a, name)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"augmentation.{name} must be a probability in [0, 1], got {v}")
    if not 0 <= a.rotation_max_deg <= 180:
        raise ConfigError(f"augmentation.rotation_max_deg must be in [0, 180], got {a.rotation_max_deg}")
    _check_range("augmentation.scaling_range", a.scaling_range, positive=True)
    _check_range("augmentation.noise_variance", a.noise_variance, lo=0)
    _check_range("augmentation.blur_sigma", a.blur_sigma, positive=True)
    _check_range("augmentation.brightness_range", a.brightness_range, positive=True)
    _check_range("augmentation.contrast_range", a.contrast_range, positive=True)
    _check_range("augmentation.lowres_zoom", a.lowres_zoom, hi=1.0, positive=True)
    _check_range("augmentation.gamma_range", a.gamma_range, positive=True)
    if any(ax not in (0, 1, 2) for ax in a.mirror_axes) or len(set(a.mirror_axes)) != len(a.mirror_axes):
        raise ConfigError(f"augmentation.mirror_axes must be distinct axes among 0, 1, 2, got {a.mirror_axes}")


def micro_batches_per_rank(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches each rank runs per optimizer step (gradient accumulation), or a ConfigError naming the key."""
    if global_batch % (micro_batch * world_size):
        raise ConfigError(
            f"schedule.global_batch={global_batch} is not divisible by schedule.micro_batch={micro_batch} x "
            f"{world_size} ranks; change schedule.global_batch or schedule.micro_batch"
        )
    return global_batch // (micro_batch * world_size)


def world_batch_arithmetic(cfg: TrainConfig, world_size: int) -> dict[str, int]:
    """Gradient accumulation and step counts for a given world size, or a ConfigError naming the key."""
    s = cfg.schedule
    accumulation = micro_batches_per_rank(s.global_batch, s.micro_batch, world_size)
    total_samples = s.epochs * s.samples_per_epoch
    return {
        "world_size": world_size,
        "grad_accumulation": accumulation,
        "total_samples": total_samples,
        "total_steps": -(-total_samples // s.global_batch),
        "steps_per_epoch": -(-s.samples_per_epoch // s.global_batch),
    }


@dataclass(frozen=True)
class StreamConfig:
    """What the data code needs from a run's config: the ``data`` and ``augmentation`` sections and
    the few model and batch facts a patch stream depends on. The data code takes this, never
    ``TrainConfig``, so it does not depend on the trainer's sections."""

    data: DataConfig
    augmentation: AugmentationConfig
    seed: int
    in_channels: int
    num_classes: int
    pool_strides: tuple[tuple[int, ...], ...]  # resolved (presets filled in)
    deep_supervision: bool
    global_batch: int
    micro_batch: int
    samples_per_epoch: int  # the WebDataset reader's epoch of case order

    @classmethod
    def of(cls, cfg: TrainConfig) -> StreamConfig:
        model = cfg.model.resolved()
        return cls(data=cfg.data, augmentation=cfg.augmentation, seed=cfg.seed, in_channels=model.in_channels,
                   num_classes=model.num_classes, pool_strides=tuple(tuple(int(v) for v in s) for s in model.pool_strides),
                   deep_supervision=model.deep_supervision, global_batch=cfg.schedule.global_batch,
                   micro_batch=cfg.schedule.micro_batch, samples_per_epoch=cfg.schedule.samples_per_epoch)


def flatten(cfg, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a config (MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _help_for(cls: type, name: str) -> str:
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def to_yaml(cfg, comments: bool = True, header: str | None = None, base: str | None = None,
            only: set[str] | None = None) -> str:
    """YAML text of a config; with ``comments`` each key gets its help as a trailing comment.

    ``base`` writes a ``base:`` line first (see ``read_config_file``); ``only`` keeps the dotted keys
    listed there (and their sections): the form of a recipe that extends a base.
    """
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    if base is not None:
        note = "  # the recipe this file extends (relative path); the keys below replace its values" if comments else ""
        lines.append(f"{BASE_KEY}: {base}{note}")

    def scalar(v) -> str:
        text = yaml.dump(v, Dumper=_NoAliasDumper, default_flow_style=True, width=10_000).strip()
        return text[:-4].strip() if text.endswith("\n...") or text.endswith("...") else text

    def emit(obj, indent: int, prefix: str = "") -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            pad = "  " * indent
            dotted = prefix + f.name
            if only is not None and not any(k == dotted or k.startswith(dotted + ".") for k in only):
                continue
            if is_dataclass(value):
                note = f"  # {SECTION_HELP[f.name]}" if comments and f.name in SECTION_HELP else ""
                lines.append(f"{pad}{f.name}:{note}")
                emit(value, indent + 1, dotted + ".")
            else:
                help_text = _help_for(type(obj), f.name)
                note = f"  # {help_text}" if comments and help_text else ""
                lines.append(f"{pad}{f.name}: {scalar(value)}{note}")

    emit(cfg, 0)
    return "\n".join(lines) + "\n"


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_yaml(cfg, comments=True, header="resolved stunet-scale config (every default filled in)")
    return atomic_write_text(path, text)
