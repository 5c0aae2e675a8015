"""How a training run ends: its exit code, and the typed errors that choose one.

Each failure class has its own code so a script (or a scheduler deciding whether to restart) can tell
"fix your input" from "the disk filled up" without parsing messages.
"""
from __future__ import annotations

EXIT_OK = 0               # finished: all epochs, or --max-steps reached
EXIT_FAILED = 1           # an unexpected error (a bug): its traceback is printed
EXIT_BAD_INPUT = 2        # bad settings, data, checkpoint or run folder, found before any step; nothing trained
EXIT_INTERRUPTED = 3      # SIGTERM/SIGINT: a checkpoint was written; continue with --resume
EXIT_NON_FINITE = 4       # non-finite losses or gradients: stopped, the last good checkpoint kept
EXIT_WRITE_FAILED = 5     # a checkpoint or log write failed (disk full, size limit, read-only): the last good one kept
EXIT_DATA_FAILED = 6      # a data read failed mid-run: a checkpoint of the last completed step was written

EXIT_CODES = (f"exit codes: {EXIT_OK} finished (all epochs, or --max-steps reached); {EXIT_FAILED} an unexpected "
              f"error (a bug; traceback printed); {EXIT_BAD_INPUT} bad input "
              f"(settings, data, checkpoint, run folder), nothing trained; {EXIT_INTERRUPTED} interrupted by "
              f"SIGTERM/SIGINT after writing a checkpoint (continue with --resume); {EXIT_NON_FINITE} stopped on "
              f"non-finite losses or gradients (the last good checkpoint is kept); {EXIT_WRITE_FAILED} a checkpoint "
              f"or log write failed (disk full, file-size limit, read-only folder; the last good checkpoint is "
              f"kept); {EXIT_DATA_FAILED} a data file failed mid-run (a checkpoint of the last completed step is "
              "written; continue with --resume)")


class BadInput(ValueError):
    """Input that cannot be trained on (settings, data, checkpoint, run folder), found before any step.
    A ValueError, so callers of the library functions that raised ValueError before still catch it."""

    exit_code = EXIT_BAD_INPUT


class WriteFailed(Exception):
    """A file of the run (checkpoint, log) could not be written; the message names the last good checkpoint."""

    exit_code = EXIT_WRITE_FAILED


class DataFailed(Exception):
    """A data file failed while training; a checkpoint of the last completed step was written."""

    exit_code = EXIT_DATA_FAILED
