"""A real single-host Slurm cluster for tests: munged + slurmctld + one slurmd per fake node.

Everything lives in one temporary directory (keys, sockets, state, spool, logs) and uses free
ports, so it neither needs nor touches /etc/slurm, /etc/munge or a system cluster. Nodes are
``n1..nN`` on this host (Debian's slurmd runs several instances with ``-N``), so multi-node
launch logic (head node, SLURM_NODEID, srun fan-out) runs for real.

    cluster = LocalSlurm(tmp_dir, nodes=2)
    cluster.start()                     # raises ClusterUnavailable(reason) if this host can't
    job = cluster.sbatch(["--nodes=2", "script.sh", "arg"], env=...)
    cluster.wait(job, lambda s: s["JobState"] == "COMPLETED")
    cluster.stop()

Also usable by hand: ``python tests/slurm/local_cluster.py /tmp/slurm`` starts a cluster and prints
the ``SLURM_CONF`` to export; Ctrl-C stops it.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun", "sinfo")


class ClusterUnavailable(RuntimeError):
    """This host cannot run a local Slurm cluster; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def unavailable_reason() -> str | None:
    """Why a local cluster cannot be started here (None if it can be tried)."""
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not found); `.ci/run` installs Debian's "
                f"slurm-wlm and munge when it runs as root with apt-get")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root: slurmd starts job steps as the submitting user"
    return None


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2, requeue_delay_s: int = 5):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.requeue_delay_s = max(requeue_delay_s, 5)  # slurmctld rejects cred_expire below 5 s
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60.0) -> None:
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        r = self.root
        for d in ("munge", "state", "log", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o400)
        self.munge_socket = r / "munge" / "munge.socket"
        self._spawn([_which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                     f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                     f"--seed-file={r / 'munge' / 'seed'}"], "munged")
        self._wait_for(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")
        self._write_conf()
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for n in self.nodes:
            self._spawn([_which("slurmd"), "-D", "-f", str(self.conf), "-N", n], f"slurmd-{n}")
        try:
            self._wait_for(self._all_idle, timeout, "nodes did not become idle")
        except ClusterUnavailable:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            if self.conf.exists():
                subprocess.run(["scancel", "--user", getpass.getuser()], env=self.env(), capture_output=True, timeout=10)
        except Exception:
            pass
        for p in reversed(self.procs):  # slurmd first, munged last
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    # ------------------------------------------------------------------ jobs

    def run(self, *args: str, check: bool = True, env: dict | None = None) -> str:
        out = subprocess.run(list(args), capture_output=True, text=True, env=env or self.env(), timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                             env=env or self.env(), cwd=cwd, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once Slurm has forgotten the job)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             env=self.env(), timeout=30)
        if out.returncode != 0:
            return {}
        fields = {}
        for token in out.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, predicate, timeout: float, what: str = "") -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if predicate(info):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id}: {what or 'condition'} not reached in {timeout:.0f} s; last state "
                           f"{info.get('JobState')} {info.get('Reason')}\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # ------------------------------------------------------------------ internals

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                           start_new_session=True))
        log.close()

    def _wait_for(self, condition, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise ClusterUnavailable(f"{', '.join(map(os.path.basename, dead))} exited during start-up:\n{self.log_tail()}")
            if condition():
                return
            time.sleep(0.3)
        raise ClusterUnavailable(f"{message} within {timeout:.0f} s:\n{self.log_tail()}")

    def _all_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env(), timeout=10)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _write_conf(self) -> None:
        r, host, user = self.root, socket.gethostname().split(".")[0], getpass.getuser()
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus_per_node} "
            f"RealMemory=2000 State=UNKNOWN"
            for n in self.nodes
        )
        # cred_expire sets how long a requeued job waits before it is eligible again (default 120 s).
        self.conf.write_text(f"""\
ClusterName=stunet-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.requeue_delay_s}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.%n.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
{node_lines}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")


if __name__ == "__main__":
    import signal

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/stunet-slurm")
    cluster = LocalSlurm(root)
    cluster.start()
    print(f"cluster up: export SLURM_CONF={cluster.conf}   (Ctrl-C or SIGTERM stops it)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the daemons on TERM too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()
