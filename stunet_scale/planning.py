"""Capacity planning: per-GPU memory, step time and GPU-hours of a pretraining run, before it starts.

    stunet-scale plan --size H --patch 128 --micro-batch 2 --gpus 64 --gpu-mem-gb 80
    stunet-scale train --config configs/pretrain/totalseg_stunet_h.yaml --dry-run --world-size 64 schedule.global_batch=128

(``train --dry-run`` itself is ``stunet_scale/train/dry_run.py``; this module adds its memory and
time lines through :func:`dry_run_memory_check`.)

Where the numbers come from:

- **Activations are measured, not modelled.** The real STU-Net module (with the real activation
  checkpointing wrapper) runs forward + the trainer's Dice/CE loss on meta tensors, which
  allocate nothing. A ``saved_tensors_hooks`` pair records every tensor autograd keeps for backward,
  deduplicated by storage (in-place LeakyReLU and views share one), plus the inputs each
  checkpointed unit holds for its recompute. Without checkpointing this gives 1.0 / 2.1 / 7.5 /
  16.7 GiB per 128^3 patch, bf16, S/B/L/H (tests/test_plan.py; the README's memory-facts table). The peak
  comes from torch's ``MemTracker`` replaying forward + loss + backward on the same meta tensors
  (recompute included); it does not see workspaces allocated inside kernels (cuDNN), which the
  headroom covers.
- **Model states follow what the trainer keeps**, sharded per ZeRO stage: fp32 weights, gradients
  and optimizer state (SGD momentum 4 B, AdamW 8 B), bf16 only inside autocast (DeepSpeed's
  ``torch_autocast`` mode): 12 B/param with SGD, 17.5 GB for STU-Net-H unsharded. (DeepSpeed's
  ``bf16`` mode, which the trainer avoids because it casts InstanceNorm parameters, would keep
  16 B/param: the ~23 GB of the README's memory-facts table.)
- **Step time = counted FLOPs / TFLOP/s.** FLOPs come from ``train_step_flops`` (counted on the
  meta device); checkpointing recomputes the forward (x4/3). The TFLOP/s is stated, not guessed:
  pass what ``stunet-scale bench train`` measured on your GPU with ``--tflops``; the default is the
  only published 3D U-Net calibration on an A100 (NVIDIA's nnU-Net results in
  DeepLearningExamples, bf16 AMP: ~27 TFLOP/s). Gradient traffic and offload transfers use stated bandwidths.

The result is an estimate of ``torch.cuda.max_memory_allocated``; a setting "fits" when that
plus a headroom (CUDA context, cuDNN workspaces, allocator fragmentation; 10% by default) is
within the card. Nothing here has been checked against a GPU yet (no GPU in this project's CI):
``README.md`` gives the command that compares prediction and measurement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

GIB = 2**30

# The paper's budget: 4000 epochs x 250 steps x batch 2 = 2M patches (schedule.epochs x samples_per_epoch).
PAPER_SAMPLES = 4000 * 500

# Stated throughput assumptions (override on the command line). See the module docstring.
A100_BF16_PEAK_TFLOPS = 312.0
DEFAULT_TFLOPS = 27.0  # NVIDIA nnU-Net 3D, A100-80GB, AMP, batch 4: 9.5 patches/s x 2.88 TFLOP (NVIDIA DeepLearningExamples)
DEFAULT_TFLOPS_SOURCE = "stated: NVIDIA nnU-Net 3D on A100-80GB, bf16 AMP (~9% MFU); measure yours with `stunet-scale bench train`"
INTRA_NODE_GBPS = 150.0  # NVLink all-reduce bus bandwidth per GPU, conservative for A100 NVLink3
INTER_NODE_GBPS = 20.0  # one HDR InfiniBand HCA (200 Gb/s) per GPU, achievable bus bandwidth
PCIE_GBPS = 20.0  # host <-> GPU copies (PCIe 4.0 x16, achievable)
HOST_OPTIMIZER_GBPS = 10.0  # host memory traffic of a CPU optimizer step, per GPU's share of the node

# DeepSpeed's buckets and ZeRO-3 persistence threshold come from the trainer's own
# ``parallel.deepspeed_engine.zero_defaults`` (see _zero_knobs), so the two cannot drift.
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP bucket_cap_mb default

CHECKPOINT_WARN_HOURS = 4.0  # dry run: warn when a crash could lose more wall-clock than this
OPTIMIZER_STATE_BYTES = {"sgd": 4, "adamw": 8}  # per parameter: momentum / (exp_avg, exp_avg_sq), fp32
CHECKPOINTINGS = ("none", "stage", "block")  # cheapest (no recompute) first
OFFLOADS = ("none", "optimizer", "params")


# --------------------------------------------------------------------------------------------
# Activations, measured on the meta device
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationProfile:
    """Activation memory of one micro-batch, measured on the meta device (bytes)."""

    model_saved: int  # what autograd keeps of the network until backward, weights saved by convs included
    weight_saved: int  # of which: those weights (extra memory only as autocast copies)
    logits: int  # the deep-supervision outputs, alive until backward is done
    loss_saved: int  # saved tensors of the Dice + CE deep-supervision loss (fp32)
    peak: int  # highest activation + temporary bytes over forward, loss and backward
    peak_method: str  # "simulated": torch's MemTracker replayed the step; "estimate": saved + 2 x largest

    @property
    def saved(self) -> int:
        return self.model_saved + self.logits + self.loss_saved


def _storage_key(t) -> int:
    # One key per storage so in-place ops and views are not counted twice. Meta tensors have
    # no data pointer; the StorageImpl address is unique while the tensor is alive (we keep it).
    return t.untyped_storage()._cdata


def _deep_supervision_loss(outputs, weights):
    """The trainer's loss itself (``stunet_scale.train.loss.DiceCELoss``: fp32 soft Dice + CE on
    every deep-supervision output, zero-weighted ones included) on all-background targets, so the
    planner measures exactly what the real step saves for backward."""
    import torch

    from .train.loss import DiceCELoss

    targets = [torch.zeros((o.shape[0], 1, *o.shape[2:]), dtype=torch.long, device=o.device) for o in outputs]
    return DiceCELoss(weights[: len(outputs)])(tuple(outputs), targets)[0]


_profile_cache: dict[tuple, ActivationProfile] = {}


def activation_profile(
    model_cfg,
    patch: tuple[int, int, int] = (128, 128, 128),
    micro_batch: int = 1,
    checkpointing: str = "none",
    precision: str = "bf16",
    loss_weights: tuple[float, ...] = (8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0),
    simulate: bool = True,
) -> ActivationProfile:
    """Run the real module (+ loss) on meta tensors and measure what a training step holds.

    ``simulate=False`` skips the MemTracker replay of backward (a few seconds for H) and
    estimates the peak from the saved bytes instead.
    """
    from .models.flops import _as_config, _config_key

    cfg = _as_config(model_cfg)
    key = (_config_key(cfg), tuple(patch), micro_batch, checkpointing, precision, tuple(loss_weights), simulate)
    if key not in _profile_cache:
        _profile_cache[key] = _measure(cfg, tuple(patch), micro_batch, checkpointing, precision,
                                       tuple(loss_weights), simulate)
    return _profile_cache[key]


def _meta_model(cfg, patch, micro_batch, checkpointing, precision):
    import torch

    from .models import build_stunet
    from .parallel import apply_activation_checkpointing

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    with torch.device("meta"):
        model = build_stunet(cfg)
        x = torch.empty(micro_batch, cfg.in_channels, *patch)
    # Autocast does not act on meta tensors, so half precision is emulated by casting: the convs
    # then save half-precision activations and weights, which is what autocast keeps too.
    model, x = model.to(dtype), x.to(dtype)
    units = model.checkpoint_units(checkpointing) if checkpointing != "none" else []
    return model, x, units, lambda: apply_activation_checkpointing(model, checkpointing)


def _measure(cfg, patch, micro_batch, checkpointing, precision, loss_weights, simulate) -> ActivationProfile:
    import torch

    model, x, units, checkpoint = _meta_model(cfg, patch, micro_batch, checkpointing, precision)
    param_keys = {_storage_key(p) for p in model.parameters()}
    held: dict[int, int] = {}  # storage -> bytes kept for backward
    weights: dict[int, int] = {}

    def record(t, into):
        into[_storage_key(t)] = t.untyped_storage().nbytes()

    def pack(t):
        record(t, weights if _storage_key(t) in param_keys else held)
        return t

    def hold_inputs(module, args):
        # Non-reentrant checkpointing keeps each unit's inputs for the recompute; autograd's
        # pack hook never sees them, so record them where they enter the unit.
        for a in args:
            if isinstance(a, torch.Tensor):
                record(a, held)

    hooks = [unit.register_forward_pre_hook(hold_inputs) for unit in units]
    checkpoint()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = model(x)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        model_bytes = sum(held.values()) + sum(weights.values())
        logits: dict[int, int] = {}
        for o in outputs:  # the training step holds the logits until its backward is done
            if _storage_key(o) not in held:
                record(o, logits)
        held.update(logits)
        before_loss = set(held)
        _deep_supervision_loss(outputs, loss_weights[: len(outputs)])
    loss_bytes = sum(v for k, v in held.items() if k not in before_loss)
    for h in hooks:
        h.remove()

    peak = _simulated_peak(cfg, patch, micro_batch, checkpointing, precision, loss_weights) if simulate else None
    method = "simulated"
    if peak is None:
        # Without the replay: everything saved plus the gradients in flight at the largest tensor.
        method = "estimate"
        peak = model_bytes + sum(logits.values()) + loss_bytes + 2 * max(list(held.values()) + [0])
    return ActivationProfile(model_bytes, sum(weights.values()), sum(logits.values()), loss_bytes, peak, method)


def _simulated_peak(cfg, patch, micro_batch, checkpointing, precision, loss_weights) -> int | None:
    """Replay forward + loss + backward on meta tensors under torch's MemTracker.

    MemTracker follows every tensor's storage through the autograd timeline (recompute of
    checkpointed units included), so its peak is what a caching-free allocator would need. We
    keep activations + temporaries at that peak; parameters and gradients are accounted for by
    ``model_state_bytes`` per ZeRO stage. Returns None where the private API is missing.
    """
    try:
        import torch
        from torch.distributed._tools.mem_tracker import MemTracker
    except Exception:
        return None
    model, x, _, checkpoint = _meta_model(cfg, patch, micro_batch, checkpointing, precision)
    checkpoint()
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        outputs = model(x)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        _deep_supervision_loss(outputs, loss_weights[: len(outputs)]).backward()
    snapshot = tracker.get_tracker_snapshot("peak").get(torch.device("meta"), {})
    kinds = {getattr(k, "value", k): v for k, v in snapshot.items()}
    return int(kinds.get("Activation", 0) + kinds.get("Temp", 0) + kinds.get("Other", 0))


# --------------------------------------------------------------------------------------------
# Model states, communication, step time
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    params: int
    largest_param: int  # elements of the biggest parameter tensor (ZeRO-3 gathers at least this)
    persistent_params: int  # elements in tensors below the ZeRO-3 persistence threshold
    train_flops_per_patch: int  # forward + backward, no recompute


_facts_cache: dict[tuple, ModelFacts] = {}


def _zero_knobs(stage: int, largest_param: int) -> dict:
    """The ZeRO section the trainer builds for this model (bucket sizes in elements).

    Imported here, not at module level: deepspeed_engine pulls in torch (which `plan` only needs
    once it measures something); it imports deepspeed itself only when an engine is built."""
    from .parallel.deepspeed_engine import zero_defaults

    return zero_defaults(stage, largest_param)


def model_facts(model_cfg, patch=(128, 128, 128)) -> ModelFacts:
    import torch

    from .models import build_stunet, train_step_flops
    from .models.flops import _as_config, _config_key

    cfg = _as_config(model_cfg)
    key = (_config_key(cfg), tuple(patch))
    if key not in _facts_cache:
        with torch.device("meta"):
            model = build_stunet(cfg)
        sizes = [p.numel() for p in model.parameters()]
        # ZeRO-3 keeps tensors below this threshold whole on every rank.
        threshold = _zero_knobs(3, max(sizes))["stage3_param_persistence_threshold"]
        _facts_cache[key] = ModelFacts(
            params=sum(sizes),
            largest_param=max(sizes),
            persistent_params=sum(s for s in sizes if s < threshold),
            train_flops_per_patch=train_step_flops(cfg, tuple(patch), 1),
        )
    return _facts_cache[key]


@dataclass(frozen=True)
class Setting:
    zero: int  # 0 = plain data parallel (DDP), 1/2/3 = DeepSpeed ZeRO stage (FSDP2 ~ 3)
    checkpointing: str
    offload: str

    def label(self) -> str:
        z = "DDP" if self.zero == 0 else f"ZeRO-{self.zero}"
        parts = [z, f"AC {self.checkpointing}"]
        if self.offload != "none":
            parts.append(f"offload {self.offload}")
        return ", ".join(parts)

    def valid(self) -> str | None:
        """Why this combination cannot run, or None."""
        if self.offload == "params" and self.zero != 3:
            return "parameter offload needs ZeRO-3"
        if self.offload == "optimizer" and self.zero == 0:
            return "optimizer offload needs ZeRO >= 1"
        return None


@dataclass
class Workload:
    model: object  # size letter or ModelConfig
    patch: tuple[int, int, int] = (128, 128, 128)
    micro_batch: int = 2
    gpus: int = 8
    gpu_mem_gb: float = 80.0
    gpus_per_node: int = 8
    grad_accumulation: int = 1
    samples: int = PAPER_SAMPLES
    precision: str = "bf16"
    optimizer: str = "sgd"
    tflops: float = DEFAULT_TFLOPS
    tflops_source: str = DEFAULT_TFLOPS_SOURCE
    headroom: float = 0.10
    net_gbps: float | None = None  # None = NVLink inside a node, InfiniBand across nodes

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.gpus * self.grad_accumulation

    @property
    def bandwidth_gbps(self) -> float:
        if self.net_gbps is not None:
            return self.net_gbps
        return INTRA_NODE_GBPS if self.gpus <= self.gpus_per_node else INTER_NODE_GBPS


def model_state_bytes(facts: ModelFacts, setting: Setting, w: Workload) -> dict[str, float]:
    """Per-GPU bytes of parameters, gradients, optimizer states and buffers (and host bytes).

    This follows what the trainer keeps (stunet_scale/parallel): fp32 parameters, gradients and
    optimizer state, with bf16/fp16 only inside autocast (DeepSpeed runs in its ``torch_autocast``
    mode, so InstanceNorm parameters are never cast). Per parameter with SGD: 4 (weight) + 4
    (gradient) + 4 (momentum) = 12 B. ZeRO-1/2 add an fp32 copy of the rank's partition for the
    update (4 B / N); under ZeRO-3 that copy aliases the fp32 weights. The bf16 weight copies
    autocast makes are saved for backward and are counted with the activations.
    """
    P, N = facts.params, max(w.gpus, 1)
    z = setting.zero
    b_state = OPTIMIZER_STATE_BYTES[w.optimizer]
    b_master = 4 if z in (1, 2) else 0
    params = P * 4 / (N if z >= 3 else 1)
    grads = P * 4 / (N if z >= 2 else 1)
    optim = P * (b_master + b_state) / (N if z >= 1 else 1)
    host = 0.0
    if setting.offload in ("optimizer", "params"):
        host += optim  # this rank's share lives in CPU memory
        optim = 0.0
    if setting.offload == "params":
        host += params
        params = 0.0
    buffers = 0.0
    knobs = _zero_knobs(z, facts.largest_param) if z >= 1 else {}
    if z >= 3:
        # Gathered weights in flight (current module + prefetch bucket) and the unsharded small tensors.
        params += facts.persistent_params * 4
        buffers += min(P, knobs["stage3_prefetch_bucket_size"] + facts.largest_param) * 4
    if z >= 1:
        buffers += min(P, knobs["reduce_bucket_size"]) * 4  # reduce(-scatter) bucket of fp32 gradients
    else:
        buffers += 2 * min(P * 4, DDP_BUCKET_BYTES)
    return {"params": params, "grads": grads, "optimizer": optim, "buffers": buffers, "host_per_gpu": host}


def step_seconds(facts: ModelFacts, setting: Setting, w: Workload) -> dict[str, float]:
    """Seconds per optimizer step: compute, gradient/parameter traffic, offload transfers."""
    P, N = facts.params, max(w.gpus, 1)
    recompute = 4 / 3 if setting.checkpointing != "none" else 1.0
    patches = w.micro_batch * w.grad_accumulation
    compute = patches * facts.train_flops_per_patch * recompute / (w.tflops * 1e12)
    # DeepSpeed's torch_autocast mode communicates conv weights and gradients in half precision;
    # DDP all-reduces the fp32 gradients.
    b = 2 if w.precision in ("bf16", "fp16") and setting.zero >= 1 else 4
    ring = (N - 1) / N if N > 1 else 0.0
    if setting.zero >= 3:
        # Every micro-step gathers weights for forward and backward and reduce-scatters gradients.
        traffic = 3 * P * b * ring * w.grad_accumulation
    elif setting.zero == 2:
        traffic = 2 * P * b * ring * w.grad_accumulation  # reduce-scatter per micro-step + all-gather
    else:
        traffic = 2 * P * b * ring  # one all-reduce per step (no_sync while accumulating)
    comm = traffic / (w.bandwidth_gbps * 1e9)
    offload = 0.0
    if setting.offload in ("optimizer", "params"):
        # Gradients down (fp32), weights up (half), and a CPU optimizer pass over this rank's share.
        offload += (P / N) * (4 + 4) / (PCIE_GBPS * 1e9)
        offload += (P / N) * (4 + 4 + 4 + OPTIMIZER_STATE_BYTES[w.optimizer]) / (HOST_OPTIMIZER_GBPS * 1e9)
    if setting.offload == "params":
        offload += 2 * (P / N) * 4 * w.grad_accumulation / (PCIE_GBPS * 1e9)
    # Communication overlaps with compute (overlap_comm); offload transfers are not assumed to.
    step = max(compute, comm) + offload
    return {"compute": compute, "comm": comm, "offload": offload, "step": step}


def estimate(w: Workload, setting: Setting) -> dict:
    """Memory, fit and time of one setting."""
    facts = model_facts(w.model, w.patch)
    act = activation_profile(w.model, w.patch, w.micro_batch, setting.checkpointing, w.precision)
    mem = model_state_bytes(facts, setting, w)
    on_gpu = mem["params"] + mem["grads"] + mem["optimizer"] + mem["buffers"]
    # Weights saved by convs are extra memory where they are autocast's half-precision copies
    # (always, in this trainer: parameters stay fp32, also under ZeRO-3, whose gathered fp32
    # weights are freed after use while autograd keeps the bf16 copy). In fp32 they are the
    # parameters themselves.
    extra_weights = 0 if w.precision == "fp32" else act.weight_saved
    act_saved = act.model_saved - act.weight_saved + extra_weights + act.logits
    act_peak = act.peak + extra_weights
    total = on_gpu + act_peak
    usable = w.gpu_mem_gb * 1e9 * (1 - w.headroom)
    t = step_seconds(facts, setting, w)
    steps = math.ceil(w.samples / w.global_batch)
    hours = steps * t["step"] / 3600
    return {
        "setting": dataclasses.asdict(setting),
        "label": setting.label(),
        "memory_gib": {
            "params": mem["params"] / GIB,
            "grads": mem["grads"] / GIB,
            "optimizer": mem["optimizer"] / GIB,
            "buffers": mem["buffers"] / GIB,
            "activations_saved": act_saved / GIB,
            "loss_saved": act.loss_saved / GIB,
            "activation_peak": act_peak / GIB,
            "total": total / GIB,
            "host_per_gpu": mem["host_per_gpu"] / GIB,
        },
        "usable_gib": usable / GIB,
        "fits": total <= usable,
        "step_seconds": t,
        "patches_per_second_per_gpu": w.micro_batch * w.grad_accumulation / t["step"],
        "optimizer_steps": steps,
        "wall_clock_hours": hours,
        "gpu_hours": hours * w.gpus,
    }


def candidate_settings(zero: int | None = None, checkpointing: str | None = None, offload: str | None = None) -> list[Setting]:
    """Every valid combination, with the user's fixed choices held constant."""
    out = []
    for z in ([zero] if zero is not None else [0, 1, 2, 3]):
        for ac in ([checkpointing] if checkpointing is not None else list(CHECKPOINTINGS)):
            for off in ([offload] if offload is not None else list(OFFLOADS)):
                s = Setting(z, ac, off)
                if s.valid() is None:
                    out.append(s)
    return out


def _simplicity(s: Setting) -> tuple:
    # Among settings that cost the same, prefer the one with fewer moving parts: lower ZeRO stage
    # (DDP has no per-module hooks), no offload, coarser or no checkpointing.
    return (OFFLOADS.index(s.offload), s.zero, CHECKPOINTINGS.index(s.checkpointing))


def plan(w: Workload, zero: int | None = None, checkpointing: str | None = None, offload: str | None = None) -> dict:
    """Estimate every candidate setting and recommend the cheapest one that fits."""
    facts = model_facts(w.model, w.patch)
    rows = []
    for s in candidate_settings(zero, checkpointing, offload):
        e = estimate(w, s)
        e["_key"] = s
        rows.append(e)
    fitting = [r for r in rows if r["fits"]]
    best = None
    if fitting:
        # Cheapest in GPU-hours; settings within 1% of each other count as a tie.
        cheapest = min(r["gpu_hours"] for r in fitting)
        ties = [r for r in fitting if r["gpu_hours"] <= cheapest * 1.01]
        best = min(ties, key=lambda r: _simplicity(r["_key"]))
    for r in rows:
        r["recommended"] = r is best
        del r["_key"]
    size = getattr(w.model, "size", w.model)
    return {
        "workload": {
            "model": size if isinstance(size, str) else "custom",
            "params": facts.params,
            "patch": list(w.patch),
            "micro_batch": w.micro_batch,
            "grad_accumulation": w.grad_accumulation,
            "gpus": w.gpus,
            "gpus_per_node": w.gpus_per_node,
            "global_batch": w.global_batch,
            "gpu_mem_gb": w.gpu_mem_gb,
            "precision": w.precision,
            "optimizer": w.optimizer,
            "samples": w.samples,
            "train_tflop_per_patch": facts.train_flops_per_patch / 1e12,
        },
        "assumptions": {
            "tflops_per_gpu": w.tflops,
            "tflops_source": w.tflops_source,
            "mfu_vs_a100_bf16_peak": w.tflops / A100_BF16_PEAK_TFLOPS,
            "link_gbps": w.bandwidth_gbps,
            "pcie_gbps": PCIE_GBPS,
            "headroom": w.headroom,
            "recompute_factor_with_checkpointing": 4 / 3,
        },
        "candidates": rows,
        "recommended": best,
    }


# --------------------------------------------------------------------------------------------
# Text report
# --------------------------------------------------------------------------------------------


def _hours(h: float) -> str:
    return f"{h / 24:.1f} d" if h >= 48 else f"{h:.1f} h"


def format_plan(result: dict) -> str:
    w, a = result["workload"], result["assumptions"]
    lines = [
        f"STU-Net-{w['model']} ({w['params'] / 1e6:,.1f}M params), patch {'x'.join(map(str, w['patch']))}, "
        f"micro-batch {w['micro_batch']} x {w['gpus']} GPUs x accumulation {w['grad_accumulation']} "
        f"= global batch {w['global_batch']}, {w['precision']}, {w['optimizer'].upper()}",
        f"budget {w['samples']:,} patches ({w['train_tflop_per_patch']:.2f} TFLOP each fwd+bwd); "
        f"{a['tflops_per_gpu']:.1f} TFLOP/s per GPU ({a['tflops_source']})",
        f"per-GPU memory predicted (GiB) vs {w['gpu_mem_gb']:.0f} GB card minus {a['headroom']:.0%} headroom "
        f"= {result['candidates'][0]['usable_gib']:.1f} GiB usable",
        "",
        f"  {'setting':36} {'params':>6} {'grads':>6} {'optim':>6} {'buf':>5} {'saved':>6} {'loss':>5} "
        f"{'act pk':>6} {'total':>6}  fits  {'s/step':>7} {'wall':>8} {'GPU-h':>9}",
    ]
    fits_without_offload = {(r["setting"]["zero"], r["setting"]["checkpointing"])
                            for r in result["candidates"] if r["fits"] and r["setting"]["offload"] == "none"}
    hidden = 0
    for r in result["candidates"]:
        m = r["memory_gib"]
        if r["setting"]["offload"] != "none" and (r["setting"]["zero"], r["setting"]["checkpointing"]) in fits_without_offload:
            hidden += 1  # offload only costs time where the same setting already fits without it
            continue
        mark = "<- recommended" if r["recommended"] else ""
        lines.append(
            f"  {r['label']:36} {m['params']:6.1f} {m['grads']:6.1f} {m['optimizer']:6.1f} {m['buffers']:5.1f} "
            f"{m['activations_saved']:6.1f} {m['loss_saved']:5.1f} {m['activation_peak']:6.1f} "
            f"{m['total']:6.1f}  {'yes ' if r['fits'] else 'NO  '}  {r['step_seconds']['step']:7.3f} "
            f"{_hours(r['wall_clock_hours']):>8} {r['gpu_hours']:9,.0f} {mark}"
        )
    best = result["recommended"]
    if hidden:
        lines.append(f"  ({hidden} offload variants of settings that already fit are left out; --json lists all)")
    lines.append("")
    if best is None:
        lines.append("nothing fits: lower --micro-batch, use activation checkpointing/offload, or a bigger card")
    else:
        lines.append(
            f"recommended: {best['label']}: {best['memory_gib']['total']:.1f} GiB per GPU, "
            f"{best['patches_per_second_per_gpu']:.2f} patches/s/GPU, {best['optimizer_steps']:,} steps, "
            f"{_hours(best['wall_clock_hours'])} wall-clock, {best['gpu_hours']:,.0f} GPU-hours"
        )
    lines.append("GiB per GPU. saved/loss: what autograd keeps from the network (logits and autocast weight "
                 "copies included) and from the loss until backward; act pk: activations + temporaries at the "
                 "step's peak, replayed on the meta device; total = states + act pk")
    return "\n".join(lines)


def workload_from_args(args) -> Workload:
    patch = tuple(args.patch) * (3 if len(args.patch) == 1 else 1)
    if len(patch) != 3:
        raise ValueError("--patch takes one edge or three")
    tflops = args.tflops if args.tflops is not None else DEFAULT_TFLOPS
    source = "stated on the command line" if args.tflops is not None else DEFAULT_TFLOPS_SOURCE
    return Workload(
        model=args.size, patch=patch, micro_batch=args.micro_batch, gpus=args.gpus, gpu_mem_gb=args.gpu_mem_gb,
        gpus_per_node=args.gpus_per_node, grad_accumulation=args.grad_accumulation, samples=args.samples,
        precision=args.precision, optimizer=args.optimizer, tflops=tflops, tflops_source=source,
        headroom=args.headroom,
    )


def run_plan_cli(args) -> int:
    """`stunet-scale plan`: 0 when something fits, 1 when nothing does."""
    w = workload_from_args(args)
    result = plan(w, zero=args.zero, checkpointing=args.checkpointing, offload=args.offload)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0 if result["recommended"] is not None else 1


# The planner's part of `train --dry-run` (the run's checks are stunet_scale/train/dry_run.py's)
# --------------------------------------------------------------------------------------------


def _setting_from_config(cfg) -> Setting:
    dist = cfg.distributed
    if dist.backend == "deepspeed":
        zero = dist.zero_stage
    elif dist.backend == "fsdp2":
        zero = 3  # fully_shard with reshard_after_forward: ZeRO-3's memory profile
    else:
        zero = 0
    offload = "params" if dist.offload_params else ("optimizer" if dist.offload_optimizer else "none")
    return Setting(zero, dist.activation_checkpointing, offload)


def _detected_gpu_mem_gb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 1e9
    except Exception:
        return None
    return None


def dry_run_memory_check(cfg, world_size: int, grad_accumulation: int, gpu_mem_gb: float | None = None,
                         tflops: float | None = None) -> list[tuple[str, str]]:
    """The planner's prediction for exactly this configuration, as ``(level, text)`` lines for
    ``train --dry-run`` (level ``ok``, ``warn`` or ``error``).

    Checked against the GPU this process sees, else ``gpu_mem_gb`` / ``$STUNET_GPU_MEM_GB``; with
    neither, an 80 GB card is assumed and a misfit is only a warning.
    """
    lines: list[tuple[str, str]] = []
    s, dist = cfg.schedule, cfg.distributed
    detected = _detected_gpu_mem_gb()
    stated = gpu_mem_gb or (float(os.environ["STUNET_GPU_MEM_GB"]) if os.environ.get("STUNET_GPU_MEM_GB") else None)
    mem_gb = stated or detected
    setting = _setting_from_config(cfg)
    try:
        w = Workload(
            model=cfg.model, patch=tuple(cfg.data.patch_size), micro_batch=s.micro_batch, gpus=world_size,
            gpu_mem_gb=mem_gb or 80.0, grad_accumulation=grad_accumulation,
            samples=s.epochs * s.samples_per_epoch, precision=dist.precision,
            tflops=tflops or DEFAULT_TFLOPS,
            tflops_source="stated" if tflops else DEFAULT_TFLOPS_SOURCE,
        )
        e = estimate(w, setting)
        m = e["memory_gib"]
        text = (f"memory ({setting.label()}): {m['total']:.1f} GiB per GPU predicted "
                f"(states {m['params'] + m['grads'] + m['optimizer'] + m['buffers']:.1f}, activations "
                f"{m['activation_peak']:.1f}) vs {e['usable_gib']:.1f} usable")
        if mem_gb is None:
            text += " on an assumed 80 GB card (no GPU here; set STUNET_GPU_MEM_GB to check against yours)"
        if e["fits"]:
            lines.append(("ok", text))
        else:
            better = plan(w)["recommended"]
            hint = f"; the planner suggests {better['label']}" if better else "; nothing fits at this micro-batch"
            msg = text + hint + " (distributed.zero_stage / distributed.activation_checkpointing / schedule.micro_batch)"
            # Only a known card makes this a failure; against an assumed one it is advice.
            lines.append(("warn" if mem_gb is None else "error", msg))
        lines.append(("ok", f"time at {w.tflops:.0f} TFLOP/s/GPU: {e['step_seconds']['step']:.3f} s/step, "
                            f"{_hours(e['wall_clock_hours'])} wall-clock, {e['gpu_hours']:,.0f} GPU-hours for "
                            f"{w.samples:,} samples"))
        # A crash (unlike a preemption, which saves first) loses everything since the last save.
        between = cfg.checkpoint.every_steps * e["step_seconds"]["step"] / 3600
        if between > CHECKPOINT_WARN_HOURS:
            hourly = max(1, int(3600 / e["step_seconds"]["step"]))
            lines.append(("warn", f"checkpoint.every_steps={cfg.checkpoint.every_steps} is {_hours(between)} of "
                                  f"wall-clock at this speed: a crash loses up to {between * world_size:,.0f} "
                                  f"GPU-hours; ~{hourly} steps is one hour"))
    except Exception as exc:
        lines.append(("warn", f"memory/time estimate unavailable: {exc}"))
    return lines
