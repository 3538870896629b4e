"""One job per run dir: an exclusive, renewed lease file ``<run_dir>/LEASE`` held by rank 0.

Two jobs on one run dir (a requeued job starting while the old one is still alive, a copy-pasted
command) used to both run: each save moved the other's checkpoint aside, the second removed the
first's save in progress as "unfinished", and the first crashed. So before a job touches its run
dir (run files, checkpoint clean-up, MLflow), rank 0 takes the lease; every rank learns the verdict
through one broadcast, and a refused job exits 2 on all ranks, naming the holder and the override.

Primitive, and why (the run dir usually lives on NFS v3/v4 or Lustre):

* **Taking it: ``link(2)`` of a private, fully written file to ``LEASE``.** ``link`` fails with
  EEXIST when the name exists, atomically on the server, on every NFS version and on Lustre (the
  MDS serialises it). ``open(O_CREAT|O_EXCL)`` is atomic only from NFSv3 on (open(2) NOTES), and an
  exclusively created file is empty until we write it, so a reader could see a holder with no
  name. NFS may retransmit a LINK whose reply was lost and answer EEXIST to our own success; the
  private file's link count (2 = the link exists) settles it, the classic ``lockfile`` recipe.
* **Not ``fcntl``/``flock``.** POSIX locks on NFSv3 need the separate NLM/lockd service (often off
  or firewalled on clusters; ``nolock`` mounts make them node-local without an error); NFSv4 locks
  are leases that a client silently loses after a network partition; Linux emulates ``flock`` on
  NFS with byte-range locks; Lustre honours neither unless mounted with ``-o flock``
  (``localflock`` makes them node-local, again without an error). A lock that may silently be
  per-node is no lock for jobs on different nodes, so the file is the lock.
* **Renewing it: write a new copy, ``rename(2)`` it over ``LEASE``** (atomic: a reader sees the old
  or the new file, never half of one), after checking the token in ``LEASE`` is still ours. Each
  renewal also counts up ``renewals`` (shown in messages).
* **Deciding a lease is stale without trusting clocks.** Nodes' wall clocks may disagree, and the
  holder's ``since`` is informational only. The age of a lease is the difference of two mtimes on
  the run dir's own filesystem: ``LEASE`` (last renewal) and a probe file we write right now. On NFS
  the server stamps both with its clock on WRITE, so client clock skew cancels out; on Lustre each
  writing client stamps its own time, so ``lease.stale_after_s`` (default 300 s, renewals every
  30 s) must stay well above the cluster's NTP skew (normally milliseconds). ``LEASE`` is stat'ed
  through an open file, because NFS revalidates attributes at open (close-to-open consistency)
  while a plain ``stat`` may answer from the attribute cache (``acregmax``, 60 s by default); the
  config check keeps ``stale_after_s`` >= 3 renewal intervals for the same reason.

A lease is **taken over** (with a WARNING naming the old holder) when its holder is provably gone:

1. same host (hostname, boot id and pid namespace all equal) and its pid is gone or now belongs to
   a process started at another time (pid reuse);
2. not renewed for more than ``lease.stale_after_s`` by the filesystem's clock;
3. the same Slurm job id with another ``SLURM_RESTART_COUNT``: a requeued job replaces its own
   earlier incarnation, which Slurm killed before requeueing (two steps of one allocation, same
   count, are two live jobs and get the other rules like any other pair);
4. the holder's Slurm job (another job id) is no longer running by ``squeue`` (chain mode's
   follow-up job after a hard kill at the time limit; any job after its predecessor was cancelled);
   without ``squeue``, or when it does not answer, this rule is skipped;
5. ``lease.take_over=true``: the operator says the holder is dead (e.g. its node is down and you
   do not want to wait ``stale_after_s``).

Taking over renames the old ``LEASE`` aside (one taker wins that rename) and then links a new one
as above, so two jobs taking over at once still end with one holder. A holder that finds another
job's token in ``LEASE`` at a renewal has been taken over: it logs an ERROR and ends the process
at once without writing (``on_lost``), because two writers are what the lease exists to prevent.
The lease is released (removed, if still ours) at every exit the trainer controls; a killed job
leaves it behind, and rules 1-3 let the next job in.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import ConfigError

log = logging.getLogger("stunet_scale.train")

LEASE_FILE = "LEASE"
OVERRIDE_KEY = "lease.take_over=true"


class LeaseHeld(ConfigError):
    """Another live job holds the run dir's lease (exit 2, like every configuration refusal)."""


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22); None if no such process."""
    raw = _read_text(f"/proc/{pid}/stat")
    if not raw:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing ')'
    return int(raw.rsplit(")", 1)[1].split()[19])


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass
class Holder:
    """Who holds a lease: what the refusal message shows and what the takeover rules compare."""

    host: str
    pid: int
    pid_start: int | None
    boot_id: str  # with pid_ns: "same host" means pids are comparable (containers may share a hostname)
    pid_ns: str
    slurm_job_id: str | None
    slurm_restart_count: str | None
    since: float  # wall clock of the holder's host: shown to people, never compared
    token: str
    renewals: int = 0
    command: str = field(default="")

    @classmethod
    def this_process(cls, environ=None) -> Holder:
        env = os.environ if environ is None else environ
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_start=process_start_ticks(os.getpid()),
                   boot_id=_read_text("/proc/sys/kernel/random/boot_id"), pid_ns=_pid_namespace(),
                   slurm_job_id=env.get("SLURM_JOB_ID") or None, slurm_restart_count=env.get("SLURM_RESTART_COUNT") or None,
                   since=time.time(), token=uuid.uuid4().hex, command=" ".join(sys.argv)[:500])

    @classmethod
    def from_json(cls, text: str) -> Holder:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        job = "no Slurm job"
        if self.slurm_job_id:
            job = f"Slurm job {self.slurm_job_id}"
            if self.slurm_restart_count:
                job += f" (restart {self.slurm_restart_count})"
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since))
        return f"host {self.host}, pid {self.pid}, {job}, since {since}, {self.renewals} renewal(s)"

    def same_host(self, other: Holder) -> bool:
        return (self.host == other.host and self.boot_id == other.boot_id and self.pid_ns == other.pid_ns
                and bool(self.boot_id))


# squeue states in which a job's processes may still run (everything else has ended them)
SLURM_LIVE_STATES = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING",
                     "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


def slurm_job_state(job_id: str) -> str | None:
    """squeue's state of a job ('' = no longer listed: long finished); None when squeue cannot tell."""
    import shutil
    import subprocess

    if not shutil.which("squeue") or not job_id.isdigit():
        return None
    try:
        done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        # squeue exits 1 with "Invalid job id specified" for a job that has left its memory
        return "" if "Invalid job id" in done.stderr else None
    states = done.stdout.split()
    return states[0] if states else ""


def pid_is_gone(holder: Holder) -> bool:
    """On the holder's own host: True if its process no longer exists (a reused pid counts as gone)."""
    start = process_start_ticks(holder.pid)
    if start is None:
        return True
    return holder.pid_start is not None and start != holder.pid_start


class RunLease:
    """The lease on one run dir, held by this process once ``acquire()`` returned."""

    def __init__(self, run_dir: str | Path, renew_every_s: float = 30, stale_after_s: float = 300,
                 take_over: bool = False, me: Holder | None = None, on_lost: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEASE_FILE
        self.renew_every_s = renew_every_s
        self.stale_after_s = stale_after_s
        self.take_over = take_over
        self.me = me or Holder.this_process()
        self.on_lost = on_lost or _exit_without_writing
        self.held = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # renewal thread vs release()
        self._thread: threading.Thread | None = None

    # ---- taking it ----------------------------------------------------------------------------

    def acquire(self) -> str | None:
        """Take the lease; returns the takeover reason (None for a free run dir). Raises LeaseHeld."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a few rounds: the holder may release or another taker win in between
            if self._link_new():
                self.held = True
                return None
            current = self._read()
            if current is None:  # released (or renamed aside) between our link and our read: try again
                continue
            reason = self._takeover_reason(current)
            if reason is None:
                raise LeaseHeld(self._refusal(current))
            if self._move_aside(current) and self._link_new():
                log.warning("run dir %s: took over the lease of %s: %s", self.run_dir, current.describe(), reason)
                self.held = True
                return reason
        raise LeaseHeld(f"run dir {self.run_dir}: could not take {self.path} after 5 attempts (other jobs are "
                        "taking it at the same time); start one job per run dir")

    def _takeover_reason(self, current: Holder) -> str | None:
        if current.token == self.me.token:
            return "it is this process's own lease"
        if (current.slurm_job_id and current.slurm_job_id == self.me.slurm_job_id
                and (current.slurm_restart_count or "0") != (self.me.slurm_restart_count or "0")):
            # Slurm kills every step of a job before requeueing it; two steps of one allocation
            # (same restart count) are two live jobs and fall through to the rules below.
            return (f"same Slurm job {current.slurm_job_id}, requeued (SLURM_RESTART_COUNT "
                    f"{current.slurm_restart_count or 0} -> {self.me.slurm_restart_count or 0})")
        if current.same_host(self.me) and pid_is_gone(current):
            return f"its process {current.pid} on this host ({current.host}) is gone"
        if current.slurm_job_id and current.slurm_job_id != self.me.slurm_job_id:
            state = slurm_job_state(current.slurm_job_id)
            if state is not None and state not in SLURM_LIVE_STATES:
                return f"its Slurm job {current.slurm_job_id} is no longer running (squeue: {state or 'not listed'})"
        age = self._age_s()
        if age is not None and age > self.stale_after_s:
            return (f"not renewed for {age:.0f} s (lease.stale_after_s={self.stale_after_s:g}; "
                    "measured by file mtimes on the run dir's filesystem)")
        if self.take_over:
            return f"{OVERRIDE_KEY} was given"
        return None

    def _refusal(self, current: Holder) -> str:
        age = self._age_s()
        renewed = f"last renewed {age:.0f} s ago" if age is not None else "renewal age unknown"
        return (f"run dir {self.run_dir} is in use by another job ({current.describe()}; {renewed}; "
                f"command: {current.command or '?'}). Two jobs on one run dir overwrite each other's checkpoints, "
                f"so this job stops. Wait for that job to end, use another run_dir, or, if that job is dead "
                f"(e.g. its node is down), take over with {OVERRIDE_KEY} (the lease also becomes free "
                f"{self.stale_after_s:g} s after its last renewal, lease.stale_after_s). Lease file: {self.path}")

    def _link_new(self) -> bool:
        """Create LEASE from a private, complete file with link(2); True if it is ours now."""
        private = self._write_private(self.me)
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            # a retransmitted NFS LINK may report EEXIST for our own success: the link count knows
            return os.stat(private).st_nlink == 2
        finally:
            os.unlink(private)

    def _move_aside(self, current: Holder) -> bool:
        """Rename the stale LEASE aside; only one taker's rename succeeds. True if we moved *that* lease."""
        aside = self.run_dir / f"{LEASE_FILE}.stale-{current.token[:12]}-{self.me.token[:12]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another taker moved it first; the next round sees its lease
        moved = self._read(aside)
        if moved is None or moved.token != current.token:
            # between our read and our rename someone else's (live) lease replaced it: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    # ---- while held ---------------------------------------------------------------------------

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="run-lease-renewal", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except OSError as e:  # a transient filesystem error: the next renewal may succeed
                log.warning("could not renew the run-dir lease %s: %s", self.path, e)

    def renew(self) -> None:
        with self._lock:
            if not self.held:
                return
            try:
                current = self._read()
            except LeaseHeld:  # overwritten with something that is not a lease: not ours any more
                current = None
            if current is None or current.token != self.me.token:
                self.held = False
                taker = current.describe() if current else "nobody (the file is gone)"
                msg = (f"the lease on run dir {self.run_dir} was taken over by {taker}; this job stops now without "
                       "writing so that only one job writes the run dir")
                log.error("%s", msg)
                self.on_lost(msg)
                return
            self.me.renewals += 1
            private = self._write_private(self.me)
            os.rename(private, self.path)

    def release(self) -> None:
        """Stop renewing and remove LEASE if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if not self.held:
                return
            self.held = False
            current = self._read()
            if current is not None and current.token == self.me.token:
                self.path.unlink(missing_ok=True)

    # ---- files --------------------------------------------------------------------------------

    def _write_private(self, holder: Holder) -> Path:
        private = self.run_dir / f".{LEASE_FILE}.{holder.host}.{holder.pid}.{uuid.uuid4().hex[:8]}"
        with open(private, "w") as f:
            f.write(json.dumps(asdict(holder), indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())  # complete on the server before anyone can see it as LEASE
        return private

    def _read(self, path: Path | None = None) -> Holder | None:
        try:
            return Holder.from_json((path or self.path).read_text())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            # Not written by us (link/rename publish only complete files): do not guess, refuse with its path.
            raise LeaseHeld(f"run dir {self.run_dir}: {path or self.path} is not a lease this toolkit wrote ({e}); "
                            f"remove it if no job uses this run dir") from None

    def _age_s(self) -> float | None:
        """Seconds since LEASE was last written, both ends stamped by the run dir's filesystem."""
        probe = self.run_dir / f".{LEASE_FILE}.clock.{self.me.token[:12]}"
        try:
            probe.write_text("")
            now = probe.stat().st_mtime
            # fstat of an open file: NFS revalidates attributes at open (close-to-open), while a
            # plain stat may answer from the attribute cache (up to acregmax, 60 s by default)
            with open(self.path) as f:
                return now - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        finally:
            probe.unlink(missing_ok=True)


def _exit_without_writing(message: str) -> None:
    """Default on_lost: end this rank at once; the launcher tears down the other ranks."""
    from .exit_codes import EXIT_CONFIG

    logging.shutdown()
    os._exit(EXIT_CONFIG)


# --------------------------------------------------------------------------------------------
# the trainer's side: rank 0 holds it, every rank learns the verdict
# --------------------------------------------------------------------------------------------

_held: RunLease | None = None  # the lease this process holds; release_held() ends it on every exit path


def hold_run_lease(run_dir: Path, lease_cfg, env) -> None:
    """Rank 0 takes the run dir's lease; a refusal raises LeaseHeld (exit 2) on every rank.

    Collective (one broadcast), so all ranks leave start-up the same way, through the normal
    ConfigError path, before any of them writes to the run dir.
    """
    global _held
    refusal = None
    if env.is_main:
        lease = RunLease(run_dir, lease_cfg.renew_every_s, lease_cfg.stale_after_s, lease_cfg.take_over)
        try:
            lease.acquire()
            lease.start_renewing()
            _held = lease
        except LeaseHeld as e:
            refusal = str(e)
        except OSError as e:  # e.g. a read-only or missing parent: every rank must hear it, not wait
            refusal = f"run_dir={str(run_dir)!r}: cannot take the run-dir lease {run_dir / LEASE_FILE}: {e}"
    refusal = env.broadcast_object(refusal)
    if refusal is not None:
        raise LeaseHeld(refusal)


def release_held() -> None:
    global _held
    if _held is not None:
        _held.release()
        _held = None
