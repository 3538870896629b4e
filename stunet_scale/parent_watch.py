"""A process that ends, without writing anything more, when the parent it depends on dies.

A daemon thread compares ``os.getppid()`` with the parent recorded at start-up, every ``POLL_S``
seconds. When a parent exits, the kernel re-parents its children at once (to init or the nearest
subreaper), so a changed ppid is proof the parent is gone. The thread then logs one line and calls
``os._exit``: no file, metrics row or MLflow call runs after it. Code about to publish something
(a checkpoint commit) checks the same condition first with ``exit_if_parent_gone``.

Users: training ranks under torchrun / accelerate (parallel/launcher_watch.py decides which
launcher to watch) and the worker processes of ``prepare``'s pool (``exit_with_parent``). One watch
per process: the first start wins.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

POLL_S = 0.5
EXIT_PARENT_GONE = 1  # nobody is left to read it; 1 = "failed", as for any uncaught error


@dataclass(frozen=True)
class WatchedParent:
    pid: int
    name: str  # what the parent is, for the log line: "torchrun", "stunet-scale prepare"
    role: str  # what the parent is to this process: "launcher", "parent"
    me: str  # what this process is: "rank process", "worker process"


_watched: WatchedParent | None = None
_started = False


def watched_parent() -> WatchedParent | None:
    return _watched


def parent_gone() -> bool:
    return _watched is not None and os.getppid() != _watched.pid


def exit_if_parent_gone(what: str = "") -> None:
    """End this process now if its watched parent died (call right before publishing anything)."""
    if parent_gone():
        _exit(what)


def _exit(what: str) -> None:
    w = _watched
    msg = (f"{w.me} {os.getpid()}: its {w.role} ({w.name}, pid {w.pid}) is gone (parent is now {os.getppid()}); "
           f"exiting without writing{' (' + what + ')' if what else ''}\n")
    try:  # stderr may be a pipe nobody reads any more
        sys.stderr.write(msg)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(EXIT_PARENT_GONE)


def _watch_loop() -> None:
    stop = threading.Event()
    while not stop.wait(POLL_S):
        if parent_gone():
            _exit(f"noticed by the {_watched.role} watch")


def start_parent_watch(parent: WatchedParent | None, thread_name: str = "parent-watch") -> bool:
    """Once per process: the first call decides what is watched (``parent``; None: nothing) and
    starts the watch thread. True if this call decided; later calls change nothing."""
    global _watched, _started
    if _started:
        return False
    _started = True
    if parent is not None:
        _watched = parent
        threading.Thread(target=_watch_loop, name=thread_name, daemon=True).start()
    return True


def exit_with_parent(name: str) -> None:
    """End this process (without writing) when its parent dies: for pool workers, e.g. `prepare`'s.

    A ProcessPoolExecutor worker holds its own ends of the pool's pipes, so a SIGKILLed parent
    never gives it EOF: it would sleep forever, or finish the case it was on while a rerun of
    `prepare` writes the same outputs. ``name`` goes into the log line.
    """
    start_parent_watch(WatchedParent(os.getppid(), name, role="parent", me="worker process"))
