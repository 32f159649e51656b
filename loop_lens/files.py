"""Writing files so that a crash mid-write never loses the previous version."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union


def is_plain_file_name(name: Any) -> bool:
    """A non-empty file name with no folder part: no separator, not '.' or '..', no NUL."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder, synced and then renamed
    over `path` in one step: readers see the old file or the new one, never a part."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Union[str, Path], data: bytes) -> Path:
    """`write_text_atomic` for bytes (a serialised safetensors file, say)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _mode_for(path: Path) -> int:
    """The permissions a plain `open(path, "w")` would give: the old file's, or 0o666 less the umask
    (mkstemp's own 0o600 would make a shared report unreadable to others)."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
