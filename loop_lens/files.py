"""Writing files so that a crash mid-write never loses the previous version."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from loop_lens.errors import LoadError, SaveError


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
    check_output_file(path)
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


def check_output_file(path: Union[str, Path], flag: str = "") -> None:
    """Refuse to write `path` unless it is missing or a regular file that is not a symbolic link:
    writing replaces the path with a new regular file, which would turn a FIFO, a device node, a
    socket or a link (to a terminal, `/proc/self/fd/1`, another file) into something else.
    SaveError naming `flag` (an option such as `--out`) and the path."""
    path = Path(path)
    label = f"{flag} {path}".strip()
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise SaveError(f"cannot write {label}: {err.strerror}") from err
    if stat.S_ISLNK(info.st_mode):
        raise SaveError(f"cannot write {label}: it is a symbolic link (to {os.readlink(path)!r}); writing would replace "
                        "the link with a file. Give the real path of the file to write")
    if stat.S_ISDIR(info.st_mode):
        raise SaveError(f"cannot write {label}: it is a directory")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "a device node"
                if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "a socket"
                if stat.S_ISSOCK(info.st_mode) else "not a regular file")
        raise SaveError(f"cannot write {label}: it is {kind}; outputs are written as regular files. Give another path")


def _mode_for(path: Path) -> int:
    """The permissions a plain `open(path, "w")` would give: the old file's, or 0o666 less the umask
    (mkstemp's own 0o600 would make a shared report unreadable to others)."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


MAX_JSON_DEPTH = 100
"""The deepest nesting of arrays and objects a JSON file loop_lens reads may have."""
MAX_INT_DIGITS = 100
"""The most digits an integer in such a file may have."""


class JSONFileError(LoadError):
    """A JSON text that cannot be read: invalid, nested too deep, a huge integer, not UTF-8."""


def _json_depth_problem(text: str) -> Optional[int]:
    """The offset where `text` nests arrays/objects deeper than MAX_JSON_DEPTH (strings skipped), or None."""
    depth, in_string, escaped = 0, False, False
    for offset, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return offset
        elif char in "]}":
            depth -= 1
    return None


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONFileError(f"it holds an integer with {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are read)")
    return int(text)


def parse_json(text: str, where: str) -> Any:
    """`text` parsed as JSON, the one way loop_lens reads every JSON file (configs, indexes,
    prompts, summaries): nesting deeper than MAX_JSON_DEPTH and integers longer than
    MAX_INT_DIGITS digits are refused before Python's parser would overflow its stack or its
    int-conversion limit. JSONFileError names `where` (a file, a field)."""
    if not isinstance(text, str):
        raise JSONFileError(f"{where} is not JSON text, got {type(text).__name__}")
    # Python's C scanner is fast; the depth scan only runs when the text could nest that deep
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        offset = _json_depth_problem(text)
        if offset is not None:
            raise JSONFileError(f"{where} nests arrays/objects more than {MAX_JSON_DEPTH} deep (at character {offset}); "
                                "it is not a file loop_lens reads")
    try:
        return json.loads(text, parse_int=_parse_int)
    except JSONFileError as err:
        raise JSONFileError(f"{where}: {err}") from None
    except RecursionError:
        raise JSONFileError(f"{where} nests too deep to read") from None
    except json.JSONDecodeError as err:
        raise JSONFileError(f"{where} is not valid JSON: {err}") from err
    except ValueError as err:  # e.g. a float literal too long for the conversion limit
        raise JSONFileError(f"{where} is not readable JSON: {err}") from err


def read_json(path: Union[str, Path], what: str = "") -> Any:
    """The JSON value in file `path` (see `parse_json`); JSONFileError naming the file."""
    path = Path(path)
    where = f"{what} {path}".strip()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise JSONFileError(f"{where} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    return parse_json(text, where)


def checkpoint_file(directory: Union[str, Path], name: str) -> Path:
    """The file `name` of checkpoint folder `directory`, refused (LoadError) when it is a symbolic
    link that leads outside the checkpoint. A link is followed only to a file inside the folder
    itself or, for a Hugging Face cache snapshot (`<repo>/snapshots/<rev>/`), inside that repo's
    own `blobs/` folder, where the cache keeps every file. Nothing outside is read."""
    directory = Path(directory)
    path = directory / name
    root = directory.resolve()
    real = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(real == place or place in real.parents for place in allowed):
        raise LoadError(f"{path} is a symbolic link to {real}, outside the checkpoint {directory}; loop_lens reads "
                        "nothing outside a checkpoint folder (or its hub cache's blobs/). Copy the file into the folder")
    return path


def inside_folder(target: Union[str, Path], folder: Union[str, Path]) -> bool:
    """Whether writing `target` would put a file inside `folder` (or replace one of its files),
    judged both by the path as written and by where its links lead: a Hugging Face cache snapshot
    (`snapshots/<rev>/`) counts together with its repo's `blobs/`, where its files really are."""
    target, folder = Path(target), Path(folder)
    written = Path(os.path.abspath(target))
    places = {Path(os.path.abspath(folder)), folder.resolve()}
    real = folder.resolve()
    if real.parent.name == "snapshots":
        places.add(real.parent.parent / "blobs")
    candidates = {written, written.parent.resolve() / written.name}
    if written.exists() or written.is_symlink():
        candidates.add(written.resolve())
    return any(place == c or place in c.parents for place in places for c in candidates)
