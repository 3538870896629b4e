"""torch FSDP2 (``fully_shard``): per-parameter dim-0 sharding, checkpoints through DCP.

Layout: one FSDP unit per residual block, then the root (stem-less STU-Net: the root group holds
the up-sampling 1x1 convs and the seg heads). ``reshard_after_forward=True`` frees gathered
weights after each block's forward (ZeRO-3-like); ``False`` keeps them for backward (ZeRO-2-like:
more memory, one all-gather per step less).

Precision: parameters stay fp32 (no ``MixedPrecisionPolicy.param_dtype``) and ``torch.autocast``
picks per-op precision, so InstanceNorm affine weights are never rounded to bf16 and the
gradient reduce-scatter is fp32. This doubles all-gather bytes compared to bf16 params; for
L/H on NVLink that traffic overlaps with compute (the README's Capacity planning: gradient traffic model).

Checkpoints: ``torch.distributed.checkpoint`` (DCP) of model + optimizer state. DCP reshards on
load, so a run saved on 2 ranks resumes on 1 or 3 with exact SGD momentum (tests/test_train_distributed.py
checks 2 -> 1 and 1 -> 2 ranks).
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .backend import Backend, make_sgd, param_groups


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDP2Backend(Backend):
    name = "fsdp2"
    sharded_forward = True
    native_format = "dcp"

    def __init__(self, module, cfg, env, grad_accumulation):
        super().__init__(module, cfg, env, grad_accumulation)
        module.to(self.device)
        mesh = init_device_mesh(self.device.type, (env.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        reshard = cfg.distributed.fsdp_reshard_after_forward
        for block in module.checkpoint_units("block"):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        self.model = module
        groups, self.lr_scales = param_groups(module, cfg.optim.lr, cfg.optim.backbone_lr_scale)
        self.optimizer = make_sgd(groups, cfg.optim)

    def after_eval(self):
        # After a no_grad forward the root's params stay unsharded plain Parameters, which the
        # optimizer and DCP would not recognise (fully_shard leaves the root unsharded after forward); shard them again.
        self.model.reshard()

    def backward(self, loss):
        # Gradients are reduce-scattered after every micro-batch and accumulate sharded, so
        # accumulation costs communication, not a full unsharded gradient copy.
        (loss / self.grad_accumulation).backward()

    def step(self):
        return self._clip_and_step(self.model.parameters())

    # ---- checkpoints ------------------------------------------------------------------------

    def save_native(self, directory):
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=directory)

    def load_native(self, directory):
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(self.model, self.optimizer)  # also creates momentum buffers
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def iter_full_state(self, wanted):
        for name, p in self.model.named_parameters():
            full = _full(p.detach()).float().cpu()  # collective: every rank runs it
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            mom = None if buf is None else _full(buf.detach()).float().cpu()
            if name in wanted:
                yield name, full, mom

    @torch.no_grad()
    def load_params(self, get_param):
        # Every rank has the full tensor: cut its own shard locally (src_data_rank=None: no
        # scatter from rank 0) and copy it into the existing shard, which the optimizer holds.
        for name, p in self.model.named_parameters():
            value = get_param(name).to(self.device, p.dtype).reshape(p.shape)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local())
            else:
                p.copy_(value)

    def load_momentum(self, get_momentum):
        for name, p in self.model.named_parameters():
            value = get_momentum(name)
            if value is None:
                continue
            value = value.to(self.device, torch.float32).reshape(p.shape)
            if isinstance(p, DTensor):
                value = distribute_tensor(value, p.device_mesh, p.placements)
            self.optimizer.state[p]["momentum_buffer"] = value
