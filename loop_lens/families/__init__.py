"""Looped-model families whose passes are more than the plain loop's one stack.

Each family is one module here (its model class: what a pass computes, its schedule, its hook
sites) plus one adapter in `loop_lens/adapters/`; `register` names its model class, so loading,
saving and the zoo build it without naming it. The plain loop (Ouro, Huginn, retrofitted,
looped feedforward checkpoints) is `HookedLoopedTransformer` itself.
"""

from __future__ import annotations

import importlib

_MODEL_CLASSES: dict[str, tuple[str, str]] = {}
RUN_OPTIONS: dict[str, str] = {}
"""Families' integer run keywords (as `forward` takes them) -> help text; the CLI offers each as
`--name` on the commands that run a model."""


def register(family: str, module: str, name: str) -> None:
    """Models of `family` (`LoopConfig.family`) are instances of `module.name`."""
    _MODEL_CLASSES[family] = (module, name)


def model_class(family: str) -> type:
    """The model class of a family (`HookedLoopedTransformer` for the plain loop)."""
    module, name = _MODEL_CLASSES.get(family, ("loop_lens.model.looped", "HookedLoopedTransformer"))
    return getattr(importlib.import_module(module), name)


def register_run_option(name: str, help: str) -> None:
    """A family's integer run keyword, offered on the command line as `--name` (underscores as dashes)."""
    RUN_OPTIONS[name] = help


register("hrm_text", "loop_lens.families.hrm", "HookedHrmTransformer")
register("dory", "loop_lens.families.dory", "HookedDoryTransformer")
register("parcae", "loop_lens.families.parcae", "HookedParcaeTransformer")
register("inkling2", "loop_lens.families.inkling2", "HookedInkling2Transformer")
register_run_option("l_cycles", "nested (HRM) models: L cycles per H cycle (default: the model's own; --n-loops sets the H cycles)")
