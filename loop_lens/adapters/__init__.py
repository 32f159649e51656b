"""Turn checkpoints into HookedLoopedTransformers: `load`, `loop`, `from_hf`, `from_bridge`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from loop_lens.adapters import dory, families, hrm_text, inkling2, parcae
from loop_lens.adapters.io import TensorSource, assemble, read_config, read_safetensors, read_tensors
from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, LoadError, UnexpectedTensorsWarning
from loop_lens.model.looped import HookedLoopedTransformer
from loop_lens.saving import CONFIG_NAME, native_files
from loop_lens.tokenization import load_tokenizer, read_tokenizer
from loop_lens.zoo import zoo_path

# families with a model class of their own: family -> build(config, tensors, dtype=, device=, tokenizer=, origin=)
BUILDERS: dict[str, Any] = {"hrm_text": hrm_text.build, "dory": dory.build, "parcae": parcae.build, "inkling2": inkling2.build}
# the load options a family's builder takes beyond dtype / device (ll.load(path, **options))
LOAD_OPTIONS: dict[str, tuple[str, ...]] = {"inkling2": ("packed_experts",)}
KNOWN_FAMILIES = ("native", *families.LOOPED_FAMILIES, *BUILDERS, "zoo")

__all__ = ["load", "loop", "from_hf", "from_bridge", "detect_family", "LoadError", "UnexpectedTensorsWarning", "KNOWN_FAMILIES"]


def detect_family(config: dict[str, Any], tensors: dict[str, Any]) -> str:
    """The family of a checkpoint, from its config.json and tensor names."""
    kind = config.get("model_type")
    if kind in ("hrm_text", "dory"):
        return kind
    if kind in inkling2.MODEL_TYPES:
        return "inkling2"
    if config.get("_class_name") == "ParcaeConfig":  # before Huginn: both name their core transformer.core_block
        return "parcae"
    if kind == "ouro" or "model.layers.0.input_layernorm_2.weight" in tensors:
        return "ouro"
    if kind == "huginn_raven" or any(k.startswith("transformer.core_block.") for k in tensors):
        return families.raven_flavour(tensors)
    if kind in families.FEEDFORWARD_TYPES:
        raise LoadError(
            f"this is a feedforward {kind} checkpoint, not a looped one: use "
            "ll.loop(path, block=(a, b), n_loops=T) to loop layers [a, b)"
        )
    raise LoadError(
        f"cannot tell the family of this checkpoint (model_type={kind!r}); known families: "
        f"{list(KNOWN_FAMILIES)}; pass family= to name one"
    )


def _resolve_dir(path: Union[str, Path]) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise LoadError(f"{p} is a file; give the checkpoint directory")
        return p
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _snapshot(text)
    raise LoadError(f"checkpoint path does not exist: {p}")


def _snapshot(repo_id: str) -> Path:
    """Download a hub checkpoint's config, weights and tokenizer (no code files)."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "tokenizer*"])
    except Exception as err:  # offline, unknown repo, ...
        raise LoadError(f"{repo_id!r} is not a local directory and could not be fetched from the hub: {err}") from err
    return Path(local)


def load(
    path: Union[str, Path],
    family: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    **options: Any,
) -> HookedLoopedTransformer:
    """Load a looped checkpoint directory (or `zoo:<name>`, or a hub id when online).

    The family is detected from config.json and tensor names unless `family=` names it. No code
    from the checkpoint is imported or executed. bf16 checkpoints stay bf16 unless `dtype=` says
    otherwise. `options` are the family's own load options (`LOAD_OPTIONS`: Inkling 2's
    `packed_experts=True` keeps quantized experts packed); any other keyword raises LoadError.
    """
    _check_device(device)
    text = str(path)
    if options and (family in ("zoo", "native") or text.startswith("zoo:")):
        raise LoadError(f"load options {sorted(options)} are for a family's own checkpoints, not native or zoo models")
    if family == "zoo" or text.startswith("zoo:"):
        return load(zoo_path(text.removeprefix("zoo:")), family="native", device=device, dtype=dtype)
    if family is not None and family not in KNOWN_FAMILIES:
        raise LoadError(f"unknown family {family!r}; known families: {list(KNOWN_FAMILIES)}")
    directory = _resolve_dir(path)
    if family == "native" or (family is None and (directory / CONFIG_NAME).is_file()):
        if options:
            raise LoadError(f"load options {sorted(options)} are for a family's own checkpoints; {directory} is a "
                            "native loop_lens save")
        cfg, src, tokenizer = _native(directory)
        cfg, mapped = families.native(cfg, src)
    else:
        config = read_config(directory)
        tensors, origin = read_tensors(directory)
        family = family or detect_family(config, tensors)
        unknown = sorted(set(options) - set(LOAD_OPTIONS.get(family, ())))
        if unknown:
            raise LoadError(f"load option(s) {unknown} are not known for family {family!r} (it takes "
                            f"{list(LOAD_OPTIONS.get(family, ())) or 'none'})")
        src = TensorSource(tensors, origin, ignore=["freqs_cis"])
        if family in BUILDERS:
            return BUILDERS[family](config, src, dtype=dtype, device=device, tokenizer=load_tokenizer(directory),
                                    origin=str(directory / "config.json"), **options)
        cfg, mapped = families.LOOPED_FAMILIES[family](config, src)
        tokenizer = load_tokenizer(directory)
    return assemble(cfg, mapped, src, dtype=dtype, device=device, tokenizer=tokenizer)


def _check_device(device: Any) -> None:
    """A device this torch can use, or LoadError naming it (before anything is read)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise LoadError(f"device {device!r} is not a torch device: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"device {device!r}: this torch has no CUDA device available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LoadError(f"device {device!r}: MPS is not available here")


def _native(directory: Path) -> tuple[LoopConfig, TensorSource, Any]:
    """Config, tensors and tokenizer of a native checkpoint. `loop_config.json` names its files
    while a save is under way (`loop_lens.saving`); the plain layout has `model.safetensors` and
    maybe `tokenizer.json`."""
    files = native_files(directory)
    try:
        cfg = LoopConfig.from_dict(files.config)
    except (ConfigError, ValueError, TypeError) as err:
        raise LoadError(f"{directory / CONFIG_NAME} is not a valid LoopConfig: {err}") from err
    if files.weights is None:
        tensors, origin = read_tensors(directory)
        tokenizer = load_tokenizer(directory)
    else:
        tensors, origin = read_safetensors(files.weights), str(files.weights)
        tokenizer = None if files.tokenizer is None else read_tokenizer(files.tokenizer)
    return cfg, TensorSource(tensors, origin), tokenizer


def _config_and_tensors(source: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], str, Any]:
    """(config dict, tensors, origin, tokenizer) of a directory or an in-memory transformers model."""
    if isinstance(source, (str, Path)):
        directory = _resolve_dir(source)
        tensors, origin = read_tensors(directory)
        return read_config(directory), tensors, origin, load_tokenizer(directory)
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        config = source.config.to_dict() if hasattr(source.config, "to_dict") else dict(vars(source.config))
        tensors = {k: v.detach() for k, v in source.state_dict().items()}
        return config, tensors, f"in-memory {type(source).__name__}", getattr(source, "tokenizer", None)
    raise LoadError(f"expected a checkpoint directory or a transformers model, got {type(source).__name__}")


def loop(
    path_or_model: Any,
    block: tuple[int, int],
    n_loops: int = 1,
    injection: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> HookedLoopedTransformer:
    """Loop layers [a, b) of a feedforward checkpoint (Llama / Qwen2 / Mistral / GPT-2 layout):
    layers before `a` become the prelude, the rest after `b` the coda.

    `injection`: None/"none" (iteration t+1 starts from iteration t's output) or "additive"
    (the prelude output is added to the state before every iteration, which starts at zero).
    With `n_loops=1` the model computes exactly the original network.
    """
    _check_device(device)
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise LoadError(f"block={block!r} must be two integers (a, b)")
    native = isinstance(path_or_model, HookedLoopedTransformer) or (
        isinstance(path_or_model, (str, Path)) and (str(path_or_model).startswith("zoo:") or (Path(path_or_model) / CONFIG_NAME).is_file()))
    if native:
        raise LoadError(f"ll.loop takes a feedforward transformers checkpoint (config.json + weights); {path_or_model!r} is a "
                        "loop_lens model, already looped: load it with ll.load and pick n_loops= at run time")
    config, tensors, origin, tokenizer = _config_and_tensors(path_or_model)
    src = TensorSource(tensors, origin, ignore=["lm_head.weight"] if config.get("tie_word_embeddings") else [])
    cfg, mapped = families.feedforward(config, src, tuple(block), n_loops, injection or "none")
    return assemble(cfg, mapped, src, dtype=dtype, device=device, tokenizer=tokenizer)


def from_hf(hf_model: Any, family: Optional[str] = None, device: Any = None, dtype: Any = None) -> HookedLoopedTransformer:
    """Convert an in-memory transformers model (remote-code Ouro / Huginn too) by reading its
    `config` and `state_dict`; none of its code is called. A feedforward model becomes a
    (0, L x 1, 0) loop of all its layers; use `loop` to pick a block."""
    _check_device(device)
    config, tensors, origin, tokenizer = _config_and_tensors(hf_model)
    if family is None and config.get("model_type") in families.FEEDFORWARD_TYPES:
        L = config.get("num_hidden_layers") or config.get("n_layer")
        return loop(hf_model, block=(0, L), n_loops=1, device=device, dtype=dtype)
    family = family or detect_family(config, tensors)
    if family in BUILDERS:
        return BUILDERS[family](config, TensorSource(tensors, origin), dtype=dtype, device=device, tokenizer=tokenizer,
                                origin=origin)
    if family not in families.LOOPED_FAMILIES:
        raise LoadError(f"unknown family {family!r}; known families: {list(families.LOOPED_FAMILIES)}")
    src = TensorSource(tensors, origin, ignore=["freqs_cis"])
    cfg, mapped = families.LOOPED_FAMILIES[family](config, src)
    return assemble(cfg, mapped, src, dtype=dtype, device=device, tokenizer=tokenizer)


def from_bridge(bridge: Any, family: Optional[str] = None, device: Any = None, dtype: Any = None) -> HookedLoopedTransformer:
    """Convert a TransformerLens 4 `TransformerBridge` of a looped model: its wrapped transformers
    model is read like `from_hf`, and the bridge's tokenizer is kept."""
    hf_model = getattr(bridge, "original_model", None)
    if hf_model is None:
        raise LoadError("this object has no original_model; is it a TransformerBridge?")
    model = from_hf(hf_model, family=family, device=device, dtype=dtype)
    if model.tokenizer is None:
        model.tokenizer = getattr(bridge, "tokenizer", None)
    return model
