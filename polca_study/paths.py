"""Directories a run writes to, checked before any work.

Python reports an unwritable directory as a traceback from deep inside whatever wrote
first; a setting that names one is instead refused in one line that names it.
"""

from __future__ import annotations

import os
from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable(path: str | os.PathLike) -> str | None:
    """Why a directory could not be created or written at `path`, or None if it can:
    a file in the way, or a directory (or a read-only file system) that refuses writes."""
    existing = nearest_existing(Path(path))
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
