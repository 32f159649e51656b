"""The native checkpoint format: which files make a checkpoint, and saving one atomically.

A saved folder holds `loop_config.json`, `model.safetensors` and, when the model has one,
`tokenizer.json`. `save_checkpoint` never writes those names in place. It writes the new weights
and tokenizer under fresh names (`model.<token>.safetensors`, `tokenizer.<token>.json`), syncs
them to disk, and then switches to them with one atomic rename of a `loop_config.json` whose
reserved key `__files__` names them. Only after that switch are the old files (and, with
`overwrite=True`, foreign ones) deleted. The fresh files are then hard-linked to the plain names and a
second atomic rename installs a plain `loop_config.json`, so a finished save has the plain
layout. A process killed at any moment leaves a folder that loads as the old checkpoint or as the
new one; the leftovers of an interrupted save are recognised and removed by the next save.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, LoadError, SaveError
from loop_lens.files import checkpoint_file, is_plain_file_name, read_json

CONFIG_NAME = "loop_config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
FILES_KEY = "__files__"

# Files only save_checkpoint creates: the fresh weights and tokenizer, and the config before its rename.
_OWN_LEFTOVER = re.compile(
    r"(model\.[0-9a-f]{16}\.safetensors|tokenizer\.[0-9a-f]{16}\.json|\.loop_config\.[0-9a-f]{16}\.tmp)"
)

__all__ = ["CONFIG_NAME", "NativeFiles", "check_save_target", "native_files", "save_checkpoint"]


@dataclass(frozen=True)
class NativeFiles:
    """What a native checkpoint folder holds: its config fields, and the files of its weights and tokenizer.

    `config` is the JSON object of `loop_config.json` without its file list. In the plain layout
    (no file list) `weights` and `tokenizer` are None: the weights are read like any checkpoint's
    and the tokenizer is `tokenizer.json` if present. Otherwise they are the files the list names,
    and `tokenizer` is None when the checkpoint has no tokenizer.
    """

    config: dict[str, Any]
    weights: Optional[Path]
    tokenizer: Optional[Path]


def native_files(directory: Union[str, Path]) -> NativeFiles:
    """The config fields of a native checkpoint and the files it names; raises LoadError."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise LoadError(f"no {CONFIG_NAME} in {directory} (native format)")
    try:
        data = read_json(checkpoint_file(directory, CONFIG_NAME))
    except OSError as err:
        raise LoadError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise LoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    files = data.pop(FILES_KEY, None)
    if files is None:
        return NativeFiles(data, None, None)
    if not isinstance(files, dict) or set(files) != {"weights", "tokenizer"}:
        raise LoadError(f"{path}: {FILES_KEY!r} must be an object with keys 'weights' and 'tokenizer', got {files!r}")
    named = {}
    for role, name in files.items():
        if name is None and role == "tokenizer":
            named[role] = None
            continue
        if not is_plain_file_name(name):
            raise LoadError(
                f"{path}: {FILES_KEY}.{role} must be a file name inside the checkpoint folder, got {name!r}"
            )
        if not (directory / name).is_file():
            raise LoadError(f"{path} names {role} file {name!r}, which is not a file in {directory}")
        named[role] = checkpoint_file(directory, name)
    return NativeFiles(data, named["weights"], named["tokenizer"])


def _tokenizer_text(tokenizer: Any) -> Optional[str]:
    """The tokenizer as `tokenizer.json` text: a `tokenizers.Tokenizer`, or a transformers fast
    tokenizer's backend; None (with a warning for any other kind) when there is none to write."""
    if tokenizer is None:
        return None
    for candidate in (tokenizer, getattr(tokenizer, "backend_tokenizer", None)):
        if callable(getattr(candidate, "to_str", None)):
            return candidate.to_str()
    warnings.warn(
        f"the attached {type(tokenizer).__name__} cannot be written as {TOKENIZER_NAME}; "
        "the checkpoint is saved without a tokenizer",
        UserWarning,
        stacklevel=3,
    )
    return None


def _own_config(directory: Path) -> Optional[str]:
    """None when the folder's config is one that save_checkpoint wrote, else why it is not."""
    try:
        LoopConfig.from_dict(native_files(directory).config)
    except (LoadError, ConfigError, ValueError, TypeError) as err:
        return str(err)
    return None


def check_save_target(directory: Union[str, Path], overwrite: bool = False) -> list[str]:
    """Raise SaveError if `save_checkpoint(model, directory, overwrite)` would refuse the folder;
    else return the names of the files it would delete. Writes nothing (the CLI calls it before loading)."""
    directory = Path(directory).expanduser()
    for folder in (directory, *directory.parents):
        if folder.exists() and not folder.is_dir():
            raise SaveError(f"cannot save into {directory}: {folder} is a file, not a folder")
    if not directory.exists():
        return []
    entries = sorted(os.scandir(directory), key=lambda e: e.name)
    folders = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    if folders:
        raise SaveError(
            f"cannot save into {directory}: it holds folders {folders[:8]}, and saving never deletes folders; "
            "remove them or save into another folder"
        )
    names = [e.name for e in entries]
    config_problem = _own_config(directory) if CONFIG_NAME in names else f"no {CONFIG_NAME}"
    ours = {name for name in names if _OWN_LEFTOVER.fullmatch(name)}
    if config_problem is None:
        ours |= {CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME}
    foreign = [name for name in names if name not in ours]
    if foreign and not overwrite:
        why = "" if CONFIG_NAME not in foreign else f" ({CONFIG_NAME}: {config_problem})"
        raise SaveError(
            f"cannot save into {directory}: it holds files that are not a loop_lens checkpoint: "
            f"{foreign[:8]}{' ...' if len(foreign) > 8 else ''}{why}; pass overwrite=True "
            "(loop-lens convert --force) to replace everything in it"
        )
    return [name for name in names if name != CONFIG_NAME]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make renames and deletions in `directory` durable (POSIX; elsewhere a no-op)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    """Create `path` (it must not exist) holding `text`, synced to disk."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _install_config(directory: Path, token: str, text: str) -> None:
    """Atomically replace the folder's config with `text` (the commit point of a save)."""
    tmp = directory / f".loop_config.{token}.tmp"
    try:
        _write_text(tmp, text)
        os.replace(tmp, directory / CONFIG_NAME)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _created_folders(directory: Path) -> list[Path]:
    """`directory` and its missing parents, innermost first: what `mkdir(parents=True)` will create."""
    missing = []
    for folder in (directory, *directory.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def save_checkpoint(model: Any, directory: Union[str, Path], overwrite: bool = False) -> Path:
    """Save `model` (a HookedLoopedTransformer) to `directory` in the native format, atomically.

    An empty or missing folder, or one holding an earlier loop_lens save, is fine; any other
    content raises SaveError unless `overwrite=True`, which replaces it all with the new checkpoint
    (subfolders are never deleted, so a folder holding any is refused). Killed at any moment, the
    folder loads as the old checkpoint or the new one. A transformers fast tokenizer is saved as
    its backend `tokenizers.Tokenizer`. Returns the folder.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    old = check_save_target(directory, overwrite)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("unembed.weight", None)
    config_text = model.cfg.to_json() + "\n"
    tokenizer_text = _tokenizer_text(model.tokenizer)

    token = secrets.token_hex(8)
    fresh = {
        "weights": f"model.{token}.safetensors",
        "tokenizer": None if tokenizer_text is None else f"tokenizer.{token}.json",
    }
    manifest = {**json.loads(config_text), FILES_KEY: fresh}
    created = _created_folders(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / fresh["weights"]), metadata={"format": "loop_lens"})
        _fsync_file(directory / fresh["weights"])
        if tokenizer_text is not None:
            _write_text(directory / fresh["tokenizer"], tokenizer_text)
        _fsync_dir(directory)
        _install_config(directory, token, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    except BaseException as err:
        for name in fresh.values():
            if name is not None:
                (directory / name).unlink(missing_ok=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if isinstance(err, (OSError, SafetensorError, ValueError, RuntimeError)):
            raise SaveError(f"could not save to {directory}: {err}; the folder is unchanged") from err
        raise

    # Committed: the folder now loads as the new checkpoint. What follows only tidies it up.
    try:
        _fsync_dir(directory)
        for name in old:
            (directory / name).unlink(missing_ok=True)
        _fsync_dir(directory)
        _switch_to_plain_names(directory, token, fresh, config_text)
    except OSError as err:
        raise SaveError(
            f"the new checkpoint is saved in {directory} and loads, but tidying the folder up failed: {err}"
        ) from err
    return directory


def _switch_to_plain_names(directory: Path, token: str, fresh: dict[str, Optional[str]], config_text: str) -> None:
    """Give the saved files their plain names: hard links, a plain config, then drop the fresh names.

    Where the file system has no hard links the checkpoint keeps its fresh names, which load the same.
    """
    plain = {"weights": WEIGHTS_NAME, "tokenizer": TOKENIZER_NAME}
    linked = []
    try:
        for role, name in fresh.items():
            if name is not None:
                os.link(directory / name, directory / plain[role])
                linked.append(directory / plain[role])
    except OSError:
        for path in linked:
            path.unlink()
        return
    _fsync_dir(directory)
    _install_config(directory, token, config_text)
    _fsync_dir(directory)
    for name in fresh.values():
        if name is not None:
            (directory / name).unlink()
    _fsync_dir(directory)
