"""Reading checkpoints safely, and assembling a model from mapped tensors.

Nothing here imports or runs code from a checkpoint directory: weights come from safetensors
first, `torch.load(weights_only=True)` otherwise; configs are parsed as JSON. Files may be
symlinks (the Hugging Face cache keeps them as links into its `blobs/` folder), but an index
may only name plain file names inside the checkpoint directory.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from loop_lens.config import LoopConfig, Rule, show_value
from loop_lens.errors import ConfigError, LoadError, UnexpectedTensorsWarning
from loop_lens.families import model_class
from loop_lens.files import is_plain_file_name
from loop_lens.model.components import Rotary
from loop_lens.model.looped import HookedLoopedTransformer

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The tensor dtypes a checkpoint's weights may have; anything else (integers, bools, fp8) is refused."""

REQUIRED = object()
"""Marks a config key that has no default."""


def read_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict; LoadError naming the file when it is not a JSON object."""
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


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, memory-mapped: nothing is read until it is used.

    Each tensor gets its own mapping of the file, so that a tensor dropped once it has been
    converted (`assemble` does this) gives its pages back at once instead of when the last tensor
    of the file goes; tensors kept at the file's dtype stay backed by the file (a private mapping:
    writes to them never reach the file).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
        tensors = {}
        for name in names:
            with safe_open(str(path), framework="pt") as handle:
                tensors[name] = handle.get_tensor(name)
        return tensors
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LoadError(f"cannot read {path} (truncated or corrupt safetensors file?): {err}") from err


def _read_index(index: Path, directory: Path) -> tuple[list[Path], list[str]]:
    """The shard files a safetensors index names (each a plain file name in `directory`) and the
    tensor names it lists."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise LoadError(f"{index} is not a valid safetensors index: {err}") from err
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoadError(f"{index} is not a valid safetensors index: 'weight_map' must be a non-empty object")
    shards: dict[str, Path] = {}
    for tensor_name, shard in weight_map.items():
        if not is_plain_file_name(shard):
            raise LoadError(
                f"{index} maps tensor {tensor_name!r} to shard {shard!r}, which is not a plain file name "
                f"in {directory}; an index may only name files beside it"
            )
        path = directory / shard  # a symlink is fine: the hub cache links each file into blobs/
        if not path.is_file():
            raise LoadError(f"{index} names shard {shard!r}, which is not a file in {directory}")
        shards[shard] = path
    return [shards[name] for name in sorted(shards)], list(weight_map)


def read_tensors(directory: Path) -> tuple[dict[str, Tensor], str]:
    """All tensors of a checkpoint directory, and a description of where they came from."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    bin_file = directory / "pytorch_model.bin"
    if single.is_file():
        return read_safetensors(single), str(single)
    if index.is_file():
        shards, listed = _read_index(index, directory)
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            tensors.update(read_safetensors(shard))
        missing = sorted(set(listed) - set(tensors))
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
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        if bad:
            raise LoadError(f"{bin_file} holds entries that are not named tensors: {bad[:5]}")
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
        """Whether the checkpoint holds a tensor of this name."""
        return name in self.tensors

    def take(self, name: str) -> Tensor:
        """The named tensor, marked as used; LoadError naming it when the checkpoint lacks it."""
        if name not in self.tensors:
            raise LoadError(f"missing tensor {name!r} in {self.origin}")
        self.used.add(name)
        return self.tensors[name]

    def unused(self) -> list[str]:
        """Names of the tensors nobody took, sorted."""
        return sorted(set(self.tensors) - self.used)


class CheckpointConfig:
    """A checkpoint's config dict read key by key, remembering which key fed each LoopConfig field,
    so that a value LoopConfig refuses is reported under both names."""

    def __init__(self, config: dict[str, Any], origin: str = "config.json"):
        if not isinstance(config, dict):
            raise LoadError(f"{origin} must hold an object, got {type(config).__name__}")
        self.config, self.origin = config, origin
        self.sources: dict[str, str] = {}  # LoopConfig field -> e.g. "config.json field 'hidden_size'"

    def get(self, ours: str, *keys: str, default: Any = REQUIRED) -> Any:
        """The first of `keys` the config sets (not null), recorded as the source of field `ours`."""
        for key in keys:
            if self.config.get(key) is not None:
                self.sources[ours] = f"{self.origin} field {key!r}"
                return self.config[key]
        if default is REQUIRED:
            raise LoadError(f"{self.origin} lacks {' / '.join(map(repr, keys))} ({ours})")
        return default

    def sub(self, ours: str, parent: str, key: str, default: Any) -> Any:
        """`config[parent][key]` (e.g. Huginn's `init_values.std`), recorded as the source of `ours`."""
        obj = self.config.get(parent)
        if obj is None:
            return default
        if not isinstance(obj, dict):
            raise LoadError(f"{self.origin} field {parent!r}: expected an object, got {show_value(obj)}")
        if obj.get(key) is None:
            return default
        self.sources[ours] = f"{self.origin} field '{parent}.{key}'"
        return obj[key]

    def checked(self, what: str, rule: Rule, *keys: str, default: Any = REQUIRED) -> Any:
        """A value the adapter uses itself (not a LoopConfig field), checked against `rule`."""
        value = self.get(what, *keys, default=default)
        if value is not default and not rule.ok(value):
            where = self.sources[what] + ("" if what in keys else f" ({what})")
            raise LoadError(f"{where}: expected {rule.what}, got {show_value(value)}")
        return value

    def note(self, ours: str, source: str) -> None:
        """Record where field `ours` came from when it is not a config key (an argument, a tensor)."""
        self.sources[ours] = source

    def make(self, **fields: Any) -> LoopConfig:
        """The LoopConfig; a refused value raises LoadError naming the checkpoint key and our field,
        e.g. `config.json field 'hidden_size' (d_model): expected a positive integer, got 'abc'`."""
        try:
            return LoopConfig(**fields)
        except ConfigError as err:
            named = getattr(err, "fields", ())
            if not any(f in self.sources for f in named):
                raise LoadError(f"{self.origin} is not usable: {err}") from err
            where = " and ".join(f"{self.sources[f]} ({f})" if f in self.sources else f for f in named)
            raise LoadError(f"{where}: {getattr(err, 'problem', err)}") from err


def _convert(
    expected: dict[str, Tensor],
    mapped: dict[str, tuple[str, Tensor]],
    source: TensorSource,
    dtype: torch.dtype,
    device: Optional[str | torch.device],
) -> dict[str, Tensor]:
    """The parameters at `dtype` (on `device`), one tensor at a time, emptying `mapped` and
    `source` as it goes: a source tensor that had to be converted or moved is dropped as soon as
    its copy exists, so the memory-mapped source and the converted weights are never both resident
    in full. Tensors already at `dtype` on the CPU are used as they are (no copy)."""
    state: dict[str, Tensor] = {}
    for name in expected:
        src_name, tensor = mapped.pop(name)
        source.tensors.pop(src_name, None)
        state[name] = tensor.to(device=device, dtype=dtype).contiguous()
        del tensor
    mapped.clear()  # tensors mapped to no parameter (already reported as unused)
    source.tensors.clear()
    return state


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
          "trunc_normal_", "zeros_", "ones_", "constant_")


@contextmanager
def _no_init() -> Iterator[None]:
    """Skip `torch.nn.init` while the model is built on the meta device: every parameter is
    assigned from the checkpoint right after, and the first `normal_` on a meta tensor imports
    torch._dynamo (1.2 s of a 1.4B model's 1.3 s load)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def assemble(
    cfg: LoopConfig,
    mapped: dict[str, tuple[str, Tensor]],
    source: TensorSource,
    dtype: Optional[torch.dtype] = None,
    device: Optional[str | torch.device] = None,
    tokenizer: Any = None,
    model_cls: Optional[type] = None,
) -> HookedLoopedTransformer:
    """Build the model of the config's family (or `model_cls`) from
    `{our_name: (source_name, tensor)}`.

    Every parameter must be mapped with a floating-point tensor of the right shape; tensors the
    model does not use (left untaken, or mapped to no parameter) are reported in one warning.
    Nothing partial is returned: any problem raises LoadError. `mapped` and `source` are consumed
    (emptied) so that no second copy of the weights stays alive while they are converted.
    """
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise LoadError(f"dtype={dtype!r} is not a floating-point weight dtype; use one of {list(WEIGHT_DTYPES)}")
    try:
        with torch.device("meta"), _no_init():
            model = (model_cls or model_class(cfg.family))(cfg, tokenizer=tokenizer)
    except (TypeError, RuntimeError, OverflowError) as err:  # sizes too large for a tensor shape
        raise LoadError(
            f"cannot build a model of this config (d_model={cfg.d_model}, d_mlp={cfg.d_mlp}, d_vocab={cfg.d_vocab}, "
            f"n_heads={cfg.n_heads}, d_head={cfg.d_head}): {str(err).splitlines()[0]}"
        ) from err
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("unembed.weight", None)
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise LoadError(f"{source.origin} provides no tensor for parameter(s) {missing[:5]} of this {cfg.family} config")
    for name, want in expected.items():
        src_name, tensor = mapped[name]
        if tensor.dtype not in WEIGHT_DTYPES:
            raise LoadError(
                f"tensor {src_name!r} in {source.origin} has dtype {tensor.dtype}; weights must be one of "
                f"{[str(d) for d in WEIGHT_DTYPES]} (a quantized or corrupt file?)"
            )
        if tuple(tensor.shape) != tuple(want.shape):
            raise LoadError(
                f"tensor {src_name!r} in {source.origin} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(want.shape)} for this config"
            )
    dtype = dtype or mapped["embed.weight"][1].dtype
    used = {src for ours, (src, _) in mapped.items() if ours in expected}
    extra = sorted(set(source.unused()) | ({src for src, _ in mapped.values()} - used))
    state = _convert(expected, mapped, source, dtype, device)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if cfg.tie_embeddings:
        model.unembed.weight = model.embed.weight
    if model.rotary is not None:
        model.rotary = Rotary(cfg)
    model.setup()
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
