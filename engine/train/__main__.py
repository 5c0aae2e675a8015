"""`python -m engine.train [options]`: see `python -m engine.train --help`."""
from __future__ import annotations

import logging
import sys

from engine.train.checkpoint import CheckpointError
from engine.train.config import parse_config
from engine.train.trainer import run


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, NotImplementedError) as err:
        logging.getLogger("engine.train").error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
