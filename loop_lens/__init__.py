"""loop_lens: TransformerLens-style interpretability for looped language models."""

from loop_lens import analysis, interop, patching, testing, viz, zoo
from loop_lens.adapters import KNOWN_FAMILIES, from_bridge, from_hf, load, loop
from loop_lens.cache import LoopCache
from loop_lens.config import LoopConfig
from loop_lens.errors import (
    ConfigError,
    HookError,
    HookNameError,
    LoadError,
    NonFiniteWeightsWarning,
    SaveError,
    UnexpectedTensorsWarning,
)
from loop_lens.generation import GenerationResult
from loop_lens.model.looped import HookedLoopedTransformer
from loop_lens.model.names import hook_name, parse_hook_name

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "GenerationResult",
    "HookError",
    "HookNameError",
    "SaveError",
    "UnexpectedTensorsWarning",
    "NonFiniteWeightsWarning",
    "analysis",
    "interop",
    "testing",
    "patching",
    "viz",
    "zoo",
    "HookedLoopedTransformer",
    "KNOWN_FAMILIES",
    "LoadError",
    "LoopCache",
    "LoopConfig",
    "from_bridge",
    "from_hf",
    "hook_name",
    "load",
    "loop",
    "parse_hook_name",
]
