"""World-size-independent model state: full fp32 parameters and SGD momentum, by parameter name.

Why our own format: DeepSpeed's ZeRO checkpoints only load at the world size that wrote them, and
its universal-checkpoint converter hard-codes Adam's ``exp_avg``/``exp_avg_sq`` and fails on SGD
momentum (``KeyError: 'exp_avg'`` in ``ds_to_universal.py``). This copy is a set of safetensors files:

    portable/index.json                     {"format", "params": {name: file}, "momentum": {...}, "shapes"}
    portable/rank_00000_part_000.safetensors   param::<name> and momentum::<name> tensors, fp32

Parameters are spread over the ranks by size (greedy largest-first), so each rank holds and writes
about 1/W of the model (2 x fp32 x params / W bytes of host memory at most, in parts of <= 2 GB).
Readers open files lazily (safetensors memory-maps), so loading one tensor costs that tensor.
safetensors holds no pickle: nothing in a checkpoint can execute code when read.

Every save writes this copy, whatever the backend (FSDP2 and DeepSpeed too): it is the only part
of a checkpoint that export, ``load_pretrained`` and ``predict`` read. FSDP2's DCP directory
(``native/``) reshards by itself and ``DCPReader`` gives it the same reading interface, but its
``.metadata`` is a pickle: ``DCPReader`` serves resume of one's own run and the explicit
``trust_native`` conversion only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

FORMAT = "stunet-portable-v1"
INDEX = "index.json"
PART_BYTES = 2 << 30
PARAM, MOMENTUM = "param::", "momentum::"


def make_team_readable(path: Path) -> None:
    """Give a file the mode a plain ``open()`` would: 0666 minus the umask (0644 under the usual 022).

    safetensors' ``save_file`` creates files 0600, which makes a checkpoint or an export on a shared
    filesystem unreadable to the rest of the team; a restrictive umask (077) still wins.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def assign_owners(sizes: Iterable[tuple[str, int]], world_size: int) -> dict[str, int]:
    """Greedy largest-first assignment of tensors to ranks, the same on every rank."""
    load = [0] * world_size
    owner = {}
    for name, numel in sorted(sizes, key=lambda t: (-t[1], t[0])):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += numel
    return owner


def owned_names(backend, env) -> tuple[list[tuple[str, int]], set[str]]:
    """(name, numel) of every parameter in model order, and the names this rank owns."""
    sizes = [(n, p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for n, p in backend.module.named_parameters()]
    owner = assign_owners(sizes, env.world_size)
    return sizes, {n for n, r in owner.items() if r == env.rank}


class NormSums:
    """Sums of squares of parameters and momentum over the tensors one rank owns; ``reduce`` makes them global.

    The same numbers a checkpoint records and a resume logs, so the two can be compared.
    """

    def __init__(self):
        self.sums = [0.0, 0.0]

    def add(self, param: torch.Tensor, mom: torch.Tensor | None) -> None:
        self.sums[0] += float(param.double().pow(2).sum())
        if mom is not None:
            self.sums[1] += float(mom.double().pow(2).sum())

    def reduce(self, env) -> dict:
        total = env.all_reduce(self.sums, "sum")
        return {"param_sq": total[0], "momentum_sq": total[1]}


def state_norms(backend, env) -> dict:
    """Collective: global {"param_sq", "momentum_sq"} of the live model (resume/skip diagnostics)."""
    _, mine = owned_names(backend, env)
    norms = NormSums()
    for _, param, mom in backend.iter_full_state(mine):
        norms.add(param, mom)
    return norms.reduce(env)


def write_portable(backend, directory: Path, env) -> dict:
    """Collective: every rank writes the tensors it owns; rank 0 writes the index.

    Returns global sums of squares {"param_sq", "momentum_sq"} (free by-product; logged so a
    resume can show it restored the same state).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shapes_sizes, mine = owned_names(backend, env)
    part, part_bytes, part_no = {}, 0, 0
    files: dict[str, dict[str, str]] = {"params": {}, "momentum": {}}
    shapes: dict[str, list[int]] = {}
    norms = NormSums()

    def flush():
        nonlocal part, part_bytes, part_no
        if part:
            fname = f"rank_{env.rank:05d}_part_{part_no:03d}.safetensors"
            save_file(part, str(directory / fname), metadata={"format": FORMAT})
            make_team_readable(directory / fname)
            for key in part:
                kind, name = ("params", key[len(PARAM):]) if key.startswith(PARAM) else ("momentum", key[len(MOMENTUM):])
                files[kind][name] = fname
            part, part_bytes, part_no = {}, 0, part_no + 1

    for name, param, mom in backend.iter_full_state(mine):
        shapes[name] = list(param.shape)
        part[PARAM + name] = param.contiguous()
        norms.add(param, mom)
        part_bytes += param.numel() * 4
        if mom is not None:
            part[MOMENTUM + name] = mom.contiguous()
            part_bytes += mom.numel() * 4
        if part_bytes >= PART_BYTES:
            flush()
    flush()
    gathered = env.all_gather_object({"files": files, "shapes": shapes})
    result = norms.reduce(env)
    if env.is_main:
        index = {"format": FORMAT, "params": {}, "momentum": {}, "shapes": {}}
        for g in gathered:
            index["params"].update(g["files"]["params"])
            index["momentum"].update(g["files"]["momentum"])
            index["shapes"].update(g["shapes"])
        order = [n for n, _ in shapes_sizes]
        index["order"] = order
        missing = [n for n in order if n not in index["params"]]
        if missing:
            raise RuntimeError(f"portable checkpoint is missing parameters {missing[:5]}...")
        (directory / INDEX).write_text(json.dumps(index, indent=1))
    return result


class PortableReader:
    """Read a portable directory tensor by tensor (fp32, CPU)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            self.index = json.loads((self.directory / INDEX).read_text())
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{self.directory / INDEX}: not a portable checkpoint ({e})") from None
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{self.directory}: unknown portable format {self.index.get('format')!r}")
        self._handles: dict[str, object] = {}

    def _file(self, fname: str):
        from safetensors import SafetensorError, safe_open

        from .commit import CheckpointError

        if fname not in self._handles:
            path = self.directory / fname
            try:
                self._handles[fname] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({str(e)[:200]}); the checkpoint "
                                      f"is damaged - use an earlier one") from None
        return self._handles[fname]

    def names(self) -> list[str]:
        return list(self.index.get("order") or self.index["params"])

    def param(self, name: str) -> torch.Tensor:
        return self._file(self.index["params"][name]).get_tensor(PARAM + name)

    def momentum(self, name: str) -> torch.Tensor | None:
        fname = self.index["momentum"].get(name)
        return None if fname is None else self._file(fname).get_tensor(MOMENTUM + name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: self.param(n) for n in self.names()}

    def close(self) -> None:
        self._handles.clear()


class DCPReader:
    """The same interface over an FSDP2/DCP checkpoint, in one process and without a GPU.

    Keys inside DCP are ``model.<fqn>`` and ``optim.state.<fqn>.momentum_buffer``; each tensor is
    loaded on demand at full size (DCP reshards to a single "rank").
    """

    def __init__(self, directory: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.directory = Path(directory)
        self.reader = FileSystemReader(str(self.directory))
        self.metadata = self.reader.read_metadata()
        keys = self.metadata.state_dict_metadata
        self._params = [k[len("model."):] for k in keys if k.startswith("model.")]
        self._mom = {k[len("optim.state."):-len(".momentum_buffer")]: k for k in keys
                     if k.startswith("optim.state.") and k.endswith(".momentum_buffer")}

    def names(self) -> list[str]:
        return list(self._params)

    def _load(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        meta = self.metadata.state_dict_metadata[key]
        out = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
        _load_one_process(dcp, out, self.reader)
        return out[key].float()

    def param(self, name: str) -> torch.Tensor:
        return self._load("model." + name)

    def momentum(self, name: str) -> torch.Tensor | None:
        key = self._mom.get(name)
        return None if key is None else self._load(key)

    def state_dict(self) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        out = {}
        for name in self._params:
            meta = self.metadata.state_dict_metadata["model." + name]
            out["model." + name] = torch.empty(meta.size, dtype=meta.properties.dtype)
        _load_one_process(dcp, out, self.reader)
        return {k[len("model."):]: v.float() for k, v in out.items()}

    def close(self) -> None:
        pass


def _load_one_process(dcp, state: dict, reader) -> None:
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        dcp.load(state, storage_reader=reader, no_dist=True)
