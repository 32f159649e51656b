"""The hooked looped transformer, its components and hook names."""

from loop_lens.model.looped import HookedLoopedTransformer
from loop_lens.model.names import hook_name, parse_hook_name

__all__ = ["HookedLoopedTransformer", "hook_name", "parse_hook_name"]
