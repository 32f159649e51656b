"""The exceptions and warnings loop_lens raises, in one module every layer can import."""

from __future__ import annotations


class ConfigError(ValueError):
    """A LoopConfig whose fields contradict each other, have the wrong type, or name an unknown option."""


class LoadError(ValueError):
    """A checkpoint that cannot be turned into a model; the message names the problem."""


class SaveError(ValueError):
    """A save that would lose or mix data (a foreign folder, an output that is also an input)."""


class UnexpectedTensorsWarning(UserWarning):
    """The checkpoint holds tensors the adapter did not use."""


class NonFiniteWeightsWarning(UserWarning):
    """The checkpoint holds weights that are NaN or infinite."""


class HookError(ValueError):
    """A hook returned something that cannot replace the activation it was given."""


class RunOptionError(TypeError, ValueError):
    """A run keyword this model's family does not take (a TypeError, as Python's own for an
    unexpected keyword, and a ValueError, as every bad argument here)."""


class HookNameError(KeyError, ValueError):
    """A hook name that names no hook point of the model (or none that runs in this forward)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


__all__ = ["ConfigError", "HookError", "HookNameError", "LoadError", "NonFiniteWeightsWarning", "RunOptionError", "SaveError",
           "UnexpectedTensorsWarning"]
