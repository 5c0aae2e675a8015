"""The up-front image-file check, one mechanism for the torchvision and DALI loaders.

Every file gets a structural check (magic bytes; a JPEG or PNG cut short has no end marker in its last
KB; with `jpeg_only`, for DALI's decoder, anything but JPEG is refused); with `decode` (--skip-corrupt)
every file is also decoded. Files are checked on `workers` threads. The result is cached per folder
contents (engine.data.index fingerprint, so any added, removed or rewritten file invalidates it) in
memory and in $ENGINE_DATA_CACHE (default $ENGINE_CACHE_DIR/data-checks/, the cache dir defaulting to
~/.cache/engine): a restarted or resumed job does not read the tree again.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("engine.data")
_TAILS = {b"\xff\xd8\xff": (b"\xff\xd9", "JPEG"), b"\x89PN": (b"IEND", "PNG")}
_memo: dict[str, dict[str, str]] = {}


def problem(path: str, jpeg_only: bool = False, decode: bool = False) -> str | None:
    """Why the image file at `path` cannot be used, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(3)
            f.seek(max(0, os.fstat(f.fileno()).st_size - 1024))
            tail = f.read()
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if head not in _TAILS or (jpeg_only and _TAILS[head][1] != "JPEG"):
        return ("is not a JPEG file (DALI's file reader decodes JPEG only)" if jpeg_only
                else "is neither a JPEG nor a PNG file")
    marker, kind = _TAILS[head]
    if marker not in tail:
        return f"is a truncated {kind} (no end-of-image marker)"
    if decode:
        from engine.data.datasets import readable

        if not readable(path):
            return "does not decode"
    return None


def _cache_file(key: str) -> Path:
    base = os.environ.get("ENGINE_DATA_CACHE") or Path(os.environ.get("ENGINE_CACHE_DIR") or
                                                       Path.home() / ".cache" / "engine") / "data-checks"
    return Path(base) / f"{key}.json"


def _load(key: str) -> dict[str, str] | None:
    try:
        return json.loads(_cache_file(key).read_text())["bad"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(key: str, bad: dict[str, str], files: int) -> None:
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"files": files, "bad": bad}))
        os.replace(tmp, path)
    except OSError as err:
        log.warning("file-check cache %s not written (%s): the next job checks the files again", path, err)


def bad_files(paths: list[str], fingerprint: str, jpeg_only: bool = False, decode: bool = False,
              workers: int = 8, progress: bool = False) -> dict[str, str]:
    """{path: problem} over `paths` (the files of the tree whose index has `fingerprint`), cached."""
    key = f"{fingerprint}-{'jpeg' if jpeg_only else 'any'}-{'decode' if decode else 'structure'}"
    bad = _memo.get(key)
    if bad is None:
        bad = _load(key)
    if bad is None:
        from tqdm import tqdm

        with ThreadPoolExecutor(max(1, workers)) as pool:
            found = pool.map(lambda p: problem(p, jpeg_only, decode), paths, chunksize=64)
            found = list(tqdm(found, total=len(paths), desc="checking image files", leave=False,
                              disable=not progress or len(paths) < 5000))
        bad = {p: why for p, why in zip(paths, found) if why is not None}
        _store(key, bad, len(paths))
    _memo[key] = bad
    present = set(paths)
    return {p: why for p, why in bad.items() if p in present}
