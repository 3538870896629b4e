"""What a run reports: MLflow (rank 0), a local JSONL log, the console, and PNG plots.

* MLflow runs on rank 0 only. The default store is ``sqlite:///<run_dir>/mlflow.db`` with
  artifacts in ``<run_dir>/mlartifacts`` (MLflow 3 refuses new file stores; one writer per DB is
  safe on a shared filesystem). ``tracking.mlflow_uri`` or ``$MLFLOW_TRACKING_URI`` selects a
  server instead. A requeued job passes the run id from its checkpoint and continues the same run.
* An unreachable or failing tracking server never stops training: it is probed at start with a
  short socket timeout, every call is guarded, and after repeated failures MLflow is switched off
  with a warning. The JSONL log and the plots in the run directory are always written.
* Console: a tqdm bar on a TTY; otherwise (Slurm .out files) one readable line every N steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("stunet_scale.tracking")

_MAX_FAILURES = 3


def git_revision() -> str | None:
    """HEAD of the checkout this package runs from, with ``-dirty`` for uncommitted tracked changes.

    None outside a git checkout (an installed wheel) or without git. Two subprocesses: callers on
    many ranks compute it once on rank 0 and broadcast it.
    """
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode != 0 or not rev.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def default_tracking_uri(run_dir: Path, configured: str | None) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def probe(uri: str, timeout_s: float = 3.0) -> str | None:
    """None if the tracking URI looks reachable, else why not (http(s) only; local stores pass)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"cannot connect to {parsed.hostname}:{port} ({e.__class__.__name__}: {e})"


class Tracker:
    """MLflow on rank 0, guarded; a no-op everywhere else or when disabled/unreachable.

    Every MLflow call runs on one background thread, fed by a bounded queue: a tracking server that
    accepts connections but never answers blocks that thread, never the training loop, so it cannot
    stall a collective that the other ranks are already waiting in. Only two waits are bounded
    joins: the start (the run id goes into checkpoints; after ``START_TIMEOUT_S`` MLflow is switched
    off) and ``close`` (after ``CLOSE_TIMEOUT_S`` the run's end is abandoned with a warning).
    """

    START_TIMEOUT_S = 30.0
    CLOSE_TIMEOUT_S = 30.0
    MAX_QUEUED = 1000  # then metrics are dropped (counted, one warning) until the server catches up

    def __init__(self, tracking_cfg, run_dir: Path, rank: int, run_id: str | None = None,
                 run_name: str | None = None, params: dict | None = None, tags: dict | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = bool(tracking_cfg.enabled) and rank == 0
        self.run_id: str | None = run_id
        self.client = None
        self._failures = 0
        self._dropped = 0
        self._queue = None
        if not self.enabled:
            return
        self.uri = default_tracking_uri(self.run_dir, tracking_cfg.mlflow_uri)
        problem = probe(self.uri)
        if problem:
            self._disable(f"MLflow tracking server {self.uri} is unreachable: {problem}")
            return
        # A dead server must not hold the worker for minutes of retries (MLflow's default is 7 x 120 s).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import queue
        import threading

        self._queue = queue.Queue()
        self._worker = threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True)
        self._worker.start()
        started = threading.Event()
        failure: list[str] = []

        def start():
            try:
                self._start(tracking_cfg, run_name, params or {}, tags or {})
            except Exception as e:  # tracking must never kill training
                failure.append(f"{e.__class__.__name__}: {e}")
            finally:
                started.set()

        self._queue.put(("start", start))
        if not started.wait(self.START_TIMEOUT_S):
            self._disable(f"MLflow at {self.uri} did not answer within {self.START_TIMEOUT_S:.0f} s")
            self.run_id = run_id
        elif failure:
            self._disable(f"MLflow setup failed for {self.uri}: {failure[0]}")
        if self.enabled:
            _OPEN_TRACKERS.append(self)

    def _drain(self) -> None:
        q = self._queue  # close() drops self._queue while this thread may still be working
        while True:
            what, fn = q.get()
            try:
                if what == "stop":
                    return
                self._call(what, fn)
            finally:
                q.task_done()

    def _call(self, what: str, fn) -> None:
        if what != "start" and (not self.enabled or self.client is None or self.run_id is None):
            return
        try:
            fn()
            self._failures = 0
        except Exception as e:  # any MLflow failure: counted, then MLflow is switched off
            self._failures += 1
            log.warning("MLflow %s failed (%d/%d): %s: %s", what, self._failures, _MAX_FAILURES, e.__class__.__name__, e)
            if self._failures >= _MAX_FAILURES:
                self._disable("MLflow keeps failing")

    def _start(self, tracking_cfg, run_name, params, tags):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=self.uri)
        if self.run_id:
            try:
                self.client.get_run(self.run_id)
                self.client.update_run(self.run_id, status="RUNNING")
                log.info("MLflow: continuing run %s at %s", self.run_id, self.uri)
                return
            except Exception as e:
                log.warning("MLflow run %s from the checkpoint is not in %s (%s); starting a new run", self.run_id, self.uri, e)
                tags = {**tags, "resumed_from_run_id": self.run_id}
        exp = self.client.get_experiment_by_name(tracking_cfg.experiment)
        if exp is None:
            artifact_location = None
            if self.uri.startswith("sqlite:") and tracking_cfg.mlflow_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
                artifact_location = (self.run_dir.resolve() / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(tracking_cfg.experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, tracking_cfg.experiment, self.uri)

    def _disable(self, why: str) -> None:
        log.warning("%s; continuing without MLflow (metrics still go to %s)", why, self.run_dir / "metrics.jsonl")
        self.enabled = False

    def _guard(self, what: str, fn, droppable: bool = False) -> None:
        """Queue one MLflow call for the worker thread; never blocks the caller."""
        if not self.enabled or self._queue is None:
            return
        if droppable and self._queue.qsize() >= self.MAX_QUEUED:
            self._dropped += 1
            if self._dropped == 1:
                log.warning("MLflow at %s is not keeping up (%d calls queued); dropping metrics until it does "
                            "(metrics.jsonl has them all)", self.uri, self._queue.qsize())
            return
        self._queue.put((what, fn))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if items:
            self._guard("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=items), droppable=True)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._guard("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._guard("set_tag", lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)))

    def close(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """End the run as FINISHED, FAILED or KILLED (with ``reason`` as the tag ``end_reason``)."""
        if self in _OPEN_TRACKERS:
            _OPEN_TRACKERS.remove(self)
        if self._queue is None:
            return
        if not self.enabled:  # switched off (e.g. a server that never answered): nothing to wait for
            self._queue.put(("stop", None))
            self._queue = None
            return
        if reason:
            self._guard("set_tag", lambda: self.client.set_tag(self.run_id, "end_reason", reason[:4000]))
        self._guard("close", lambda: self.client.set_terminated(self.run_id, status=status))
        self._queue.put(("stop", None))
        self._worker.join(self.CLOSE_TIMEOUT_S)
        if self._worker.is_alive():
            log.warning("MLflow at %s did not take the run's end (%s) within %.0f s; the run may show RUNNING there",
                        self.uri, status, self.CLOSE_TIMEOUT_S)
        if self._dropped:
            log.warning("MLflow: %d metric batches were dropped while the server lagged (metrics.jsonl has them)",
                        self._dropped)
        self._queue = None


# Trackers whose run is started and not yet ended: any exit path ends them (end_open_runs).
_OPEN_TRACKERS: list[Tracker] = []


def end_open_runs(status: str, reason: str) -> None:
    """Mark every MLflow run this process started and did not end as ``status`` (FAILED | KILLED)."""
    for tracker in list(_OPEN_TRACKERS):
        tracker.close(status, reason)


def _param_value(v) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text if len(text) <= 6000 else text[:5997] + "..."


# --------------------------------------------------------------------------------------------
# local logs and console
# --------------------------------------------------------------------------------------------


class MetricsLog:
    """Append-only JSONL in the run dir (rank 0): the local source of truth for every metric."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled
        self.history: list[dict] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                for line in self.path.read_text().splitlines():
                    try:
                        self.history.append(json.loads(line))
                    except ValueError:
                        continue

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Console:
    """tqdm on a TTY, else one line every ``every`` steps (rank 0 only)."""

    def __init__(self, total: int, start: int, every: int, enabled: bool):
        self.every, self.enabled = every, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=None)

    def update(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % self.every == 0:
                self.bar.set_postfix_str(
                    f"loss {m.get('loss', float('nan')):.4f} lr {m.get('lr', 0):.2e} {m.get('patches_per_s', 0):.1f} p/s"
                )
        elif step % self.every == 0:
            print(format_line(step, m), flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_line(step: int, m: dict) -> str:
    parts = [f"step {step}/{m.get('total_steps', '?')}", f"epoch {m.get('epoch', 0):.2f}"]
    if m.get("skipped"):
        parts.append(f"SKIPPED ({m['skipped']})")
    if "loss" in m:
        avg = f", mean of last {m['loss_n']} {m['loss_avg']:.4f}" if m.get("loss_n", 1) > 1 else ""
        parts.append(f"loss {m['loss']:.4f} (dice {m.get('dice', float('nan')):.3f} ce {m.get('ce', float('nan')):.3f}{avg})")
    parts.append(f"lr {m.get('lr', 0):.2e}")
    if "grad_norm" in m and m["grad_norm"] is not None:
        parts.append(f"gnorm {m['grad_norm']:.2f}")
    parts.append(f"{m.get('patches_per_s', 0):.2f} patches/s")
    if m.get("tflops_per_gpu"):
        parts.append(f"{m['tflops_per_gpu']:.3g} TFLOP/s/gpu")
    parts.append(f"data {100 * m.get('data_wait_frac', 0):.0f}%")
    if m.get("gpu_mem_gib"):
        parts.append(f"mem {m['gpu_mem_gib']:.1f} GiB")
    if m.get("eta_s") is not None:
        parts.append(f"eta {format_duration(m['eta_s'])}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------------------------
# plots (PNG, Agg backend: no display needed)
# --------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    VmHWM, not ``getrusage().ru_maxrss``: Linux carries a parent's high-water mark over exec (a
    vfork'd child shares the parent's address space until it execs), so a process started from a
    large one (pytest, a notebook) would report its parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)  # pyplot keeps every open figure alive; a long run plots hundreds


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists): a per-step loss on batch 2
    swings by its own size, the trend is what a reader wants to see."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_progress(history: list[dict], path: Path) -> Path | None:
    """Loss terms (raw and smoothed) and lr over steps, plus validation Dice if any (nnU-Net's progress.png)."""
    train = [r for r in history if r.get("kind") == "train" and r.get("loss") is not None]
    if not train:
        return None
    plt = _plt()
    val = [r for r in history if r.get("kind") in ("val", "pseudo_dice") and r.get("mean_dice") is not None]
    fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    steps = [r["step"] for r in train]
    loss = [r["loss"] for r in train]
    window = max(min(3, len(train)), len(train) // 20)
    axes[0].plot(steps, loss, lw=0.6, alpha=0.35, color="tab:blue", label="loss (Dice + CE)")
    if all(r.get("loss_avg") is not None for r in train):
        # the trainer's mean over every step since the last log line: smooth even when logging is sparse
        n = max(int(r.get("loss_n") or 1) for r in train)
        axes[0].plot(steps, [r["loss_avg"] for r in train], lw=1.6, color="tab:blue", label=f"loss, mean of the last {n} steps")
    else:
        axes[0].plot(steps, smooth(loss, window), lw=1.6, color="tab:blue", label=f"loss, mean of {window} log points")
    axes[0].plot(steps, smooth([r.get("ce") or 0.0 for r in train], window), lw=0.9, alpha=0.8, color="tab:orange",
                 label="CE (smoothed)")
    axes[0].set_ylabel("training loss")
    ax2 = axes[0].twinx()
    for kind, marker in (("pseudo_dice", "."), ("val", "o")):
        pts = [r for r in val if r["kind"] == kind]
        if pts:
            ax2.plot([r["step"] for r in pts], [r["mean_dice"] for r in pts], marker=marker, ls="-" if kind == "val" else ":",
                     label=f"{'validation' if kind == 'val' else 'pseudo'} Dice", color="tab:green" if kind == "val" else "tab:olive")
    ax2.set_ylabel("mean foreground Dice")
    ax2.set_ylim(0, 1)
    lines = axes[0].get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    axes[0].legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    axes[1].plot(steps, [r.get("lr") for r in train], color="tab:red", lw=0.8)
    axes[1].set_ylabel("learning rate")
    axes[1].set_xlabel("optimizer step")
    _save_figure(plt, fig, path)
    return path


def plot_class_dice(dice: dict[str, float], path: Path, title: str) -> Path | None:
    items = [(k, v) for k, v in dice.items() if v is not None and math.isfinite(v)]
    if not items:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(items) + 2), 4))
    ax.bar(range(len(items)), [v for _, v in items], color="tab:blue")
    ax.set_xticks(range(len(items)))
    ax.set_xticklabels([k for k, _ in items], rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(title, fontsize=9)
    _save_figure(plt, fig, path)
    return path


def plot_preview(image, label, pred, path: Path, title: str, class_names: list[str] | None = None) -> Path:
    """Image, ground truth and prediction on the axial slice with the most labelled voxels
    (numpy arrays [X, Y, Z], RAS), shown radiologically (patient right on the viewer's left,
    anterior up), with a legend of the classes on that slice. Colours follow label values."""
    import numpy as np
    from matplotlib.patches import Patch

    plt = _plt()
    z = int(np.argmax((label > 0).reshape(-1, label.shape[2]).sum(0))) if label.any() else image.shape[2] // 2
    view = lambda a: np.asarray(a[:, :, z]).T[::-1, ::-1]  # noqa: E731 - rows: anterior->posterior, cols: right->left
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    cmap = plt.get_cmap("tab20")
    shown = sorted((set(np.unique(view(label)).tolist()) | set(np.unique(view(pred)).tolist())) - {0})
    for ax, seg, name in zip(axes, (None, label, pred), ("image", "ground truth", "prediction")):
        ax.imshow(view(image), cmap="gray")
        if seg is not None:
            s = view(seg).astype(float)
            ax.imshow(np.ma.masked_where(s == 0, s % 20), cmap=cmap, alpha=0.5, vmin=0, vmax=19, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    names = class_names or []
    handles = [Patch(color=cmap(int(k) % 20), alpha=0.7, label=names[int(k)] if int(k) < len(names) else f"label {int(k)}")
               for k in shown]
    if handles:
        fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
        fig.subplots_adjust(right=0.8)
    fig.suptitle(f"{title} (axial slice {z}, patient right on the left)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
