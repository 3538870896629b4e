"""The exit codes of `stunet-scale train` / `python -m stunet_scale.train`.

Exit codes (Slurm scripts and wrappers branch on them; importing this module is cheap):

    0   EXIT_OK                    finished (or nothing left to do: the run is complete)
    1   (uncaught exception)       a bug or an environment failure
    2   EXIT_CONFIG                bad configuration; the message names the key to change
    3   EXIT_DIVERGED              skipped steps (non-finite or loss spikes) persisted after a rollback (or nothing to roll back to)
    4   EXIT_NO_VALID_CHECKPOINT   the run dir has checkpoints but none verifies (never restarts silently)
    74  EXIT_DISK_FULL             a checkpoint save ran out of disk; the message names the path and the bytes
                                   needed, the unfinished save is removed, the previous checkpoint stays valid
                                   (74 = EX_IOERR, sysexits.h)
    75  EXIT_REQUEUE               preempted (SIGTERM/SIGUSR1/SIGUSR2): a checkpoint is committed;
                                   requeue and rerun the same command (75 = EX_TEMPFAIL, sysexits.h)
    124 EXIT_HANG                  a collective timed out (a peer hangs or died) or this rank's step watchdog fired;
                                   all-thread stacks in <run_dir>/hang/ (124 = the code timeout(1) uses)

On a requeue exit rank 0 also writes ``<run_dir>/REQUEUE`` (step, signal, time), because launchers
such as torchrun report their own exit code (1) when workers exit non-zero.
"""

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_NO_VALID_CHECKPOINT = 4
EXIT_DISK_FULL = 74
EXIT_REQUEUE = 75
EXIT_HANG = 124  # defined with the watchdog in stunet_scale.parallel.distributed; the same number
