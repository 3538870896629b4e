"""Entry point: ``python -m stunet_scale.train --config FILE [section.key=value ...]``.

The same command runs under every launcher::

    python -m stunet_scale.train --config configs/debug.yaml                   # one process
    torchrun --nproc_per_node 8 -m stunet_scale.train --config configs/pretrain/totalseg_stunet_b.yaml
    accelerate launch -m stunet_scale.train --config configs/pretrain/totalseg_stunet_h.yaml
    srun python -m stunet_scale.train --config ...                             # one task per GPU

``stunet-scale train`` is the same (``--dry-run --world-size W`` validates a config for W ranks).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .exit_codes import EXIT_CONFIG


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stunet_scale.train", description="Train STU-Net.")
    p.add_argument("--config", help="YAML recipe, e.g. configs/pretrain/totalseg_stunet_h.yaml")
    p.add_argument("--dry-run", action="store_true", help="validate the configuration for --world-size ranks and exit")
    p.add_argument("--world-size", type=int, default=None, help="ranks to validate against with --dry-run")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.005")
    return p


def setup_logging() -> None:
    """Our messages on stderr with the rank in front: INFO on rank 0, warnings and errors on every rank."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    ours = logging.getLogger("stunet_scale")
    ours.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not any(getattr(h, "_stunet", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._stunet = True
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        ours.addHandler(handler)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "alembic", "mlflow", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed calls torch.distributed collectives that torch has renamed; the warning repeats every step.
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def main(argv: list[str] | None = None, data=None, memory_check=None) -> int:
    """Load and validate the config, then dry-run or train; returns the exit code.

    ``data``: the Trainer's data-source factory (None = the prepared store of ``data.root``); a stand-in
    skips the store checks. ``memory_check``: the planner's lines for ``--dry-run`` (``cli.py`` passes
    ``planning.dry_run_memory_check``; this package does not import the planner).
    """
    from ..config import ConfigError, load_config

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:  # one process, no ranks started: the ranks' validate() for --world-size ranks, then a summary
        from .dry_run import dry_run

        return dry_run(cfg, args.world_size, memory_check=memory_check)
    from ..parallel.distributed import exit_rank_process
    from .loop import run
    from .preflight import validate

    try:
        # Every rank, before the Trainer, any process group, backend or MLflow run exists: the same
        # checks as --dry-run, so a refused config costs seconds and leaves nothing behind.
        validate(cfg, data=data)
        code = run(cfg, data=data, argv=None if argv is None else ["python", "-m", "stunet_scale.train", *argv])
    except ConfigError as e:
        logging.getLogger("stunet_scale.train").error("config error: %s", e)
        code = EXIT_CONFIG
    record_exit_code(code)
    return exit_rank_process(code)  # multi-rank: ends the process here (see its docstring)


def record_exit_code(code: int) -> None:
    """Write a non-zero exit code to ``$STUNET_EXIT_CODE_FILE`` (the first rank to exit wins).

    ``accelerate launch`` and ``torchrun`` exit 1 whenever a worker fails, so the documented codes
    (2 config, 3 diverged, 4 no valid checkpoint, 74 disk full, 75 requeue) do not survive them. A
    wrapper sets the variable, runs the launcher and, if it failed, exits with the file's code
    (slurm/submit_pretrain.sh does; README "Exit codes" shows the two lines for a shell).
    """
    path = os.environ.get("STUNET_EXIT_CODE_FILE")
    if not path or code == 0:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    except OSError as e:
        logging.getLogger("stunet_scale.train").warning("cannot record exit code %d in %s: %s", code, path, e)
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{code}\n")


if __name__ == "__main__":
    sys.exit(main())
