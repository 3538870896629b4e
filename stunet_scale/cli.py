"""`stunet-scale` command line: parse, then call one function. No logic lives here.

Heavy imports (torch, zarr, deepspeed) happen inside the handlers so that ``--help`` is instant.
Exit codes: 0 ok, 1 failure, 2 usage/config error; the trainer adds its own (see
``stunet_scale.train``) so that Slurm scripts can tell "requeue me" from "broken".
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USAGE = 2


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    from .info import format_report, report

    info = report()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="presets (params, FLOPs), class maps and the environment")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_info)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import load_config, to_yaml

    if args.rewrite:
        # Re-emit a recipe with its help comments, keeping the file's header block: every key, or for
        # a file that extends a base (``base: FILE``) the keys it lists plus any that now differ.
        if not args.config:
            print("config --rewrite needs --config FILE", file=sys.stderr)
            return EXIT_USAGE
        path = Path(args.config)
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line[1:].strip())
        cfg = load_config(path, args.overrides, resolve_presets=False)
        base, only = _recipe_base_keys(path, cfg)
        path.write_text(to_yaml(cfg, comments=True, header="\n".join(header) or None, base=base, only=only))
        print(f"rewrote {path}")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(to_yaml(cfg, comments=not args.no_comments), end="")
    return 0


def _recipe_base_keys(path, cfg) -> tuple[str | None, set[str] | None]:
    """For a recipe with ``base: FILE``: that name and the dotted keys the rewrite keeps (the ones
    the file lists and the ones that differ from the base); (None, None) for a self-contained one."""
    from .config import BASE_KEY, TrainConfig, flatten, from_dict, read_config_file, read_yaml

    raw = read_yaml(path)
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return None, None
    base_values = flatten(from_dict(TrainConfig, read_config_file(path.parent / base)))
    listed = set(flatten(raw))
    return base, listed | {k for k, v in flatten(cfg).items() if base_values[k] != v}


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config (YAML + overrides, every default filled in)")
    p.add_argument("--config", help="YAML file (default: built-in defaults)")
    p.add_argument("--no-comments", action="store_true", help="omit the one-line help comments")
    p.add_argument("--rewrite", action="store_true",
                   help="rewrite --config in place listing every key with its comment (recipe maintenance)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.size=H optim.lr=0.005")
    p.set_defaults(func=_config)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _setup_logging() -> None:
    import logging

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def _prepare(args: argparse.Namespace) -> int:
    from .data.ingest.prepare import prepare_dataset
    from .data.ingest.sources import DatasetError

    _setup_logging()
    try:
        result = prepare_dataset(
            args.source, args.out, layout=args.layout, classes=args.classes, spacing=tuple(args.spacing),
            format=args.format, workers=args.workers, threads=args.threads, image_interpolation=args.image_interp,
            label_interpolation=args.label_interp, crop=args.crop, cases_per_shard=args.cases_per_shard,
            shard_index=args.shard_index, num_shards=args.num_shards, finalize=args.finalize,
            max_quarantine_fraction=args.max_quarantine_fraction, verify=args.verify,
            allow_quarantined_eval=args.allow_quarantined_eval,
        )
    except DatasetError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return int(result["exit_code"])


def _workers_arg(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="raw TotalSegmentator / nnU-Net dataset -> validated Zarr v3 store + WebDataset shards")
    p.add_argument("source", help="dataset root (TotalSegmentator layout or nnU-Net raw dataset)")
    p.add_argument("out", help="output directory (store.zarr, wds/, manifest.json, quarantine.jsonl)")
    p.add_argument("--layout", choices=["totalseg", "nnunet", "auto"], default="auto")
    p.add_argument("--classes", default="auto",
                   help="class map: totalseg-v1, totalseg-v2, stunet (STU-Net head order) or auto (from the mask names / dataset.json)")
    p.add_argument("--spacing", type=float, nargs="+", default=[1.5], help="target spacing in mm: one value (isotropic) or three")
    p.add_argument("--format", choices=["zarr", "wds", "both"], default="both")
    p.add_argument("--workers", type=_workers_arg, default=None, metavar="N|auto",
                   help="worker processes on this node (default auto: one per core, at most one per 4 GiB of available "
                        "memory, the peak of a 512x512x1000 case)")
    p.add_argument("--threads", type=int, default=None, help="gunzip threads per worker (default: cores / workers, at most 4)")
    p.add_argument("--image-interp", choices=["cubic", "linear"], default="cubic",
                   help="image resampling: cubic (order-3 spline, nnU-Net) or linear")
    p.add_argument("--label-interp", choices=["linear", "nearest"], default="linear",
                   help="label resampling: linear = nnU-Net's per-label linear (default; class volumes as nnU-Net's), "
                        "or nearest (a little faster, larger volume errors on thin structures)")
    p.add_argument("--crop", choices=["auto", "body", "nonzero", "none"], default="auto",
                   help="crop to: body (CT > -500 HU or labelled), nonzero (nnU-Net), none; auto = body for CT")
    p.add_argument("--cases-per-shard", type=int, default=4, help="cases per WebDataset shard")
    p.add_argument("--shard-index", type=int, default=None, help="this slice of the case list (Slurm array task id)")
    p.add_argument("--num-shards", type=int, default=None, help="number of slices the case list is split into")
    p.add_argument("--finalize", action="store_true", help="merge per-slice manifests and check nothing is missing")
    p.add_argument("--max-quarantine-fraction", type=float, default=0.05,
                   help="exit 1 when more than this fraction of cases is quarantined")
    p.add_argument("--verify", action="store_true", help="re-check finished cases by checksum (not only file sizes)")
    p.add_argument("--allow-quarantined-eval", action="store_true",
                   help="exit 0 even when a val/test case is quarantined (default: exit 1 naming the cases)")
    p.set_defaults(func=_prepare)


def _demo_data(args: argparse.Namespace) -> int:
    from .data.ingest.demo import parse_shape_range, write_demo_dataset

    _setup_logging()
    try:
        shape = parse_shape_range(args.shape) if args.shape else None
    except ValueError as e:
        print(f"demo-data: --shape: {e}", file=sys.stderr)
        return EXIT_USAGE
    out = write_demo_dataset(args.out, cases=args.cases, seed=args.seed, classes=args.classes, shape=shape,
                             spacing=args.spacing)
    print(f"demo dataset ready: {out} ({args.cases} case(s); an unchanged request writes nothing)")
    return 0


def _add_demo_data(sub) -> None:
    p = sub.add_parser("demo-data", help="write synthetic CT phantoms in the TotalSegmentator layout")
    p.add_argument("out", help="output dataset root")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", choices=["totalseg-v2", "totalseg-v1"], default="totalseg-v2",
                   help="mask names and count of the TotalSegmentator release to imitate")
    p.add_argument("--shape", default=None, metavar="X,Y,Z",
                   help="voxels per axis, sizes or LO-HI ranges drawn per case (e.g. 260-300,210-250,240-300 "
                        "for the data benchmark's torso-sized cases), at isotropic --spacing; default: small "
                        "~80-97 voxel cases with mixed spacings")
    p.add_argument("--spacing", type=float, default=1.5, help="isotropic spacing in mm with --shape")
    p.set_defaults(func=_demo_data)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train STU-Net (DeepSpeed ZeRO / FSDP2 / DDP / one process)")
    p.add_argument("--config", required=False, help="YAML recipe, e.g. configs/pretrain/totalseg_stunet_h.yaml")
    p.add_argument("--dry-run", action="store_true", help="validate the configuration for --world-size ranks and exit")
    p.add_argument("--world-size", type=int, default=None, help="ranks to validate against with --dry-run")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.005")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    # One path for training and --dry-run: the trainer's entry point (exit codes: stunet_scale.train).
    from .train.__main__ import main as train_main

    argv = ["--config", args.config] if args.config else []
    memory_check = None
    if args.dry_run:
        from .planning import dry_run_memory_check  # the planner's memory/time lines in the dry-run report

        argv.append("--dry-run")
        memory_check = dry_run_memory_check
    if args.world_size is not None:
        argv += ["--world-size", str(args.world_size)]
    return train_main(argv + list(args.overrides), memory_check=memory_check)


def _plan(args: argparse.Namespace) -> int:
    from .planning import run_plan_cli

    return run_plan_cli(args)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict per-GPU memory, step time and GPU-hours; recommend a setting")
    p.add_argument("--size", choices=["S", "B", "L", "H"], default="H")
    p.add_argument("--patch", type=int, nargs="+", default=[128], help="patch edge, or three edges")
    p.add_argument("--micro-batch", type=int, default=2, help="patches per forward per GPU")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs in total")
    p.add_argument("--gpus-per-node", type=int, default=8, help="above this, gradients cross InfiniBand")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None, help="fix the ZeRO stage (0 = DDP)")
    p.add_argument("--checkpointing", choices=["block", "stage", "none"], default=None, help="fix activation checkpointing")
    p.add_argument("--offload", choices=["none", "optimizer", "params"], default=None, help="fix DeepSpeed CPU offload")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument("--samples", type=int, default=2_000_000, help="patch budget (paper: 4000 epochs x 500 = 2M)")
    p.add_argument("--tflops", type=float, default=None,
                   help="achieved TFLOP/s per GPU (measure with `stunet-scale bench train`); default: a stated A100 estimate")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of the card kept free (context, fragmentation)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_plan)


def _bench_prepare(args: argparse.Namespace) -> int:
    from .bench.prepare import (
        format_full_size_report,
        format_report,
        run_benchmark,
        run_full_size_benchmark,
    )

    _setup_logging()
    if args.full_size:
        try:
            from .data.ingest.demo import parse_shape_range

            shape = [lo for lo, _ in parse_shape_range(args.shape)]
        except ValueError as e:
            print(f"bench prepare: --shape: {e}", file=sys.stderr)
            return EXIT_USAGE
        result = run_full_size_benchmark(shape, spacing=args.spacing, cases=args.cases or 1, data=args.source,
                                         keep=args.keep, nnunet=not args.no_nnunet)
        print(json.dumps(result, indent=2) if args.json else format_full_size_report(result))
        return 0
    if args.source is None:
        print("bench prepare: give a SOURCE dataset, or --full-size to generate full-size cases", file=sys.stderr)
        return EXIT_USAGE
    result = run_benchmark(args.source, cases=args.cases)
    print(json.dumps(result, indent=2) if args.json else format_report(result, per_class=args.per_class))
    return 0


def _bench_data(args: argparse.Namespace) -> int:
    from .bench.data import run_data_bench_cli

    return run_data_bench_cli(args)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against nnU-Net / the released STU-Net training step")
    which = p.add_subparsers(dest="bench", metavar="{prepare,data,train,gpu}")
    which.required = True
    b = which.add_parser("prepare", help="preprocessing seconds per case / per voxel, bytes per voxel and class-volume "
                                         "errors vs nnU-Net v2")
    b.add_argument("source", nargs="?", default=None,
                   help="a TotalSegmentator-layout dataset (e.g. from `stunet-scale demo-data`); with --full-size: where "
                        "the generated full-size cases are kept and reused (default: a temp dir)")
    b.add_argument("--cases", type=int, default=None, help="use the first N cases (default all; --full-size: 1)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--per-class", action="store_true", help="list every class's volume error (default: the 5 worst per case)")
    b.add_argument("--full-size", action="store_true",
                   help="generate real-sized cases (--shape, --spacing, 117 masks) and report seconds per case and peak RSS "
                        "of ours vs nnU-Net's label merge + preprocess")
    b.add_argument("--shape", default="512,512,400", help="--full-size: voxels per axis (e.g. 512,512,1000)")
    b.add_argument("--spacing", type=float, default=0.8, help="--full-size: isotropic source spacing in mm")
    b.add_argument("--no-nnunet", action="store_true", help="--full-size: time ours only (e.g. the memory check at 1000 slices)")
    b.add_argument("--keep", default=None, help="--full-size: keep the outputs in this directory")
    b.set_defaults(func=_bench_prepare)
    b = which.add_parser("data", help="patches/s per core: our CPU path, our CPU augmentation, nnU-Net's transforms")
    b.add_argument("prepared_dir")
    b.add_argument("--json", action="store_true")
    b.add_argument("--patches", type=int, default=40, help="patches timed for our two paths")
    b.add_argument("--nnunet-patches", type=int, default=12, help="patches timed for nnU-Net (up to seconds each)")
    b.add_argument("--patch", type=int, default=128, help="patch edge in voxels")
    b.set_defaults(func=_bench_data)
    b = which.add_parser("train", help="patches/s, TFLOP/s, peak memory of our step vs the released STU-Net step")
    b.add_argument("--size", choices=["S", "B", "L", "H"], default="B")
    b.add_argument("--patch", type=int, default=128)
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--json", action="store_true")
    b.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, allocator)")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    b.add_argument("--num-classes", type=int, default=105)
    b.add_argument("--base-width", type=int, default=None, help="a tiny STU-Net of this width instead of --size (CPU smoke)")
    b.add_argument("--checkpointing", choices=["block", "stage", "none"], default="block", help="our activation checkpointing")
    b.add_argument("--compile", action="store_true", help="our step with torch.compile per block")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    b.set_defaults(func=_bench_train)
    b = which.add_parser("gpu", help="every GPU number (train B/H, planner, augmentation, cuDNN, predict, GPU tests) "
                                     "in one run, each part in its own process under a time cap")
    b.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and per-part logs")
    b.add_argument("--cpu-dry-run", action="store_true",
                   help="the same parts on the CPU with tiny models (checks the plumbing; numbers say nothing about GPUs)")
    b.add_argument("--parts", default=None,
                   help="comma-separated subset of cudnn_probe,train_b,train_h,planner,augment,predict,gpu_tests")
    b.add_argument("--budget-s", type=float, default=480.0,
                   help="seconds for all parts together; split into per-part caps (default 480)")
    b.set_defaults(func=_bench_gpu)


def _bench_train(args: argparse.Namespace) -> int:
    from .bench.train import run

    return run(args)


def _bench_gpu(args: argparse.Namespace) -> int:
    from .bench.gpu import run

    return run(args)


# --------------------------------------------------------------------------------------------
# downstream
# --------------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from .export.exporter import run_export

    return run_export(args)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="checkpoint -> STU-Net .model/.pth, nnU-Net v2 folder, safetensors + card")
    p.add_argument("source", help="run directory or checkpoint; also one of our exports or a released STU-Net file")
    p.add_argument("out", help="output directory (must be empty unless --overwrite)")
    p.add_argument("--formats", nargs="+", default=None, choices=["stunet", "nnunet", "safetensors", "onnx"],
                   help="subset of: stunet (.model + .pth) nnunet (model folder) safetensors (+ config + card) "
                        "onnx (onnx/model.onnx: normalised patch -> logits, dynamic batch, opset 17, checked against "
                        "PyTorch in onnxruntime; needs pip install 'stunet-scale[onnx]'); default: all but onnx")
    p.add_argument("--name", default=None, help="file stem of the .model (default: base_ep4k style from size and epochs)")
    p.add_argument("--nnunet-dataset-id", type=int, default=900, help="DatasetNNN id of the nnU-Net folder (1-999)")
    p.add_argument("--license", default="other", help="license id for the model card's front matter")
    p.add_argument("--manifest", default=None,
                   help="the prepared store's manifest.json (label names, CT statistics) if data.root is not reachable")
    p.add_argument("--validation", default=None, help="JSON with per-class validation Dice for the model card")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--no-verify", action="store_true", help="skip reading every format back for a bit-exact check")
    p.set_defaults(func=_export)


def _predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    return run_predict(args)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment NIfTI CTs with a checkpoint (sliding window, input geometry kept)")
    p.add_argument("checkpoint", help="export folder/file, released STU-Net .model/.pth, or a training run")
    p.add_argument("input", help="NIfTI file or folder (multi-channel models: case_0000.nii.gz, case_0001.nii.gz, ...)")
    p.add_argument("output", help="NIfTI file (one case) or folder")
    p.add_argument("--classes", nargs="+", default=None, help="keep only these classes (names or label values)")
    p.add_argument("--mirror", action="store_true", help="mirroring test-time augmentation (up to 8x slower)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype; auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window stride as a fraction of the patch")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    p.add_argument("--skip-existing", action="store_true", help="do not redo cases whose output exists")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="what runs the network on each batch of windows: torch (any checkpoint) or onnxruntime "
                        "(an export made with --formats onnx, or its .onnx file; fp32; CPU, or CUDA with "
                        "onnxruntime-gpu). Preprocessing, sliding window and postprocessing are the same code")
    p.add_argument("--label-map", default=None, metavar="NAME|MAP.json",
                   help="write another dataset's label ids: a shipped map (btcv, amos22, flare22: TotalSegmentator v1 "
                        "classes -> that dataset's dataset.json ids) or a JSON map; sources listed for one target are "
                        "merged (kidney_left + kidney_right -> kidney); labels.json names the target ids for evaluate")
    p.set_defaults(func=_predict)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import run_evaluate

    return run_evaluate(args)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="per-class Dice, HD95 and NSD of predicted labels against reference masks, "
                                        "paired by class name")
    p.add_argument("prediction", help="label NIfTI (e.g. from `stunet-scale predict`) or a folder of <case>.nii.gz")
    p.add_argument("reference", help="TotalSegmentator case folder (segmentations/<class>.nii.gz) or nnU-Net label "
                                     "NIfTI; for a prediction folder: the dataset root or labelsTr/ folder")
    p.add_argument("--labels", default=None,
                   help="names of the prediction's values: export folder or its config.json, predict's labels.json, "
                        "or a dataset.json (default: the labels.json predict wrote beside the prediction)")
    p.add_argument("--reference-labels", default=None,
                   help="dataset.json naming an nnU-Net reference's values (default: the one beside or above it)")
    p.add_argument("--largest", type=int, default=10, help="also report the mean Dice over this many largest classes present")
    p.add_argument("--out", default=None,
                   help="RESULT.json: per-case, per-class results and the means; also writes RESULT.csv (one row per "
                        "case and class) and RESULT_boxplot.png (per-class box plots over cases)")
    p.add_argument("--goal", type=float, default=None,
                   help="say whether the mean Dice over the --largest classes reaches this value; exit 1 if not")
    p.add_argument("--metrics", nargs="+", choices=["dice", "hd95", "nsd"], default=None,
                   help="metrics to compute (default: all three; dice alone skips the surface distances). "
                        "Empty masks: both empty -> not scored; one empty -> dice 0, nsd 0, hd95 inf")
    p.add_argument("--nsd-tolerance", default=None, metavar="MM|FILE.json",
                   help="normalised surface Dice tolerance in mm for every class (default 2), or a JSON file "
                        "{\"default\": 2.0, \"liver\": 3.0, ...} with one per class name")
    p.add_argument("--workers", type=int, default=1, help="cases evaluated in parallel (processes)")
    p.set_defaults(func=_evaluate)


def _transfer_study(args: argparse.Namespace) -> int:
    from .transfer_study import run_transfer_study_cli

    return run_transfer_study_cli(args)


def _add_transfer_study(sub) -> None:
    from .transfer_study import StudyOptions  # no torch: its defaults are the CLI's

    d = StudyOptions()
    p = sub.add_parser("transfer-study", help="pretrained export vs from scratch on a small downstream task: "
                                              "Dice curves (PNG) and a table")
    p.add_argument("--run-dir", default=str(d.run_dir), help="where everything of the study goes")
    p.add_argument("--pretrained", default=None, metavar="EXPORT_DIR",
                   help="fine-tune this export (`stunet-scale export` output) instead of pretraining one here")
    p.add_argument("--pretrain-config", default=d.pretrain_config,
                   help="pretraining recipe on the demo TotalSegmentator set (default: the quickstart's)")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the pretraining run (repeatable), applied after the study's own "
                        f"{' '.join(d.pretrain_overrides)} (e.g. schedule.epochs=4: the quickstart's 400 steps)")
    p.add_argument("--pretrain-cases", type=int, default=d.pretrain_cases, help="demo phantoms to pretrain on")
    p.add_argument("--config", default=d.config,
                   help="fine-tuning config of both runs (the architecture always comes from the export)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps of each downstream run")
    p.add_argument("--val-every", type=int, default=d.val_every, help="steps between validations (divides --steps)")
    p.add_argument("--train-cases", type=int, default=d.train_cases, help="labelled downstream training cases")
    p.add_argument("--val-cases", type=int, default=d.val_cases, help="held-out downstream validation cases")
    p.add_argument("--modality", choices=["ct", "mr"], default=d.modality,
                   help="downstream images: CT, or an MR-like remapping of the phantoms' tissue contrast")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the downstream phantoms")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of both downstream runs (init, sample plan)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for both downstream runs, e.g. optim.lr=0.01")
    p.set_defaults(func=_transfer_study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stunet-scale",
        description="Pretrain STU-Net foundation models for 3D medical segmentation at cluster scale.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_info, _add_config, _add_demo_data, _add_prepare, _add_train, _add_plan, _add_bench,
                _add_export, _add_predict, _add_evaluate, _add_transfer_study):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        # imported only on error: stunet_scale.config pulls in torch (~3 s), which `prepare` and
        # `demo-data` on CPU-only preprocessing nodes never need
        from .config import ConfigError

        if not isinstance(e, ConfigError):
            raise
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
