"""Reading checkpoints safely, and assembling a model from mapped tensors.

Nothing here imports or runs code from a checkpoint directory: weights come from safetensors
first, `torch.load(weights_only=True)` otherwise; configs are parsed as JSON. Files may be
symlinks (the Hugging Face cache keeps them as links into its `blobs/` folder), but an index
may only name plain file names inside the checkpoint directory.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from loop_lens.config import LoopConfig, Rule, show_value
from loop_lens.errors import ConfigError, LoadError, NonFiniteWeightsWarning, UnexpectedTensorsWarning
from loop_lens.families import model_class
from loop_lens.files import checkpoint_file, is_plain_file_name, parse_json, read_json
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
    data = read_json(checkpoint_file(directory, "config.json"))
    if not isinstance(data, dict):
        raise LoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _ST_DTYPES["U" + _name[4:]] = getattr(torch, _name)


def read_safetensors(path: Path, only: Optional[Iterable[str]] = None) -> dict[str, Tensor]:
    """The tensors of a safetensors file (those named in `only`, when given), read into memory
    the process owns.

    The `safetensors` library checks the header first (a lying header is refused there); then
    the file is read once, front to back, each tensor straight into its own buffer. Nothing stays
    memory-mapped: a file truncated or rewritten after loading cannot crash the process (SIGBUS)
    or change the weights, and reading is linear in the number of tensors.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:  # validates the header against the file
            names = set(handle.keys())
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = parse_json(f.read(size).decode("utf-8"), f"the header of {path}")
            wanted = names if only is None else names & set(only)
            entries = sorted(((k, header[k]) for k in wanted), key=lambda kv: kv[1]["data_offsets"][0])
            tensors = {}
            for name, entry in entries:
                dtype = _ST_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise LoadError(f"tensor {name!r} in {path} has dtype {entry['dtype']}, which loop_lens does not read")
                start, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=dtype)
                if end > start:
                    f.seek(8 + size + start)
                    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                    if f.readinto(view) != end - start:
                        raise LoadError(f"{path} ended inside tensor {name!r} (the file changed while it was read?)")
                tensors[name] = tensor
        return tensors
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        if isinstance(err, LoadError):
            raise
        raise LoadError(f"cannot read {path} (truncated or corrupt safetensors file?): {err}") from err


def _read_index(index: Path, directory: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The shard files a safetensors index names (each a plain file name in `directory`), by
    name, and its weight map (tensor name -> shard name)."""
    data = read_json(index, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
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
        shards[shard] = checkpoint_file(directory, shard)
    return {name: shards[name] for name in sorted(shards)}, weight_map


_UNSAFE_ADVICE = ("weights_only", "trust", "safe_globals", "arbitrary code", "add_safe_globals")


def _pickle_problem(err: BaseException) -> str:
    """What torch's refusal of a pickle says is wrong, without its advice to load the file with
    `weights_only` turned off (which would run the file's code): the unpickler's own line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0].strip()
    safe = [line for line in lines if not any(word in line.lower() for word in _UNSAFE_ADVICE)]
    return safe[0] if safe else type(err).__name__


def read_tensors(directory: Path) -> tuple[dict[str, Tensor], str]:
    """All tensors of a checkpoint directory, and a description of where they came from."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    bin_file = directory / "pytorch_model.bin"
    if single.is_file():
        return read_safetensors(checkpoint_file(directory, single.name)), str(single)
    if index.is_file():
        shards, weight_map = _read_index(checkpoint_file(directory, index.name), directory)
        tensors: dict[str, Tensor] = {}
        ignored: list[str] = []
        for shard, path in shards.items():
            listed = {name for name, where in weight_map.items() if where == shard}
            part = read_safetensors(path, only=listed)
            tensors.update(part)
            ignored += _unlisted(path, listed)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise LoadError(f"shards lack tensors their index lists: {missing[:5]}")
        if ignored:
            warnings.warn(
                f"{len(ignored)} tensor(s) in the shards of {index} are not mapped to their shard by the index and "
                f"were ignored (the index decides which copy is read): {ignored[:8]}{' ...' if len(ignored) > 8 else ''}",
                UnexpectedTensorsWarning, stacklevel=3)
        return tensors, str(index)
    if bin_file.is_file():
        path = checkpoint_file(directory, bin_file.name)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad pickles
            raise LoadError(f"refused to read {bin_file}: it is not a plain tensor file, so torch.load(weights_only=True) "
                            f"refused it ({_pickle_problem(err)}). loop_lens never runs code from a checkpoint; convert the "
                            "weights to safetensors on a machine you trust") from None
        if not isinstance(state, dict):
            raise LoadError(f"{bin_file} does not hold a state dict")
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        if bad:
            raise LoadError(f"{bin_file} holds entries that are not named tensors: {bad[:5]}")
        odd = [f"{k} ({'meta' if v.is_meta else v.layout})" for k, v in state.items()
               if v.is_meta or v.layout != torch.strided]
        if odd:
            raise LoadError(f"{bin_file} holds tensors with no dense values (sparse or meta): {odd[:5]}; "
                            "weights must be dense tensors")
        return state, str(bin_file)
    raise LoadError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def _unlisted(path: Path, listed: set[str]) -> list[str]:
    """Tensor names in shard `path` that its index does not map to it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return sorted(set(handle.keys()) - listed)


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

    def replace(self, name: str, tensor: Tensor) -> Tensor:
        """Hold `tensor` under a taken `name` instead of what was read (the form the model keeps,
        e.g. re-laid-out rows), so the source keeps no second copy until it is consumed; returns it."""
        self.take(name)
        self.tensors[name] = tensor
        return tensor

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


def check_sizes_against_tensors(cfg: LoopConfig, mapped: dict[str, tuple[str, Tensor]], source: TensorSource) -> None:
    """Refuse, before any module is built, a config whose sizes need more weights than the files
    hold: every layer has at least its query and output projections and two MLP matrices, and
    there is an embedding. A layer count or width that no file could back (10**8 layers) is an
    error here in microseconds instead of a model built for hours."""
    layers = cfg.n_prelude + cfg.n_block + cfg.n_coda
    per_layer = 2 * cfg.d_model * cfg.n_heads * cfg.d_head + 2 * cfg.d_model * cfg.d_mlp
    need = layers * per_layer + cfg.d_vocab * cfg.d_model
    have = sum(t.numel() for _, t in mapped.values()) + sum(t.numel() for t in source.tensors.values())
    if need > have:
        fields = ", ".join(f"{f}={getattr(cfg, f)}" for f in ("d_model", "d_mlp", "d_vocab", "n_heads", "d_head",
                                                                "n_prelude", "n_block", "n_coda"))
        raise LoadError(f"cannot build a model of this config ({fields}): it needs at least {need:,} weights, but "
                        f"{source.origin} holds {have:,}; the config's sizes do not match the weights")


def all_finite(tensor: Tensor, chunk: int = 1 << 20) -> bool:
    """Whether every value of `tensor` is finite, read in slices of `chunk` values: an fp32 sum
    per slice (a NaN or infinity makes it non-finite), with `torch.isfinite` on a slice whose sum
    is not finite (finite values can overflow the sum). Neither makes a temporary the size of
    the tensor: `torch.isfinite(t).all()` on a 4B-parameter model's weights allocated twice one
    bf16 matrix and ran 30 times slower."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        if not math.isfinite(part.sum(dtype=torch.float32).item()) and not bool(torch.isfinite(part).all()):
            return False
    return True


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
    non_finite = []
    for name in expected:
        src_name, tensor = mapped.pop(name)
        source.tensors.pop(src_name, None)
        state[name] = tensor.to(device=device, dtype=dtype).contiguous()
        if not all_finite(tensor):
            non_finite.append(src_name)
        del tensor
    mapped.clear()  # tensors mapped to no parameter (already reported as unused)
    source.tensors.clear()
    if non_finite:
        warnings.warn(f"{len(non_finite)} tensor(s) in {source.origin} hold NaN or infinite values: "
                      f"{non_finite[:8]}{' ...' if len(non_finite) > 8 else ''}; the model's outputs will not be finite",
                      NonFiniteWeightsWarning, stacklevel=4)
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


def check_weight_dtype(dtype: Any) -> None:
    """A load dtype: None (the checkpoint's) or a floating-point weight dtype; LoadError otherwise."""
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise LoadError(f"dtype={dtype!r} is not a floating-point weight dtype; use one of {list(WEIGHT_DTYPES)}")


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
    check_weight_dtype(dtype)
    check_sizes_against_tensors(cfg, mapped, source)
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
