"""Process-group setup that works under torchrun, accelerate launch, srun, or a plain single process.

The trainer owns its process group instead of delegating it to accelerate or DeepSpeed:

* ``accelerate launch`` is used only as a launcher. It exports torchrun's variables (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and we read them. Creating an ``Accelerator``
  would pull in ``transformers`` for DeepSpeed (accelerate 1.15's ``DeepSpeedPlugin.select()``)
  and, on CPU, silently report every process as "rank 0 of 1".
* Under ``srun`` without a launcher, Slurm's own variables give rank and world size
  (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) and the master is the first node of the job.
* gloo on CPU, nccl on CUDA, always with an explicit timeout (``distributed.timeout_s``) so a dead
  or hung peer turns into an exception instead of a job that waits forever.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    """Who this process is. ``world_size == 1`` means no process group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: str = "single"  # single | torchrun | accelerate | slurm
    backend: str | None = None  # gloo | nccl | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    # ---- small collectives used by the loop (all no-ops in one process) -----------------------

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def all_reduce(self, values: list[float], op: str = "max") -> list[float]:
        """All-reduce a short list of floats (MAX, MIN or SUM) in one collective."""
        if not self.initialized:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.collective_device)
        reduce_op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op]
        dist.all_reduce(t, op=reduce_op)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (the collective decision primitive)."""
        return self.all_reduce([1.0 if flag else 0.0], "max")[0] > 0

    def any_tensor(self, flag: torch.Tensor) -> bool:
        """``any`` for a one-element tensor on this rank's device, e.g. ``~isfinite(loss)``.

        The flag stays on the device into the collective, so the host waits once (reading the
        result) instead of twice (reading the local flag, then the reduced one).
        """
        t = flag.detach().reshape(1).to(self.collective_device, torch.float32)
        if self.initialized:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.initialized:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.collective_device if self.backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.initialized:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def collective_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo only CPU tensors.
        return self.device if self.backend == "nccl" else torch.device("cpu")


def detect_launch_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Rank/world/master from the launcher's environment variables (no side effects).

    torchrun and accelerate set RANK/WORLD_SIZE; srun sets SLURM_* only inside a job step
    (SLURM_STEP_ID), so a plain ``python`` in an ``salloc`` shell stays a single process.
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
        return {
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
            "master_port": int(env.get("MASTER_PORT", 29500)),
            "launcher": launcher,
        }
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    ntasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1)
    if in_step and ntasks > 1 and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": ntasks,
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
            "master_addr": env.get("MASTER_ADDR") or first_host(nodelist),
            # A port derived from the job id keeps two jobs sharing a node from colliding.
            "master_port": int(env.get("MASTER_PORT", 20000 + job % 20000)),
            "launcher": "slurm",
        }
    return {"rank": 0, "world_size": 1, "local_rank": 0, "master_addr": None, "master_port": None, "launcher": "single"}


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: 'gpu[003-005,007],cpu1' -> 'gpu003' (no scontrol needed)."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    lo = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{lo}{suffix}"


def init_distributed(timeout_s: int = 1800, run_dir: str | None = None, need_group: bool = False) -> DistEnv:
    """Create the process group (if more than one process) and pick this rank's device.

    ``need_group``: DeepSpeed and FSDP2 need a process group even in one process; one is created
    on a free local port.
    """
    from .launcher_watch import start_launcher_watch

    start_launcher_watch()  # a rank whose torchrun/accelerate launcher dies exits without writing (see there)
    info = detect_launch_env()
    if info["world_size"] == 1 and need_group and not dist.is_initialized():
        info = {**info, "master_addr": "127.0.0.1", "master_port": free_port()}
    world, rank, local_rank = info["world_size"], info["rank"], info["local_rank"]
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world == 1 and not need_group:
        return DistEnv(0, 1, 0, device, info["launcher"], None)

    os.environ.setdefault("MASTER_ADDR", str(info["master_addr"]))
    os.environ.setdefault("MASTER_PORT", str(info["master_port"]))
    os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = str(rank), str(world), str(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        # torchtitan's defaults: tear down on a timed-out collective and dump the flight recorder
        # (per-rank collective traces), which is how one finds the rank that hung.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "20000")
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        if run_dir:
            os.makedirs(os.path.join(run_dir, "flight_recorder"), exist_ok=True)
            os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", os.path.join(run_dir, "flight_recorder", "rank_"))
    if not dist.is_initialized():
        kwargs = {"device_id": device} if use_cuda else {}
        store = restart_safe_store(rank, world, timeout_s)
        if store is not None:
            kwargs["store"] = store
        else:
            kwargs["init_method"] = "env://"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    global _RAN_MULTI_RANK_GROUP
    _RAN_MULTI_RANK_GROUP = _RAN_MULTI_RANK_GROUP or world > 1
    return DistEnv(rank, world, local_rank, device, info["launcher"], backend)


def restart_safe_store(rank: int, world: int, timeout_s: int):
    """The launcher's rendezvous store, namespaced by restart attempt; None outside torchelastic.

    Why: torchrun (and accelerate, which runs it) keeps one TCPStore for all attempts of
    ``--max-restarts`` and torch's ``env://`` handler adds no per-attempt prefix ("we create a new
    TCPStore for every retry"; it does not). The restarted ranks then read the dead attempt's
    addresses and gloo fails with "connectFullMesh failed ... Connect timeout / Connection refused"
    (NCCL would read a stale unique id). Prefixing the keys with ``TORCHELASTIC_RESTART_COUNT``
    gives every attempt its own namespace (tests/test_reliability_rows.py, row 13).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    # the agent hosts the store when it says so; otherwise rank 0 does, as torch's env:// does
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=datetime.timedelta(seconds=timeout_s),
                          multi_tenant=not agent_store)
    return dist.PrefixStore(f"stunet/attempt_{attempt}", store)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown(env: DistEnv) -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer may already be gone; never mask the real exit code
            pass


_RAN_MULTI_RANK_GROUP = False  # set by init(); read by exit_rank_process()


def exit_rank_process(code: int) -> int:
    """End a rank process that ran a multi-rank group without interpreter finalization.

    Call it after ``shutdown``, with every file closed. gloo's worker threads drop their last
    reference to a finished collective a moment after ``wait()`` returns, and ``destroy_process_group``
    does not join them (gloo has no ``shutdown``). If that reference is a tensor Python already
    let go of, the drop needs the GIL; once Python has begun finalizing, taking it ends the thread
    through a C++ ``noexcept`` frame: "terminate called without an active exception", SIGABRT,
    and torchrun reports a clean run as failed (seen in CI on a 2-rank FSDP2 run; the same race is
    described in pytorch/pytorch#179291). Nothing is left to finalize here, so skip it: flush our
    streams and ``os._exit``. Single-process runs (and in-process callers such as the tests) get
    ``code`` back unchanged.
    """
    if not _RAN_MULTI_RANK_GROUP:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say there
            pass
    os._exit(code)


# A hung rank or pipeline (row 14 of the README's Reliability checks): the step watchdog, or a collective that timed
# out waiting for a hung peer, ends the rank with this code after dumping every thread's stack to
# <run_dir>/hang/rank_NNNNN.txt. 124 is what timeout(1) returns for "ran out of time".
EXIT_HANG = 124


def hang_dump_path(run_dir, rank: int):
    from pathlib import Path

    return Path(run_dir) / "hang" / f"rank_{rank:05d}.txt"


def dump_all_stacks(path, reason: str) -> None:
    """Every thread's Python stack into ``path`` (faulthandler: works while the main thread is stuck)."""
    import faulthandler
    import time as _time
    from pathlib import Path

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(f"{_time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} on {hostname()}: {reason}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
    except OSError as e:  # the run dir's filesystem may be the thing that hangs; stderr still gets it
        print(f"could not write the stack dump to {path}: {e}", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def is_collective_timeout(exc: BaseException) -> bool:
    """gloo/NCCL's error for a collective that waited ``distributed.timeout_s`` for a peer."""
    text = str(exc).lower()
    # not "connection closed by peer": that is a peer that died (exit 1, the launcher restarts it)
    return isinstance(exc, (RuntimeError, dist.DistBackendError)) and ("timed out" in text or "timeout" in text)


class StepWatchdog:
    """Ends the rank when no training step starts for ``timeout_s`` seconds (a hang, not a slow step).

    A collective timeout only fires on a rank that waits *in* a collective; a rank stuck before
    one (a data read that never returns, a deadlocked worker) would hang until the job's wall time.
    The trainer calls ``kick()`` before every step and ``paused()`` around checkpoint saves and
    validation, whose duration is not bounded by a step's. On expiry: every thread's stack to
    ``hang_dump_path``, an ERROR line, ``os._exit(EXIT_HANG)`` (no cleanup: the main thread is stuck).
    """

    def __init__(self, collective_timeout_s: float, run_dir, rank: int, poll_s: float = 1.0, on_hang=None):
        import threading

        self.on_hang = on_hang  # called with the reason before exiting (the trainer ends its MLflow run FAILED)

        # Later than the collective timeout: a rank waiting for a hung peer reports the collective's
        # own error (and exits EXIT_HANG from the trainer); the watchdog is for the rank that hangs.
        self.timeout_s = float(collective_timeout_s) + max(5.0, 0.1 * float(collective_timeout_s))
        self.rank, self.poll_s = rank, poll_s
        self.path = hang_dump_path(run_dir, rank)
        self._last = None  # monotonic time of the last kick; None while paused
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stunet-step-watchdog", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        import time as _time

        self._last = _time.monotonic()

    def pause(self) -> None:
        self._last = None

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        import time as _time

        while not self._stop.wait(self.poll_s):
            last = self._last
            if last is not None and _time.monotonic() - last > self.timeout_s:
                reason = (f"rank {self.rank}: no training step started for {self.timeout_s:.0f} s "
                          f"(distributed.timeout_s plus a margin); the rank or its data pipeline hangs")
                dump_all_stacks(self.path, reason)
                logging.getLogger("stunet_scale.train").error("%s; stacks of all threads in %s; exiting with %d",
                                                              reason, self.path, EXIT_HANG)
                if self.on_hang is not None:
                    try:
                        self.on_hang(reason)
                    except Exception as e:
                        logging.getLogger("stunet_scale.train").warning("on_hang failed: %s", e)
                exit_now(EXIT_HANG)


def exit_now(code: int) -> None:
    """Kill our DataLoader workers, flush logs and streams, then ``os._exit``: for a process whose
    main thread cannot be reached. The workers ignore a SIGTERM while this process lives (see
    data/loader.worker_init) and a hung one never polls for its parent, so SIGKILL them first."""
    import multiprocessing

    for child in multiprocessing.active_children():
        try:
            child.kill()
        except OSError:
            pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def hostname() -> str:
    return socket.gethostname()


# --------------------------------------------------------------------------------------------
# cuDNN sanity for bf16 conv3d (torch 2.9.0 runs it without cuDNN, ~4x slower: pytorch#166122; cuDNN 9.8-9.10 gives
# wrong results: pytorch#163539)
# --------------------------------------------------------------------------------------------

# cuDNN 9.8-9.10 produce silently wrong bf16 conv3d results (pytorch/pytorch#163539).
_BAD_CUDNN = range(90800, 91100)


def check_cudnn_conv3d(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """On CUDA, check that a bf16 conv3d runs through cuDNN; returns a one-line report.

    Raises RuntimeError naming the fix when it does not. torch 2.9.0 routed bf16/fp16 conv3d to a
    vol2col fallback (~4x slower, ~17x memory; pytorch/pytorch#166122); a profiler probe catches that
    and any future regression of the same kind, a version check catches known-bad cuDNN builds.
    """
    if device.type != "cuda":
        return "cuDNN check skipped (no CUDA device)"
    if torch.__version__.startswith("2.9.0"):
        raise RuntimeError("torch 2.9.0 disables cuDNN for bf16 conv3d (~4x slower); install torch >= 2.10")
    if not torch.backends.cudnn.is_available() or not torch.backends.cudnn.enabled:
        raise RuntimeError("cuDNN is not available/enabled; STU-Net conv3d would run on slow fallbacks")
    version = torch.backends.cudnn.version() or 0
    if version in _BAD_CUDNN:
        raise RuntimeError(f"cuDNN {version} gives wrong bf16 conv3d results (pytorch/pytorch#163539); use torch >= 2.10")
    conv = torch.nn.Conv3d(8, 8, 3, padding=1).to(device)
    x = torch.randn(1, 8, 16, 16, 16, device=device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.autocast("cuda", dtype=dtype):
        conv(x).float().sum().backward()
    names = {e.name for e in prof.events()}
    if not any("cudnn_convolution" in n for n in names):
        raise RuntimeError(
            f"{dtype} conv3d did not run on cuDNN (ops seen: {sorted(n for n in names if 'conv' in n)}); "
            "this torch/cuDNN build falls back to slow kernels. Use torch >= 2.10, or set distributed.cudnn_check=warn"
        )
    return f"cuDNN {version}: {dtype} conv3d runs on cuDNN"
