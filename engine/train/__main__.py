"""`python -m engine.train [options]`: see `python -m engine.train --help` (exit codes at its end)."""
from __future__ import annotations

import logging
import sys

from engine.train.config import parse_config
from engine.errors import EXIT_INTERRUPTED, EXIT_OK, BadInput, DataFailed, WriteFailed
from engine.train.guard import NonFiniteError
from engine.train.trainer import run


def main(argv: list[str] | None = None) -> int:
    """Run one training; every expected failure ends in one logged line and its exit code (errors.py)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("engine.train")
    try:
        summary = run(parse_config(argv))
    except (BadInput, WriteFailed, DataFailed, NonFiniteError) as err:
        log.error("%s", err)
        return err.exit_code
    return EXIT_INTERRUPTED if summary["interrupted"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
