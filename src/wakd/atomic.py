"""Writing a file so that no reader, crash or ``kill -9`` ever sees half of it.

The content goes to a temporary file in the destination folder (same file system, so
the final rename is atomic), is flushed to disk, and only then replaces the target with
``os.replace``. On any failure, ``KeyboardInterrupt`` included, the temporary file is
removed and the previous version of the target stays as it was. A process killed
outright may leave a stray ``.<name>.*.tmp`` beside the target, never a truncated target.

Every file wakd writes for later use (results, predictions, plots, PCA, centroids,
``.mat`` files, exports, the synthetic city's manifest) goes through here; Lightning
writes its checkpoints the same way on its own.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_path", "atomic_write_text"]

# mkstemp creates files readable by their owner only; results and caches are meant to be shared.
_FILE_MODE = 0o644


@contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write to; it becomes ``path`` on success.

    For writers that want a file name (h5py, scipy, safetensors, ONNX export) or that open
    the file themselves. The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # Flush before the rename: after a power cut the target must be old or new, not empty.
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_write_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (trailing newline) to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
