"""One interface over the four ways to run a step: one process, DDP, FSDP2, DeepSpeed ZeRO 0-3.

The trainer's step is the same for all of them:

    with backend.accumulate(last=i == n - 1):      # DDP no_sync / DeepSpeed boundary
        outputs = backend.forward(x)                # autocast + memory format inside
        loss = loss_fn(outputs, targets)            # fp32, outside autocast
        backend.backward(loss)                      # 1/grad_accumulation and loss scaling inside
    grad_norm = backend.step()                      # clip + optimizer step (or skip if non-finite)

Precision policy (the same on every backend, shown in tests/test_train_precision.py): parameters
and optimizer state stay fp32; ``torch.autocast`` runs conv in bf16 (or fp16 + loss scaling); the
InstanceNorm affine parameters are never cast, and the loss is computed on fp32 logits. DeepSpeed's
``"bf16": {"enabled": true}`` mode would cast every parameter to bf16 (InstanceNorm's included), so
its ``torch_autocast`` section is used instead.

World-size independence: ``iter_full_state`` yields every parameter and its SGD momentum as full
fp32 tensors (collectively, where the backend shards them), which is what the portable copy of a
checkpoint stores; ``load_params`` and ``load_momentum`` put them back at any world size, into the
wrapped model, so that resuming and rolling back go through the same code: a sharded backend writes
its own shards, and one with an fp32 master copy of the parameters (DeepSpeed ZeRO-1/2/3) writes
that copy too, or its next step would copy the old values back over the loaded ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .activation_checkpointing import apply_activation_checkpointing
from .distributed import DistEnv

HEAD_PREFIX = "seg_outputs."


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def param_groups(module: nn.Module, lr: float, backbone_lr_scale: float) -> tuple[list[dict], list[float]]:
    """SGD param groups and their lr multipliers: heads at 1, everything else at backbone_lr_scale.

    One group when the scale is 1, so a pretraining checkpoint's optimizer layout stays simple.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if backbone_lr_scale == 1.0:
        return [{"params": params, "lr": lr}], [1.0]
    heads = [p for n, p in module.named_parameters() if p.requires_grad and n.startswith(HEAD_PREFIX)]
    head_ids = {id(p) for p in heads}
    backbone = [p for p in params if id(p) not in head_ids]
    return ([{"params": backbone, "lr": lr * backbone_lr_scale}, {"params": heads, "lr": lr}],
            [backbone_lr_scale, 1.0])


def make_sgd(groups: list[dict], optim_cfg) -> torch.optim.SGD:
    return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                           nesterov=optim_cfg.nesterov, weight_decay=optim_cfg.weight_decay)


def prepare_module(module: nn.Module, dist_cfg) -> nn.Module:
    """Model transformations every backend shares, in torchtitan's order: AC, then compile."""
    apply_activation_checkpointing(module, dist_cfg.activation_checkpointing)
    if dist_cfg.channels_last:
        module.to(memory_format=torch.channels_last_3d)
    if dist_cfg.compile:
        # Per block, in place: names (and so checkpoint keys) stay those of the released STU-Net,
        # and repeated blocks of one shape share one compiled graph. All blocks share one code
        # object (BasicResBlock.forward), so dynamo sees one recompile per distinct block shape
        # (22 for a 6-stage net): past its default limit (8) it would switch to dynamic shapes,
        # which Inductor cannot lower for strided conv3d. Shapes are fixed per block in
        # training and inference, so compile static graphs and allow one per block.
        from torch._dynamo import config as dynamo_config

        blocks = module.checkpoint_units("block")
        limit = max(dynamo_config.recompile_limit, 2 * len(blocks))
        dynamo_config.recompile_limit = limit
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * limit)
        for block in blocks:
            block.compile(dynamic=False)
    return module


class Backend:
    """Base class; subclasses implement the distributed parts."""

    name = "none"
    sharded_forward = False  # True when every forward is a collective (ZeRO-3, FSDP2)

    def __init__(self, module: nn.Module, cfg, env: DistEnv, grad_accumulation: int):
        self.module = module
        self.cfg = cfg
        self.env = env
        self.grad_accumulation = grad_accumulation
        self.device = env.device
        self.precision = cfg.distributed.precision
        self.amp_dtype = autocast_dtype(self.precision)
        self.grad_clip = cfg.optim.grad_clip
        self.lr_scales: list[float] = [1.0]

    # ---- step -------------------------------------------------------------------------------

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.cfg.distributed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    model: nn.Module  # what the training forward calls: the module, or its DDP/FSDP2 wrapping

    def forward(self, x: torch.Tensor):
        with self.autocast():
            return self.model(self._input(x))

    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> tuple[float, str | None]:
        """Clip and apply the accumulated gradient.

        Returns ``(pre-clip global grad norm, skip reason)``; the reason is None when the update
        was applied, ``"nonfinite_grad"`` when the norm was not finite (parameters and optimizer
        state untouched), or ``"loss_scale"`` when fp16 loss scaling skipped it. The decision is
        the same on every rank because the norm is a global quantity.
        """
        raise NotImplementedError

    # Backends that own a torch optimizer (none, DDP, FSDP2) share the rest of the step;
    # DeepSpeed's engine owns its optimizer and overrides these.
    optimizer: torch.optim.Optimizer

    def _clip_and_step(self, parameters, scaler=None) -> tuple[float, str | None]:
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        reason = None
        if scaler is not None:
            # GradScaler skips the step itself on inf/nan and lowers the scale (normal for fp16).
            scaler.step(self.optimizer)
            scaler.update()
            reason = None if math.isfinite(norm) else "loss_scale"
        elif math.isfinite(norm):
            self.optimizer.step()
        else:
            reason = "nonfinite_grad"
        self.optimizer.zero_grad(set_to_none=True)
        return norm, reason

    def discard_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def set_lr(self, lr: float) -> None:
        for group, scale in zip(self.param_groups, self.lr_scales):
            group["lr"] = lr * scale

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    @property
    def eval_model(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor):
        with self.autocast():
            return self.eval_model(self._input(x))

    def after_eval(self) -> None:
        """Called once after a block of evaluation forwards (FSDP2 re-shards here)."""

    # ---- checkpoints ------------------------------------------------------------------------

    native_format = "none"  # what save_native writes: none | deepspeed | dcp

    def save_native(self, directory: str) -> None:
        """Write the backend's own checkpoint (collective where the backend shards state)."""

    def load_native(self, directory: str) -> None:
        raise NotImplementedError

    def iter_full_state(self, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """Yield (name, fp32 param, fp32 momentum or None) on CPU for the names in ``wanted``.

        Every rank must call this with the same parameter order: on sharded backends each item is
        a collective, and ranks only keep the names they were assigned.
        """
        raise NotImplementedError

    def load_params(self, get_param: Callable[[str], torch.Tensor]) -> None:
        """Set every parameter from full fp32 tensors by name (any world size; collective-free).

        Every rank gets the full tensors and keeps what it owns.
        """
        raise NotImplementedError

    def load_momentum(self, get_momentum: Callable[[str], torch.Tensor | None]) -> None:
        """Set SGD momentum from full fp32 tensors by parameter name (any world size)."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Small JSON-able state outside params/optimizer (e.g. the fp16 loss scale)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# one process and DDP: plain torch
# --------------------------------------------------------------------------------------------


class TorchBackend(Backend):
    """``none`` (one process) and ``ddp``: replicated params, a plain torch SGD."""

    def __init__(self, module, cfg, env, grad_accumulation, ddp: bool):
        super().__init__(module, cfg, env, grad_accumulation)
        self.name = "ddp" if ddp else "none"
        module.to(self.device)
        groups, self.lr_scales = param_groups(module, cfg.optim.lr, cfg.optim.backbone_lr_scale)
        self.optimizer = make_sgd(groups, cfg.optim)
        self.model: nn.Module = module
        if ddp and env.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            # STU-Net has no buffers (InstanceNorm keeps no running stats), so there is nothing to sync.
            self.model = DDP(module, gradient_as_bucket_view=True, **kwargs)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    @property
    def eval_model(self) -> nn.Module:
        # The bare module: DDP's forward hooks are for training only and evaluation is rank-local.
        return self.module

    def accumulate(self, last: bool):
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss):
        loss = loss / self.grad_accumulation
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self):
        return self._clip_and_step(self.module.parameters(), self.scaler)

    def iter_full_state(self, wanted):
        for name, p in self.module.named_parameters():
            if name in wanted:
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                yield name, p.detach().float().cpu(), None if buf is None else buf.detach().float().cpu()

    @torch.no_grad()
    def load_params(self, get_param):
        # In place: DDP and the optimizer hold these very tensors. Every rank loads the same values,
        # so DDP replicas stay identical without a broadcast.
        for name, p in self.module.named_parameters():
            p.copy_(get_param(name).reshape(p.shape))

    def load_momentum(self, get_momentum):
        for name, p in self.module.named_parameters():
            value = get_momentum(name)
            if value is not None:
                self.optimizer.state[p]["momentum_buffer"] = value.to(p.device, p.dtype).reshape(p.shape).clone()

    def extra_state(self):
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_extra_state(self, state):
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
