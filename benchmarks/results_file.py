"""The one writer of benchmarks/results.json: every benchmark merges its figures into the file and
never deletes what another benchmark wrote.

    from results_file import merge_results   # benchmarks/ is on sys.path when a script here runs
    merge_results(args.out, {"ratios": {"my_ratio": 1.2}, "figures": {"mine": {...}}})

`merge_results` re-reads the file just before writing (under a lock on its folder, so two
benchmarks finishing at once do not drop each other's keys), merges the update into it key by
key at every level of nesting (a dict merges into a dict; anything else replaces the old value),
and writes the result atomically: a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash mid-write leaves the previous file whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def deep_merge(old: Mapping, new: Mapping) -> dict:
    """`old` with `new` merged in: keys only in `old` are kept, dicts merge recursively, and any
    other value of `new` replaces the old one. Neither argument is changed."""
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder (POSIX flock; no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the write is still atomic
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_results(path: Path) -> dict:
    """The JSON object in `path` ({} when the file does not exist). A file that is not a JSON
    object raises ValueError naming it (and is left as it is)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or move it, the benchmark did not write to it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; fix or move it, the benchmark did not write to it")
    return data


def merge_results(path: Path, update: Mapping[str, Any]) -> dict:
    """Merge `update` into the JSON object in `path` (created if missing), keeping every key the
    update does not name, and write it atomically. Returns what was written."""
    path = Path(path)
    if not isinstance(update, Mapping):
        raise ValueError(f"update must be a dict of results, got {type(update).__name__}")
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        merged = deep_merge(read_results(path), update)
        text = json.dumps(merged, indent=2, default=str) + "\n"  # fails before anything is written
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                os.chmod(tmp, path.stat().st_mode & 0o777)
            else:
                os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return merged
