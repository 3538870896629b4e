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


def _not_yet(name: str, issue: int):
    def handler(args: argparse.Namespace) -> int:
        print(f"stunet-scale {name}: not available in this build yet (planned in issue #{issue})", file=sys.stderr)
        return EXIT_USAGE

    return handler


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
        # Re-emit a recipe with every key and its help comment, keeping the file's header block.
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
        path.write_text(to_yaml(cfg, comments=True, header="\n".join(header) or None))
        print(f"rewrote {path}")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(to_yaml(cfg, comments=not args.no_comments), end="")
    return 0


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


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="raw TotalSegmentator / nnU-Net dataset -> validated Zarr v3 store + WebDataset shards")
    p.add_argument("source", help="dataset root (TotalSegmentator layout or nnU-Net raw dataset)")
    p.add_argument("out", help="output directory (store.zarr, wds/, manifest.json, quarantine.jsonl)")
    p.add_argument("--layout", choices=["totalseg", "nnunet", "auto"], default="auto")
    p.add_argument("--classes", default="auto", help="class map: totalseg-v1, totalseg-v2, stunet or auto")
    p.add_argument("--spacing", type=float, default=1.5, help="target isotropic spacing in mm")
    p.add_argument("--format", choices=["zarr", "wds", "both"], default="both")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this node")
    p.add_argument("--shard-index", type=int, default=None, help="this slice of the case list (Slurm array task id)")
    p.add_argument("--num-shards", type=int, default=None, help="number of slices the case list is split into")
    p.add_argument("--finalize", action="store_true", help="merge per-slice manifests and check nothing is missing")
    p.set_defaults(func=_not_yet("prepare", 3))


def _add_demo_data(sub) -> None:
    p = sub.add_parser("demo-data", help="write synthetic CT phantoms in the TotalSegmentator layout")
    p.add_argument("out", help="output dataset root")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_not_yet("demo-data", 3))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train STU-Net (DeepSpeed ZeRO / FSDP2 / DDP / one process)")
    p.add_argument("--config", required=False, help="YAML recipe, e.g. configs/pretrain/totalseg_stunet_h.yaml")
    p.add_argument("--dry-run", action="store_true", help="validate the configuration for --world-size ranks and exit")
    p.add_argument("--world-size", type=int, default=None, help="ranks to validate against with --dry-run")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.005")
    p.set_defaults(func=_not_yet("train", 5))


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict per-GPU memory, step time and GPU-hours; recommend a setting")
    p.add_argument("--size", choices=["S", "B", "L", "H"], default="H")
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-mem-gb", type=float, default=80.0)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None)
    p.add_argument("--checkpointing", choices=["block", "stage", "none"], default=None)
    p.add_argument("--offload", choices=["none", "optimizer", "params"], default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_not_yet("plan", 7))


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against nnU-Net / the released STU-Net training step")
    which = p.add_subparsers(dest="bench", metavar="{prepare,data,train}")
    which.required = True
    b = which.add_parser("prepare", help="preprocessing seconds per case and bytes per voxel vs nnU-Net v2")
    b.add_argument("source")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_not_yet("bench prepare", 3))
    b = which.add_parser("data", help="patches/s per core: our CPU path, our CPU augmentation, nnU-Net's transforms")
    b.add_argument("prepared_dir")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_not_yet("bench data", 4))
    b = which.add_parser("train", help="patches/s, TFLOP/s, peak memory of our step vs the released STU-Net step")
    b.add_argument("--size", choices=["S", "B", "L", "H"], default="B")
    b.add_argument("--patch", type=int, default=128)
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_not_yet("bench train", 5))


# --------------------------------------------------------------------------------------------
# downstream
# --------------------------------------------------------------------------------------------


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="checkpoint -> STU-Net .model/.pth, nnU-Net v2 folder, safetensors + card")
    p.add_argument("source", help="run directory or checkpoint")
    p.add_argument("out", help="output directory")
    p.add_argument("--formats", nargs="+", default=None, help="subset of: stunet nnunet safetensors (default all)")
    p.set_defaults(func=_not_yet("export", 6))


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment NIfTI CTs with a checkpoint (sliding window, input geometry kept)")
    p.add_argument("checkpoint")
    p.add_argument("input", help="NIfTI file or folder")
    p.add_argument("output", help="NIfTI file or folder")
    p.set_defaults(func=_not_yet("predict", 6))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stunet-scale",
        description="Pretrain STU-Net foundation models for 3D medical segmentation at cluster scale.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_info, _add_config, _add_demo_data, _add_prepare, _add_train, _add_plan, _add_bench,
                _add_export, _add_predict):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
