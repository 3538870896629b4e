"""`stunet-scale transfer-study`: does a pretrained export beat training from scratch downstream?

STU-Net's claim (Huang et al. 2023, arXiv 2304.06716: pretraining helps downstream) at small scale, run end to end through the paths downstream
users take:

1. **pretrain** (unless ``--pretrained EXPORT_DIR``): ``demo-data`` -> ``prepare`` -> the trainer on
   ``--pretrain-config`` (default: the quickstart's configs/quickstart.yaml for 1200 steps; its class map and spacing
   decide how the demo set is prepared) -> ``stunet-scale export``;
2. **downstream task**: ``stunet_scale.data.ingest.demo_downstream`` writes an nnU-Net v2 raw dataset (6
   grouped classes, an abdominal field of view, CT or an MR-like modality, a few labelled training
   cases plus held-out validation cases named in nnU-Net's ``splits_final.json``) -> ``prepare``;
3. **fine-tune**: the trainer on ``--config`` (default configs/transfer_study.yaml) with
   ``checkpoint.init_from=<export>``: the architecture is the export's (read from its config.json,
   converted to the trainer's axis order), the head is new (``model.num_classes`` differs, so
   ``seg_outputs.*`` are re-initialised: the run's init_from_report.txt says so), and
   ``optim.backbone_lr_scale`` comes from the config;
4. **from scratch**: the identical command with ``checkpoint.init_from=null``: same steps, seed, data,
   learning rates, validation;
5. **report**: validation Dice on the held-out cases vs step for both runs in one PNG
   (``transfer_curves.png``), and a table (``transfer_table.md`` / ``.json`` / ``.csv``) with the
   final and best Dice of both and their difference, printed as well. With MLflow tracking on, both
   files are also logged as artifacts of the two runs.

Layout of ``--run-dir`` (default runs/transfer_study)::

    pretrain/raw, pretrain/store, pretrain/run, pretrain/export   (step 1; absent with --pretrained)
    downstream/raw, downstream/store                              (step 2)
    finetune/, scratch/                                           (trainer run dirs: metrics.jsonl, ...)
    transfer_curves.png, transfer_table.md, transfer_table.json, transfer_table.csv

Every step is idempotent: a re-run with the same arguments reuses what is done (the trainer resumes
or finds its run finished). Use a new ``--run-dir`` for other settings.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("stunet_scale.transfer_study")

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRETRAIN_CONFIG = "configs/quickstart.yaml"
# The quickstart's recipe for 1200 steps instead of 400: its 400-step model (val Dice 0.48) transferred
# worse than training from scratch, the 1200-step one (0.85) better (README, "Transfer study").
# --pretrain-set values come after these, so schedule.epochs=4 gives back the quickstart's own run.
DEFAULT_PRETRAIN_OVERRIDES = ("schedule.epochs=12",)
DEFAULT_CONFIG = "configs/transfer_study.yaml"
RUNS = ("finetune", "scratch")
LABELS = {"finetune": "fine-tuned from export", "scratch": "from scratch"}
MODEL_KEYS = ("size", "base_width", "blocks_per_stage", "width_multipliers", "in_channels", "pool_strides",
              "kernel_sizes", "deep_supervision")


class StudyError(RuntimeError):
    """A step of the study failed; the message names it (and the run dir to look at)."""


@dataclass
class StudyOptions:
    run_dir: Path = Path("runs/transfer_study")
    pretrained: Path | None = None  # an export dir (or any file init_from accepts); None = pretrain here
    pretrain_config: str = DEFAULT_PRETRAIN_CONFIG
    pretrain_overrides: list[str] = field(default_factory=lambda: list(DEFAULT_PRETRAIN_OVERRIDES))
    pretrain_cases: int = 8  # demo TotalSegmentator phantoms (as the quickstart)
    config: str = DEFAULT_CONFIG  # fine-tune config, used for both runs
    overrides: list[str] = field(default_factory=list)  # for both runs
    steps: int = 200  # optimizer steps of each run
    val_every: int = 20  # steps between validations (one epoch)
    train_cases: int = 3
    val_cases: int = 4
    modality: str = "ct"
    data_seed: int = 0
    seed: int = 0


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _config_path(name: str) -> str:
    """A config given as configs/x.yaml works from any directory (falls back to the repo's configs/)."""
    p = Path(name)
    if p.is_file():
        return str(p)
    alt = REPO_CONFIGS / p.name if p.parts[:1] == ("configs",) or len(p.parts) == 1 else None
    if alt is not None and alt.is_file():
        return str(alt)
    raise StudyError(f"config {name} not found")


def _ov(key: str, value) -> str:
    """A dotted override whose value YAML reads back exactly (lists and null as JSON)."""
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def nnunet_ds_weights(n: int) -> list[float]:
    """nnU-Net's deep-supervision weights for ``n`` outputs: 1/2^i, the lowest resolution zeroed, normalised."""
    w = [1 / 2**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


def _train(argv: list[str], what: str) -> float:
    from .train import EXIT_OK
    from .train import main as train_main

    t0 = time.time()
    code = train_main(argv)
    if code != EXIT_OK:
        raise StudyError(f"{what}: the trainer exited with {code} (python -m stunet_scale.train {' '.join(argv)})")
    return time.time() - t0


def export_spec(path: Path):
    """The export's ModelSpec in the trainer's axis order: from its config.json when there is one
    (``EXPORT/hf/config.json`` or ``EXPORT/config.json``), else from the weights file itself."""
    from .export.axes import TRAINING_AXIS_ORDER, convert_spec
    from .export.spec import ModelSpec

    path = Path(path)
    for cand in (path / "hf" / "config.json", path / "config.json"):
        if cand.is_file():
            data = json.loads(cand.read_text())
            if "spec" in data:
                return convert_spec(ModelSpec.from_dict(data["spec"]), TRAINING_AXIS_ORDER), str(cand)
    from .export.checkpoint_io import read_weights

    weights = read_weights(path)
    return convert_spec(weights.spec, TRAINING_AXIS_ORDER), str(weights.path)


def val_curve(run_dir: Path) -> list[dict]:
    """[{step, mean_dice, per_class}] of the run's full validations (metrics.jsonl ``kind: val``), by step;
    per-class keys are the store's label names (the trainer reads them from its manifest)."""
    by_step: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("kind") == "val":
                per_class = dict(r.get("per_class") or {})
                by_step[int(r["step"])] = {"step": int(r["step"]), "mean_dice": r.get("mean_dice"),
                                           "per_class": per_class}
    return [by_step[s] for s in sorted(by_step)]


def init_report(run_dir: Path) -> dict:
    """What checkpoint.init_from did, from the run's init_from_report.txt."""
    path = Path(run_dir) / "init_from_report.txt"
    if not path.is_file():
        return {"present": False}
    text = path.read_text()
    first = text.splitlines()[0] if text else ""
    loaded = int(first.split()[1]) if first.startswith("loaded ") else 0
    skipped = [ln.strip()[len("skipped "):].split(":", 1) for ln in text.splitlines() if ln.strip().startswith("skipped ")]
    heads = [k for k, why in skipped if k.startswith("seg_outputs.") and "head re-initialised" in why]
    return {"present": True, "path": str(path), "loaded_tensors": loaded, "heads_reinitialised": heads,
            "other_skipped": [k for k, _ in skipped if k not in heads], "text": text.strip()}


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _nanfloat(x) -> float:
    return float("nan") if x is None else float(x)


def summarize(curves: dict[str, list[dict]]) -> dict:
    out = {}
    for name, pts in curves.items():
        vals = [(p["step"], _nanfloat(p["mean_dice"])) for p in pts]
        finite = [(s, v) for s, v in vals if not math.isnan(v)]
        best = max(finite, key=lambda sv: sv[1]) if finite else (None, float("nan"))
        out[name] = {"final_step": vals[-1][0] if vals else None, "final_dice": vals[-1][1] if vals else float("nan"),
                     "best_dice": best[1], "best_step": best[0],
                     "final_per_class": pts[-1]["per_class"] if pts else {}}
    return out


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    from .tracking import _plt, _save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, color in zip(RUNS, ("tab:blue", "tab:orange")):
        pts = curves.get(name) or []
        ax.plot([p["step"] for p in pts], [_nanfloat(p["mean_dice"]) for p in pts], marker="o", color=color,
                label=LABELS[name])
    ax.set_xlabel("optimizer step (fine-tuning)")
    ax.set_ylabel("validation mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=9)
    _save_figure(plt, fig, path)
    return path


def table_markdown(result: dict) -> str:
    s, cfg = result["summary"], result["settings"]
    ft, sc = s["finetune"], s["scratch"]
    lines = [
        f"Transfer study: {cfg['downstream']} ({cfg['train_cases']} training / {cfg['val_cases']} validation cases), "
        f"{cfg['steps']} steps each, seed {cfg['seed']}, export {cfg['export']}",
        "",
        "| run | init | steps | final Dice | best Dice (step) | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, init in (("finetune", "export, new head"), ("scratch", "random")):
        r = s[name]
        lines.append(f"| {LABELS[name]} | {init} | {r['final_step']} | {_fmt(r['final_dice'])} | "
                     f"{_fmt(r['best_dice'])} ({r['best_step']}) | {result['wall_s'][name]:.0f} |")
    lines.append(f"| difference (fine-tuned - scratch) | | | {_fmt(result['difference']['final_dice'], 4)} | "
                 f"{_fmt(result['difference']['best_dice'], 4)} | |")
    lines += ["", "Validation Dice vs step:", "", "| step | fine-tuned | scratch | difference |", "|---|---|---|---|"]
    for row in result["curve_rows"]:
        lines.append(f"| {row['step']} | {_fmt(row['finetune'])} | {_fmt(row['scratch'])} | {_fmt(row['difference'])} |")
    classes = list(ft["final_per_class"]) + [c for c in sc["final_per_class"] if c not in ft["final_per_class"]]
    if classes:
        lines += ["", "Final Dice per class:", "", "| class | fine-tuned | scratch |", "|---|---|---|"]
        for c in classes:
            lines.append(f"| {c} | {_fmt(ft['final_per_class'].get(c))} | {_fmt(sc['final_per_class'].get(c))} |")
    init = result["init_from"]
    if init.get("present"):
        lines += ["", f"init_from: loaded {init['loaded_tensors']} tensors from the export, re-initialised "
                      f"{len(init['heads_reinitialised'])} head tensor(s) ({', '.join(init['heads_reinitialised'])})"]
    pre = result.get("pretrain")
    if pre:
        lines.append(f"pretraining: {pre.get('steps')} steps on {pre.get('cases')} demo cases, "
                     f"{pre.get('wall_s', 0):.0f} s; its last validation Dice {_fmt(pre.get('val_dice'))}")
    lines.append(f"total wall time {result['wall_s']['total']:.0f} s")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, run_dir: Path) -> dict[str, Path]:
    paths = {"md": run_dir / "transfer_table.md", "json": run_dir / "transfer_table.json",
             "csv": run_dir / "transfer_table.csv"}
    paths["md"].write_text(table_markdown(result))
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "finetune_dice", "scratch_dice", "difference"])
        for row in result["curve_rows"]:
            w.writerow([row["step"], row["finetune"], row["scratch"], row["difference"]])
    return paths


def _log_to_mlflow(run_dirs: dict[str, Path], files: list[Path]) -> None:
    """Attach the study's files to both runs' MLflow runs (when their config tracks; never fatal)."""
    from .config import load_config
    from .tracking import Tracker

    for name, rd in run_dirs.items():
        try:
            cfg = load_config(rd / "config.yaml")
            if not cfg.tracking.enabled:
                continue
            states = sorted((rd / "checkpoints").glob("step_*/trainer_state.json"))
            run_id = json.loads(states[-1].read_text()).get("mlflow_run_id") if states else None
            if not run_id:
                continue
            tracker = Tracker(cfg.tracking, rd, 0, run_id=run_id)
            for f in files:
                tracker.log_artifact(f, "transfer_study")
            tracker.close("FINISHED")
        except Exception as e:
            log.warning("MLflow: could not log the study's files to %s's run: %s", name, e)


# --------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------


def pretrain(opts: StudyOptions) -> tuple[Path, dict]:
    """demo-data -> prepare -> train (the pretrain config) -> export; returns (export dir, info)."""
    from .config import load_config
    from .data.ingest.demo import write_demo_dataset
    from .data.ingest.prepare import prepare_dataset
    from .export.exporter import export as export_checkpoint

    root = opts.run_dir / "pretrain"
    config = _config_path(opts.pretrain_config)
    cfg = load_config(config, opts.pretrain_overrides)
    t0 = time.time()
    raw = root / "raw"
    if not (raw / "meta.csv").is_file():
        write_demo_dataset(raw, cases=opts.pretrain_cases, seed=0)
    store = root / "store"
    done = prepare_dataset(raw, store, classes=cfg.data.class_map, spacing=tuple(cfg.data.spacing),
                           format="both" if cfg.data.format == "wds" else "zarr")
    if done["exit_code"] != 0:
        raise StudyError(f"prepare {raw} -> {store} failed: {done}")
    run = root / "run"
    _train(["--config", config, f"run_dir={run}", f"data.root={store}", *opts.pretrain_overrides], "pretraining")
    export = root / "export"
    try:
        export_checkpoint(str(run), str(export), None, overwrite=True)  # what `stunet-scale export RUN OUT --overwrite` runs
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise StudyError(f"stunet-scale export {run} {export} failed: {e}") from e
    vals = val_curve(run)
    state = sorted((run / "checkpoints").glob("step_*/trainer_state.json"))
    steps = json.loads(state[-1].read_text()).get("step") if state else None
    return export, {"config": config, "overrides": opts.pretrain_overrides, "cases": opts.pretrain_cases,
                    "steps": steps, "val_dice": vals[-1]["mean_dice"] if vals else None,
                    "wall_s": time.time() - t0, "run_dir": str(run)}


def downstream(opts: StudyOptions, spacing: list[float]) -> tuple[Path, dict]:
    from .data.ingest.demo_downstream import GROUPS, write_downstream_dataset
    from .data.ingest.prepare import prepare_dataset
    from .data.ingest.sources import read_nnunet_splits

    root = opts.run_dir / "downstream"
    raw = write_downstream_dataset(root / "raw", train_cases=opts.train_cases, val_cases=opts.val_cases,
                                   seed=opts.data_seed, modality=opts.modality)
    store = root / "store"
    done = prepare_dataset(raw, store, classes="auto", spacing=tuple(spacing), format="zarr")
    if done["exit_code"] != 0:
        raise StudyError(f"prepare {raw} -> {store} failed: {done}")
    split = read_nnunet_splits(raw)  # prepare put these cases in splits train / val
    return store, {"raw": str(raw), "store": str(store), "classes": ["background", *GROUPS], "split": split}


def finetune_overrides(opts: StudyOptions, spec, store: Path, num_classes: int) -> list[str]:
    """Overrides shared by both runs: the export's architecture (new head), data, budget, seed."""
    from .config import load_config

    base = load_config(_config_path(opts.config), opts.overrides, validate_config=False)
    if opts.val_every < 1 or opts.steps % opts.val_every:
        raise StudyError(f"--steps {opts.steps} must be a positive multiple of --val-every {opts.val_every}")
    model = {k: spec.model[k] for k in MODEL_KEYS if k in spec.model}
    norm = base.data.normalization
    if spec.normalization == "ct" and opts.modality == "ct":
        norm = "ct"
    elif spec.normalization == "zscore":
        norm = "zscore_stored" if spec.crop == "body" else "zscore"
    ov = [_ov(f"model.{k}", v) for k, v in model.items()]
    ov += [
        _ov("model.num_classes", num_classes),
        _ov("loss.deep_supervision_weights", nnunet_ds_weights(len(model["pool_strides"]))),
        f"data.root={store}", "data.class_map=dataset.json",
        _ov("data.spacing", [float(s) for s in spec.spacing]), _ov("data.patch_size", [int(p) for p in spec.patch_size]),
        f"data.normalization={norm}", "data.train_splits=[train]", "data.val_splits=[val]",
        _ov("seed", opts.seed),
        _ov("schedule.samples_per_epoch", opts.val_every * base.schedule.global_batch),
        _ov("schedule.epochs", opts.steps // opts.val_every), "schedule.max_steps=null",
        "validation.enabled=true", "validation.every_epochs=1", "validation.max_cases=null",
        _ov("checkpoint.every_steps", opts.steps),
    ]
    return ov + list(opts.overrides)


def run_study(opts: StudyOptions) -> dict:
    from .data.ingest.demo_downstream import GROUPS
    from .train.__main__ import setup_logging

    setup_logging()
    t_start = time.time()
    opts.run_dir = Path(opts.run_dir)
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    pre_info = None
    if opts.pretrained is None:
        log.info("transfer study: pretraining with %s", opts.pretrain_config)
        export, pre_info = pretrain(opts)
    else:
        export = Path(opts.pretrained)
        if not export.exists():
            raise StudyError(f"--pretrained {export} does not exist")
    spec, spec_source = export_spec(export)
    num_classes = len(GROUPS) + 1
    if spec.num_classes == num_classes:
        log.warning("the export has %d classes like the downstream task: its head is kept, not re-initialised",
                    num_classes)
    store, ds_info = downstream(opts, spec.spacing)
    shared = finetune_overrides(opts, spec, store, num_classes)
    config = _config_path(opts.config)
    wall, curves, run_dirs = {}, {}, {}
    for name in RUNS:
        rd = opts.run_dir / name
        run_dirs[name] = rd
        init = str(Path(export).resolve()) if name == "finetune" else "null"
        argv = ["--config", config, f"run_dir={rd}", *shared, f"checkpoint.init_from={init}"]
        log.info("transfer study: %s run (%s)", name, LABELS[name])
        wall[name] = _train(argv, f"{name} run")
        curves[name] = val_curve(rd)
        if not curves[name]:
            raise StudyError(f"{rd}/metrics.jsonl has no validation record; is validation enabled?")
    init = init_report(run_dirs["finetune"])
    summary = summarize(curves)
    steps = sorted({p["step"] for pts in curves.values() for p in pts})
    at = {n: {p["step"]: _nanfloat(p["mean_dice"]) for p in curves[n]} for n in RUNS}
    rows = []
    for s in steps:
        ft, sc = at["finetune"].get(s, float("nan")), at["scratch"].get(s, float("nan"))
        rows.append({"step": s, "finetune": ft, "scratch": sc, "difference": ft - sc})
    wall["total"] = time.time() - t_start
    result = {
        "settings": {"export": str(export), "export_spec": spec_source, "config": config, "overrides": opts.overrides,
                     "steps": opts.steps, "val_every": opts.val_every, "seed": opts.seed,
                     "train_cases": opts.train_cases, "val_cases": opts.val_cases, "modality": opts.modality,
                     "downstream": f"demo downstream {opts.modality.upper()}, {len(GROUPS)} grouped classes",
                     "shared_overrides": shared},
        "pretrain": pre_info,
        "downstream": ds_info,
        "init_from": init,
        "summary": summary,
        "difference": {"final_dice": summary["finetune"]["final_dice"] - summary["scratch"]["final_dice"],
                       "best_dice": summary["finetune"]["best_dice"] - summary["scratch"]["best_dice"]},
        "curves": curves,
        "curve_rows": rows,
        "wall_s": wall,
        "run_dirs": {k: str(v) for k, v in run_dirs.items()},
    }
    png = plot_curves(curves, opts.run_dir / "transfer_curves.png",
                      f"{result['settings']['downstream']}: {opts.train_cases} labelled training cases, "
                      f"{opts.val_cases} held-out\nexport {'/'.join(Path(export).parts[-3:])}")
    paths = write_outputs(result, opts.run_dir)
    result["files"] = {"png": str(png), **{k: str(v) for k, v in paths.items()}}
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    _log_to_mlflow(run_dirs, [png, paths["md"], paths["json"], paths["csv"]])
    return result


def run_transfer_study_cli(args) -> int:
    import sys

    opts = StudyOptions(
        run_dir=Path(args.run_dir), pretrained=Path(args.pretrained) if args.pretrained else None,
        pretrain_config=args.pretrain_config, pretrain_overrides=[*DEFAULT_PRETRAIN_OVERRIDES, *(args.pretrain_set or [])],
        pretrain_cases=args.pretrain_cases, config=args.config, overrides=list(args.overrides or []),
        steps=args.steps, val_every=args.val_every, train_cases=args.train_cases, val_cases=args.val_cases,
        modality=args.modality, data_seed=args.data_seed, seed=args.seed,
    )
    try:
        result = run_study(opts)
    except StudyError as e:
        print(f"transfer-study: error: {e}", file=sys.stderr)
        return 1
    print(Path(result["files"]["md"]).read_text(), end="")
    print(f"curves: {result['files']['png']}\ntable: {result['files']['md']} (+ .json, .csv)")
    return 0
