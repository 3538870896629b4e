"""DeepSpeed ZeRO stage 0-3 with a torch SGD, and the DeepSpeed config we build for STU-Net.

Choices for a 3D conv net (the README's "ZeRO-3 settings for a conv net"), written as integers because accelerate's "auto"
needs a transformer hidden size and DeepSpeed's defaults are tuned for LLMs:

* ``stage3_param_persistence_threshold = 1e5`` elements: InstanceNorm affine weights, conv
  biases and the small early convs (16->64 3^3 = 27.6k) stay resident on every rank instead of
  being all-gathered per use. They are ~0.5M elements in total at any size.
* ``stage3_prefetch_bucket_size`` and ``reduce_bucket_size`` = 1.2x the largest parameter
  (>= 5e7): STU-Net-H's biggest conv weight has 127.4M elements, more than DeepSpeed's 5e7
  default, which would limit prefetch to one parameter ahead. 1.2x gives 1.53e8 for H.
* ``overlap_comm`` explicit (true for stages 2/3), ``contiguous_gradients`` true.
* ``gradient_clipping`` explicit from ``optim.grad_clip`` (accelerate's "auto" would give 1.0;
  nnU-Net clips at 12).
* ``stage3_module_granularity_threshold`` and leaf modules are left off: both crashed in backward
  with conv + InstanceNorm blocks (shape mismatches; tried on CPU with DeepSpeed 0.19.8, torch 2.15).
* ``torch_autocast`` instead of ``bf16``: the ``bf16`` block casts every parameter (InstanceNorm
  included) to bf16; autocast keeps fp32 parameters and still all-gathers conv weights in bf16
  (DeepSpeed's "lower precision safe modules").
* ``zero_allow_untested_optimizer``: torch SGD is not on ZeRO's list of tested optimizers; it is
  element-wise, so ZeRO's flattening is exact for it.

Gradient accumulation uses DeepSpeed's explicit boundary (``set_gradient_accumulation_boundary``)
so a step that is abandoned halfway (non-finite loss on some micro-batch) can be discarded with
``optimizer.zero_grad()`` without the engine's micro-step counter drifting.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

from ..config import ConfigError
from .backend import Backend, make_sgd, param_groups

# Keys the run config owns; a DeepSpeed JSON may not set them differently (warned, ours win).
_OWNED_TOP = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "bf16", "fp16", "torch_autocast")
_OWNED_ZERO = ("stage", "offload_optimizer", "offload_param")
_NATIVE_TAG = "native"


def zero_defaults(stage: int, largest_param: int) -> dict:
    """Our ZeRO section for a conv net whose largest tensor has ``largest_param`` elements."""
    bucket = max(50_000_000, int(math.ceil(largest_param * 1.2 / 1e7)) * 10_000_000)
    zero = {"stage": stage, "contiguous_gradients": True, "overlap_comm": stage >= 2,
            "reduce_scatter": True, "reduce_bucket_size": bucket}
    if stage in (1, 2):
        zero["allgather_bucket_size"] = bucket
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": bucket,
            "stage3_param_persistence_threshold": 100_000,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": False,
        })
    return zero


def user_json_path(cfg) -> str | None:
    """distributed.deepspeed_config, or the file `accelerate launch` was given (its env var)."""
    return cfg.distributed.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None


def build_ds_config(cfg, world_size: int, grad_accumulation: int, largest_param: int,
                    user: dict | None = None, warn=print) -> dict:
    """The DeepSpeed config dict: our defaults < the user's JSON knobs < keys the run config owns."""
    d, o, s = cfg.distributed, cfg.optim, cfg.schedule
    user = dict(user or {})
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(
                f"the DeepSpeed JSON sets '{key}'; remove it: the optimizer and lr schedule come from optim.* and schedule.*"
            )
    ds: dict = {
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"tag_validation": "Fail"},
    }
    zero = zero_defaults(d.zero_stage, largest_param)
    for key, value in user.items():
        if key == "zero_optimization" or key.startswith("_"):  # "_comment" keys document the JSON
            continue
        if key not in _OWNED_TOP:
            ds[key] = value
    for key, value in (user.get("zero_optimization") or {}).items():
        if key not in _OWNED_ZERO:
            zero[key] = value
    bad = [f"zero_optimization.{k}" for k, v in zero.items() if v == "auto"] + [k for k, v in ds.items() if v == "auto"]
    if bad:
        raise ConfigError(
            f"DeepSpeed JSON {user_json_path(cfg)}: {', '.join(bad)} = 'auto' needs a transformer hidden size; "
            "write integers (see configs/deepspeed/*.json)"
        )
    owned = {
        "train_micro_batch_size_per_gpu": s.micro_batch,
        "gradient_accumulation_steps": grad_accumulation,
        "train_batch_size": s.global_batch,
        "gradient_clipping": float(o.grad_clip),
    }
    if d.precision in ("bf16", "fp16"):
        owned["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if d.precision == "bf16" else "float16"}
    zero["stage"] = d.zero_stage
    pin = torch.cuda.is_available()
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        ds["zero_force_ds_cpu_optimizer"] = False  # our torch SGD runs on the offloaded states
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    conflicts = []
    for key, value in owned.items():
        if key in user and user[key] != value and user[key] != "auto":
            conflicts.append(f"{key}={user[key]!r} (using {value!r})")
    user_stage = (user.get("zero_optimization") or {}).get("stage")
    if user_stage is not None and user_stage != d.zero_stage:
        conflicts.append(f"zero_optimization.stage={user_stage} (using distributed.zero_stage={d.zero_stage})")
    for key in ("bf16", "fp16"):
        if (user.get(key) or {}).get("enabled"):
            conflicts.append(f"{key}.enabled (using torch_autocast from distributed.precision={d.precision})")
    if conflicts:
        warn(f"DeepSpeed JSON {user_json_path(cfg)} disagrees with the run config; the run config wins: " + "; ".join(conflicts))
    ds.update(owned)
    ds["zero_optimization"] = zero
    return ds


def load_user_json(cfg) -> dict:
    path = user_json_path(cfg)
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"distributed.deepspeed_config: file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"distributed.deepspeed_config: {p} is not valid JSON ({e})") from None


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    native_format = "deepspeed"

    def __init__(self, module, cfg, env, grad_accumulation, warn=print):
        super().__init__(module, cfg, env, grad_accumulation)
        import deepspeed

        self.stage = cfg.distributed.zero_stage
        self.sharded_forward = self.stage == 3
        largest = max(p.numel() for p in module.parameters())
        self.ds_config = build_ds_config(cfg, env.world_size, grad_accumulation, largest, load_user_json(cfg),
                                         warn=warn if env.is_main else (lambda *_: None))
        if env.is_main:  # what DeepSpeed actually got, for the run's records
            run_dir = Path(cfg.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1, sort_keys=True))
        deepspeed.init_distributed(dist_backend=env.backend or ("nccl" if self.device.type == "cuda" else "gloo"),
                                   timeout=__import__("datetime").timedelta(seconds=cfg.distributed.timeout_s))
        groups, self.lr_scales = param_groups(module, cfg.optim.lr, cfg.optim.backbone_lr_scale)
        optimizer = make_sgd(groups, cfg.optim)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self.ds_config, dist_init_required=False,
        )
        self.module = self.engine.module

    # ---- step -------------------------------------------------------------------------------

    def forward(self, x):
        return self.engine(self._input(x))  # the engine applies torch_autocast itself

    @torch.no_grad()
    def eval_forward(self, x):
        return self.engine(self._input(x))

    def accumulate(self, last: bool):
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss):
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself

    def step(self):
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = math.nan if norm is None else float(norm)
        reason = None
        if not self.engine.was_step_applied():
            reason = "loss_scale"
        elif not math.isfinite(norm) or norm < 0:
            # ZeRO-3 in bf16/fp32 has no overflow check and has already applied the update; the
            # trainer counts it and relies on the loss check + rollback for what follows.
            reason = "nonfinite_grad_applied"
        return norm, reason

    def discard_grads(self):
        opt = self.engine.optimizer
        # ZeRO's zero_grad also resets its micro-step id, so the next backward overwrites the
        # partially accumulated partitions instead of adding to them.
        if hasattr(opt, "zero_grad"):
            opt.zero_grad(set_to_none=True)
        self.engine.zero_grad()

    @property
    def param_groups(self):
        return self.engine.optimizer.param_groups

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()

    # ---- checkpoints ------------------------------------------------------------------------

    def save_native(self, directory):
        # Collective on all ranks. save_latest=False: our commit protocol owns "latest".
        self.engine.save_checkpoint(directory, tag=_NATIVE_TAG, client_state={}, save_latest=False)

    def load_native(self, directory):
        path, _ = self.engine.load_checkpoint(directory, tag=_NATIVE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its checkpoint from {directory}")

    def _momentum_full(self, p):
        from deepspeed.utils import safe_get_full_optimizer_state

        if self.stage == 0:
            buf = self._stage0_state(p).get("momentum_buffer")
            return None if buf is None else buf.detach()
        try:
            return safe_get_full_optimizer_state(p, "momentum_buffer")
        except (KeyError, ValueError):  # no optimizer step yet: no momentum buffers exist
            return None

    def _stage0_state(self, p) -> dict:
        opt = self.engine.optimizer
        opt = getattr(opt, "optimizer", opt)
        return opt.state.get(p, {})

    def iter_full_state(self, wanted):
        from deepspeed.utils import safe_get_full_fp32_param

        has_state = self._has_momentum()
        for name, p in self.module.named_parameters():
            # Both calls are collectives (all-reduce of the full tensor) on stages 1-3.
            full = safe_get_full_fp32_param(p) if self.stage > 0 else p.detach()
            mom = self._momentum_full(p) if has_state else None
            if name in wanted:
                yield name, full.detach().float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape), (
                    None if mom is None else mom.detach().float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape))

    def _has_momentum(self) -> bool:
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        return any("momentum_buffer" in st for st in inner.state.values())

    def _local_chunk(self, p, value: torch.Tensor) -> torch.Tensor:
        """This rank's ZeRO-3 partition of a full tensor, zero-padded to the partition size.

        ``safe_set_full_*`` on ZeRO-3 narrows ``value`` at ``rank * partition`` without padding,
        which overruns on the last rank when numel % world != 0; the local API takes this instead.
        """
        part = p.ds_tensor.numel()  # ceil(numel / world): the padded partition size
        flat = value.to(self.device, torch.float32).flatten()
        local = torch.zeros(part, dtype=torch.float32, device=self.device)
        chunk = flat[self.env.rank * part:(self.env.rank + 1) * part]
        local[: chunk.numel()] = chunk
        return local

    @torch.no_grad()
    def load_params(self, get_param):
        """Parameters at any world size, into both copies ZeRO keeps.

        ZeRO-1/2/3 step on an fp32 master copy (its own tensors, also with fp32 model params) and
        copy it back into the model parameters after every step; writing only the model
        parameters would be undone by the next step. So each rank writes the model parameter
        (ZeRO-1/2: the full replica; ZeRO-3: its partition, plus the full tensor of parameters
        that stay resident by ``stage3_param_persistence_threshold``) and its part of the master
        (``safe_set_full_fp32_param`` / ``safe_set_local_fp32_param``). Stage 0 has no master.
        """
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        for name, p in self.module.named_parameters():
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            value = get_param(name).to(self.device, torch.float32).reshape(shape)
            if self.stage == 3:
                local = self._local_chunk(p, value)
                p.ds_tensor.copy_(local.to(p.ds_tensor.device, p.ds_tensor.dtype))
                if p.data.numel() == value.numel():  # resident (persistent or currently gathered)
                    p.data.copy_(value.to(p.dtype))
                if p.requires_grad:
                    safe_set_local_fp32_param(p, local)
            else:
                p.data.copy_(value.to(p.dtype))
                if self.stage in (1, 2) and p.requires_grad:
                    safe_set_full_fp32_param(p, value)

    def load_momentum(self, get_momentum):
        """Momentum at any world size: materialise SGD state with a no-op step, then overwrite.

        SGD creates momentum buffers lazily on its first step, and DeepSpeed's universal
        checkpoint converter only knows Adam's keys (``ds_to_universal.py``: KeyError 'exp_avg'). A zero-loss step with
        lr=0 creates the buffers without moving any parameter (p -= 0 * update is exact); then
        each rank writes its slice: ZeRO-3 through ``safe_set_local_optimizer_state`` with a
        manually padded partition (``safe_set_full_*`` overruns when numel % world != 0),
        ZeRO-1/2 through ``safe_set_full_optimizer_state``, stage 0 directly.
        """
        from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

        self._noop_step()
        for name, p in self.module.named_parameters():
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            value = get_momentum(name)
            # The no-op step left weight_decay * p in the buffer; a parameter without saved
            # momentum (never stepped) must start from zero like a fresh SGD.
            value = torch.zeros(shape) if value is None else value
            value = value.to(self.device, torch.float32).flatten()
            if self.stage == 3:
                safe_set_local_optimizer_state(p, self._local_chunk(p, value), "momentum_buffer")
            elif self.stage in (1, 2):
                safe_set_full_optimizer_state(p, value.reshape(p.shape), "momentum_buffer")
            else:
                self._stage0_state(p)["momentum_buffer"].copy_(value.reshape(p.shape))

    def _noop_step(self):
        """One optimizer step with zero gradients and lr 0: creates SGD state, changes nothing."""
        saved = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = 0.0
        patch = list(self.cfg.data.patch_size)
        x = torch.zeros(1, self.cfg.model.in_channels, *patch, device=self.device)
        self.engine.set_gradient_accumulation_boundary(True)
        out = self.engine(x)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        zero = sum(o.float().sum() for o in outs) * 0.0
        # backward without gas scaling: the value is zero either way
        self.engine.backward(zero, scale_wrt_gas=False)
        self.engine.step()
        for g, lr in zip(self.param_groups, saved):
            g["lr"] = lr

    def extra_state(self):
        return {}
