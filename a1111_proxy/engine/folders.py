"""The walk over a MODELS_DIR folder that every catalogue (checkpoints, LoRA, ControlNet) uses.

Like A1111's, it follows symbolic links, to folders and to files, since people share one
models folder between tools that way; a link back up the tree is walked only once, and a
dangling link is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk(root) in sorted order, through links, each real folder once. Callers may prune
    the yielded folder names in place, as with os.walk."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a loop (or a second link to a folder already walked)
            dirnames.clear()
            continue
        seen.add(real)
        here = Path(dirpath)
        dirnames.sort()
        files = sorted(name for name in filenames if (here / name).is_file())
        yield here, dirnames, files
