"""One listing of an ImageFolder tree `root/<class>/.../<image>`: classes, (path, label) samples and a
fingerprint of the tree's contents (every file's relative path, size and modification time), which keys
the cached file checks (engine.data.checks). A job lists each tree once (rank 0, shared with the other
ranks by the caller); ImageNet's 1.3 M files take one directory walk, no file is opened.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class FolderIndex:
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]      # (absolute path, class index), sorted within each class
    fingerprint: str                    # SHA-256 of the listing (paths, sizes, mtimes)


def _walk(folder: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image file under `folder`, recursively, sorted by path."""
    found, stack = [], [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_dir():
                    stack.append(e.path)
                elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    st = e.stat()
                    found.append((e.path, st.st_size, st.st_mtime_ns))
    return sorted(found)


def scan(root: str | os.PathLike, classes: list[str] | None = None, progress: bool = False) -> FolderIndex:
    """List the tree (FileNotFoundError / ValueError naming a missing root, no class folders, a missing
    or empty class folder). `classes` fixes the class order (val takes train's); `progress`: a bar per
    class folder."""
    from tqdm import tqdm

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not found:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>.jpg)")
    classes = classes or found
    digest, samples = hashlib.sha256(str(root.resolve()).encode()), []
    for label, name in enumerate(tqdm(classes, desc=f"listing {root}", disable=not progress, leave=False)):
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"class folder {folder} is missing")
        files = _walk(str(folder))
        if not files:
            raise ValueError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for path, size, mtime in files:
            digest.update(f"{label}\0{path}\0{size}\0{mtime}\n".encode())
        samples += [(path, label) for path, _, _ in files]
    return FolderIndex(root, list(classes), samples, digest.hexdigest())
