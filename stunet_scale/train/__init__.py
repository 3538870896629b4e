"""`stunet-scale train` / `python -m stunet_scale.train`: the trainer and its exit codes
(``exit_codes.py`` lists them; importing this package is cheap)."""

from .exit_codes import (
    EXIT_CONFIG,
    EXIT_DISK_FULL,
    EXIT_DIVERGED,
    EXIT_HANG,
    EXIT_NO_VALID_CHECKPOINT,
    EXIT_OK,
    EXIT_REQUEUE,
)


def main(argv: list[str] | None = None, data=None) -> int:
    from .__main__ import main as _main

    return _main(argv, data=data)


__all__ = ["EXIT_OK", "EXIT_CONFIG", "EXIT_DIVERGED", "EXIT_NO_VALID_CHECKPOINT", "EXIT_DISK_FULL", "EXIT_REQUEUE", "EXIT_HANG",
           "main"]
