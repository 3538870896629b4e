"""Add a ``portable/`` copy to an old checkpoint of the user's OWN run, reading its pickled native files.

Every save writes ``portable/`` (safetensors) now, and export / ``load_pretrained`` / ``predict``
read nothing else (consolidated.py). A checkpoint written before that has only the backend's native
files: DeepSpeed's ``*_model_states.pt`` / ``*_optim_states.pt`` and DCP's ``.metadata`` are Python
pickles, and unpickling a file runs whatever code it names. This module is the one place outside
``train`` resume that opens them, and only when asked with ``--trust-native``: run it on checkpoints
you wrote yourself, never on one you were sent.

    python -m stunet_scale.checkpointing.trust_native --trust-native RUN_DIR_OR_CHECKPOINT

It writes ``portable/`` next to ``native/`` (parameters, and SGD momentum where the native format
exposes it by name: DCP yes, DeepSpeed's ``zero_to_fp32`` no) and adds the new files to the commit
manifest so the checkpoint still verifies.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..atomic_files import atomic_write_text
from .commit import MANIFEST, CheckpointError, hash_files, list_files
from .consolidated import clean_key, find_checkpoint
from .portable import FORMAT, INDEX, MOMENTUM, PARAM, DCPReader, make_team_readable
from .state import STATE_FILE, TrainerState


def add_portable_copy(path: str | Path, *, trust_native: bool) -> Path:
    """Write ``<checkpoint>/portable/`` from its native files; returns the checkpoint directory.

    ``trust_native`` must be True: it is the caller's statement that the checkpoint is their own
    (the native files are unpickled). A checkpoint that already has ``portable/`` is left as it is.
    """
    if not trust_native:
        raise CheckpointError("add_portable_copy unpickles the checkpoint's native files; call it with "
                              "trust_native=True only for checkpoints of your own runs")
    ckpt = find_checkpoint(path)
    if (ckpt / "portable" / INDEX).is_file():
        return ckpt
    state = TrainerState.from_file(ckpt / STATE_FILE)
    params: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] = {}
    if (ckpt / "native" / ".metadata").is_file():
        reader = DCPReader(ckpt / "native")
        params = {n: reader.param(n) for n in reader.names()}
        for n in reader.names():
            mom = reader.momentum(n)
            if mom is not None:
                momentum[n] = mom
    elif state.backend == "deepspeed" and (ckpt / "native").is_dir():
        params = _deepspeed_fp32(ckpt / "native", ckpt)
    else:
        raise CheckpointError(f"{ckpt}: no native files to convert (backend {state.backend!r}, no native/ "
                              f"DeepSpeed tag dir or DCP .metadata)")
    # Names as the trainer's portable copy has them (no DeepSpeed/DDP/torch.compile prefixes).
    params = {clean_key(n): t for n, t in params.items()}
    momentum = {clean_key(n): t for n, t in momentum.items()}
    _write_single_part(ckpt / "portable", params, momentum)
    # The manifest must list the new files, or the checkpoint no longer verifies as committed.
    manifest = json.loads((ckpt / MANIFEST).read_text())
    new_files = [f for f in list_files(ckpt) if f.startswith("portable/")]
    manifest["files"].update(hash_files(ckpt, new_files))
    atomic_write_text(ckpt / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return ckpt


def _write_single_part(directory: Path, params: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    fname = "rank_00000_part_000.safetensors"
    tensors = {PARAM + n: t.float().contiguous() for n, t in params.items()}
    tensors.update({MOMENTUM + n: t.float().contiguous() for n, t in momentum.items()})
    save_file(tensors, str(directory / fname), metadata={"format": FORMAT})
    make_team_readable(directory / fname)
    index = {"format": FORMAT, "params": {n: fname for n in params}, "momentum": {n: fname for n in momentum},
             "shapes": {n: list(t.shape) for n, t in params.items()}, "order": list(params),
             "converted_from_native": True}
    (directory / INDEX).write_text(json.dumps(index, indent=1))


def _deepspeed_fp32(native: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from DeepSpeed's native ZeRO shards via its ``zero_to_fp32`` (any stage, world size).

    DeepSpeed picks its accelerator when imported; the conversion itself only ``torch.load``s to CPU,
    so it runs the same with ``DS_ACCELERATOR=cpu`` on a machine without a GPU.
    """
    import inspect

    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise CheckpointError(f"{ckpt}: a DeepSpeed checkpoint without a portable/ copy needs deepspeed ({e})") from None
    # The trainer saves under a fixed tag (parallel/deepspeed_engine.py) and writes no "latest" file;
    # a checkpoint saved by plain DeepSpeed has one, which tag=None reads.
    tags = [d.name for d in native.iterdir() if d.is_dir() and any(d.glob("*model_states.pt"))]
    tag = "native" if "native" in tags else (tags[0] if len(tags) == 1 else None)
    kwargs = {}
    if "lazy_mode" in inspect.signature(get_fp32_state_dict_from_zero_checkpoint).parameters:
        kwargs["lazy_mode"] = True  # tensors materialise one by one below instead of all at once
    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(native), tag=tag, **kwargs)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"{ckpt}: DeepSpeed's zero_to_fp32 could not consolidate {native} "
                              f"({type(e).__name__}: {e})") from None
    # lazy entries become real CPU tensors on .contiguous(); real tensors are returned as they are
    return {k: v.contiguous() for k, v in sd.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stunet_scale.checkpointing.trust_native",
        description="Add a safe portable/ (safetensors) copy to a checkpoint of your own run by unpickling its "
                    "native DeepSpeed/DCP files. Never run it on a checkpoint you did not write.")
    parser.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one step_* dir")
    parser.add_argument("--trust-native", action="store_true",
                        help="required: you state the checkpoint is your own (its pickles will be executed)")
    args = parser.parse_args(argv)
    if not args.trust_native:
        print("refusing: this reads the checkpoint's pickled native files, which can run code; add --trust-native "
              "only for checkpoints of your own runs", file=sys.stderr)
        return 2
    try:
        ckpt = add_portable_copy(args.checkpoint, trust_native=True)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    print(f"{ckpt / 'portable'}: written; export, load_pretrained and predict read it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
