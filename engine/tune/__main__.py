"""`python -m engine.tune [training flags] [--out TABLE]`: tune the dispatch table for a run's settings.

Takes the flags (or --config file) `python -m engine.train` takes, enumerates every op call signature
that run will make, times each implementation on this machine's GPU and writes one table (default:
the one training's `--tune auto` uses, $ENGINE_CACHE_DIR/dispatch-<device>.json). Data paths are not
read. On a CPU it writes a reference-only table at once (nothing to tune).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 2, 3
EPILOG = (f"exit codes: {EXIT_OK} table written; {EXIT_BAD_INPUT} bad input (settings, --out); {EXIT_INTERRUPTED} "
          "interrupted (run the same command again: it continues where it stopped). Every other flag is a "
          "training flag (python -m engine.train --help).")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.tune", add_help=False, epilog=EPILOG,
                                description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("-h", "--help", action="store_true", help="this help and the training flags'")
    p.add_argument("--out", help="table file to write or complete (default: the cache table --tune auto reads)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to tune on (default: cuda when there is one, else cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("engine.tune")
    from engine.train import config
    from engine.tune import settings_from_config, tune
    from engine.tune.table import default_path
    from engine.supernet import SupernetSpec

    args, rest = _parser().parse_known_args(argv)
    if args.help:
        print(_parser().format_help() + "\ntraining flags:\n" + config._parser().format_help())
        return EXIT_OK
    try:
        cfg = config.parse_config(rest, check_paths=False)
        device = torch.device(args.device)
        out = Path(args.out) if args.out else default_path(device)
        if out.exists() and not out.is_file():
            raise ValueError(f"--out {out}: exists and is not a file")
        spec = SupernetSpec(variant=cfg.variant, width_mult=cfg.width_mult, kernel_sizes=tuple(cfg.kernel_sizes),
                            expand_ratios=tuple(cfg.expand_ratios), depths=tuple(cfg.depths))
        settings = settings_from_config(cfg, spec, device)
    except (ValueError, RuntimeError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    except SystemExit as err:             # argparse: its usage line is printed
        return EXIT_BAD_INPUT if err.code else EXIT_OK
    started = time.perf_counter()
    try:
        table = tune([settings], device, out, progress=cfg.progress)
    except KeyboardInterrupt:
        log.error("interrupted: run the same command again to continue")
        return EXIT_INTERRUPTED
    except OSError as err:
        log.error("--out %s: %s", out, err)
        return EXIT_BAD_INPUT
    counts: dict[str, int] = {}
    for entry in table.entries.values():
        counts[entry["choice"]] = counts.get(entry["choice"], 0) + 1
    log.info("%s: %d signatures (%s), %d notes, total %.1f s", out, len(table.entries),
             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), len(table.notes),
             time.perf_counter() - started)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
