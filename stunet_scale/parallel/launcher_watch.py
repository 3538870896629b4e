"""Rank processes end when their launcher dies, without writing anything more.

torchrun starts its workers in their own sessions (``start_new_session=True`` in torch's
SubprocessHandler), so when torchrun itself is SIGKILLed (the OOM killer, a node agent, ``kill -9``)
nothing reaches them: they used to train on to the end and write checkpoints into a run dir that a
requeued job may already be using. ``accelerate launch`` with several processes runs the same
torchrun code in-process, so it behaves the same.

How a rank notices: the ppid watch of stunet_scale/parent_watch.py, a daemon thread that compares
``os.getppid()`` with the launcher's pid recorded at start-up and ends the process with one log line
and ``os._exit`` — no checkpoint, no metrics row, no MLflow call runs after it. The checkpoint commit
checks the same condition right before it publishes a step (``exit_if_parent_gone``), so a save in
flight at the kill is never committed by a rank that outlived its launcher. This module decides
*which* parent a rank watches, and adds PDEATHSIG under torchrun.

Why not ``prctl(PR_SET_PDEATHSIG)`` alone: the signal fires when the parent *thread* that forked us
exits, not the parent process (prctl(2)), so a launcher that starts workers from a helper thread
would kill healthy ranks when that thread ends; it is also only armed after our own start-up, so a
launcher that died in between is missed; and SIGKILL would give no log line. A ppid check has none
of these problems and costs one system call per poll.

Why PDEATHSIG *as well*, under torchrun only: a thread cannot end a process whose main thread holds
the GIL and never lets go (seen: a rank stuck in gloo's process-group destructor, joining a thread
that waits for the GIL). The kernel's SIGKILL needs no GIL. torchrun (and ``accelerate launch``,
which runs torchrun's agent) starts its workers from the agent's main thread, which lives exactly
as long as the launcher, so the thread caveat does not bite there; it is armed for
``TORCHELASTIC_RUN_ID`` only, and the ppid is checked again right after arming it (prctl(2)'s
recipe for the race with a parent that died before).

Which parent to watch, recorded once at start-up:

* ``TORCHELASTIC_RUN_ID`` (torchrun, and ``accelerate launch`` with several processes) or
  ``LOCAL_RANK`` + ``RANK`` from another launcher (e.g. the ``deepspeed`` CLI): the parent is the
  launcher. Watched.
* The parent is ``slurmstepd`` (``srun python -m stunet_scale.train``): Slurm kills a step's tasks
  itself when the step ends, and a slurmstepd never goes away while its tasks run. Not watched.
* No launcher variables (plain ``python -m stunet_scale.train``, ``nohup ... &`` after the shell
  exits, tests in one process): nothing to watch; the parent may come and go legitimately.

The one blind spot: a launcher that dies between starting this process and the record (a second
or two of Python start-up) makes us record the re-parented ppid. A ppid of 1 cannot be taken as
proof of that: in a container the launcher itself is often pid 1 (``docker run ... torchrun``).
Such a rank then hangs at its first collective until ``distributed.timeout_s`` ends it.
"""

from __future__ import annotations

import os
import sys

from ..parent_watch import WatchedParent, exit_if_parent_gone, start_parent_watch, watched_parent


def _parent_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def launcher_to_watch(environ=None, ppid: int | None = None) -> tuple[int, str] | None:
    """(parent pid, launcher name) if this process runs under a launcher whose death must end it, else None."""
    env = os.environ if environ is None else environ
    ppid = os.getppid() if ppid is None else ppid
    if _parent_name(ppid) == "slurmstepd":
        return None
    if env.get("TORCHELASTIC_RUN_ID"):
        return ppid, "accelerate launch" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
    if "LOCAL_RANK" in env and "RANK" in env:
        return ppid, _parent_name(ppid) or "launcher"
    return None


def _arm_parent_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) on Linux; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def start_launcher_watch(environ=None) -> tuple[int, str] | None:
    """Record the launcher (if any) and start the watch thread once per process; returns what is watched."""
    env = os.environ if environ is None else environ
    target = launcher_to_watch(environ)
    launcher = None if target is None else WatchedParent(*target, role="launcher", me="rank process")
    if start_parent_watch(launcher, "launcher-watch") and launcher is not None:
        if env.get("TORCHELASTIC_RUN_ID") and _arm_parent_death_signal():
            exit_if_parent_gone("found right after arming PR_SET_PDEATHSIG")
    watched = watched_parent()
    return None if watched is None else (watched.pid, watched.name)
