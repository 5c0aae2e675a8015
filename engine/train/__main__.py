"""`python -m engine.train [options]`: see `python -m engine.train --help` (exit codes at its end)."""
from __future__ import annotations

import logging
import sys

from engine.train.checkpoint import CheckpointError
from engine.train.config import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_OK, parse_config
from engine.train.guard import NonFiniteError
from engine.train.trainer import run


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("engine.train")
    try:
        cfg = parse_config(argv)
        summary = run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, NotImplementedError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    except NonFiniteError as err:
        log.error("%s", err)
        return EXIT_NON_FINITE
    return EXIT_INTERRUPTED if summary["interrupted"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
