"""Reading checkpoints safely, and assembling a model from mapped tensors.

Nothing here imports or runs code from a checkpoint directory: weights come from safetensors
first, `torch.load(weights_only=True)` otherwise; configs are parsed as JSON.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, LoadError, UnexpectedTensorsWarning


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise LoadError(f"no config.json in {directory}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoadError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise LoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LoadError(f"cannot read {path} (truncated or corrupt safetensors file?): {err}") from err


def read_tensors(directory: Path) -> tuple[dict[str, Tensor], str]:
    """All tensors of a checkpoint directory, and a description of where they came from."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    bin_file = directory / "pytorch_model.bin"
    if single.is_file():
        return _read_safetensors(single), str(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise LoadError(f"{index} is not a valid safetensors index: {err}") from err
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file() or shard_path.resolve().parent != directory.resolve():
                raise LoadError(f"{index} names shard {shard!r}, which is not a file in {directory}")
            tensors.update(_read_safetensors(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise LoadError(f"shards lack tensors their index lists: {missing[:5]}")
        return tensors, str(index)
    if bin_file.is_file():
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad pickles
            raise LoadError(f"cannot read {bin_file} with weights_only=True: {err}") from err
        if not isinstance(state, dict):
            raise LoadError(f"{bin_file} does not hold a state dict")
        return state, str(bin_file)
    raise LoadError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


class TensorSource:
    """Checkpoint tensors handed out by name; remembers which were used."""

    def __init__(self, tensors: dict[str, Tensor], origin: str, ignore: Iterable[str] = ()):
        self.tensors, self.origin = tensors, origin
        self.used: set[str] = set(k for k in ignore if k in tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise LoadError(f"missing tensor {name!r} in {self.origin}")
        self.used.add(name)
        return self.tensors[name]

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def make_config(**fields: Any) -> LoopConfig:
    try:
        return LoopConfig(**fields)
    except (ConfigError, TypeError) as err:
        raise LoadError(f"checkpoint config is not usable: {err}") from err


def assemble(
    cfg: LoopConfig,
    mapped: dict[str, tuple[str, Tensor]],
    source: TensorSource,
    dtype: Optional[torch.dtype] = None,
    device: Optional[str | torch.device] = None,
    tokenizer: Any = None,
):
    """Build a HookedLoopedTransformer from `{our_name: (source_name, tensor)}`.

    Every parameter must be mapped with the right shape; tensors the adapter did not use are
    reported in one warning. Nothing partial is returned: any problem raises LoadError.
    """
    from loop_lens.model.components import Rotary
    from loop_lens.model.looped import HookedLoopedTransformer

    with torch.device("meta"):
        model = HookedLoopedTransformer(cfg, tokenizer=tokenizer)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("unembed.weight", None)
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise LoadError(f"adapter left parameters unset: {missing[:5]} (bug in the {cfg.family} adapter)")
    if dtype is None:
        dtype = mapped["embed.weight"][1].dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
    state = {}
    for name, want in expected.items():
        src_name, tensor = mapped[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise LoadError(
                f"tensor {src_name!r} in {source.origin} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(want.shape)} for this config"
            )
        state[name] = tensor.to(dtype=dtype).contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.unembed.weight = model.embed.weight
    if model.rotary is not None:
        model.rotary = Rotary(cfg)
    model.setup()
    extra = source.unused()
    if extra:
        warnings.warn(
            f"{len(extra)} tensor(s) in {source.origin} were not used by the {cfg.family} adapter: "
            f"{extra[:8]}{' ...' if len(extra) > 8 else ''}",
            UnexpectedTensorsWarning,
            stacklevel=3,
        )
    if device is not None:
        model.to(device)
    return model.eval()
