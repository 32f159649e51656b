"""LoopConfig: every looped family's switches in one dataclass, and the one place they are checked.

A looped model is `(n_prelude, n_block x n_loops, n_coda)`: prelude layers run once, the
recurrent block of `n_block` layers runs `n_loops` times, the coda runs once. The families
(Ouro, Huginn, retrofitted recurrence, looped feedforward checkpoints) differ only in the
handful of switches below. `LoopConfig.validate` type- and range-checks every field, so a config
from a checkpoint's `config.json`, a native `loop_config.json` or Python code gets the same checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from loop_lens.errors import ConfigError

NORM_PLACEMENTS = ("pre", "sandwich", "sandwich_resid", "post")
"""Block norm placement.

- ``pre``: ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))`` (Llama, GPT-2).
- ``sandwich``: norm on the sublayer output too, ``x = x + ln1_post(attn(ln1(x)))`` (Ouro).
- ``sandwich_resid``: the residual itself is normalised, ``x = ln1_post(x + attn(ln1(x)))`` (Huginn).
- ``post``: ``x = x + ln1_post(attn(x))`` (OLMo-2).
"""
NORM_TYPES = ("RMS", "LN")
MLP_TYPES = ("swiglu", "gelu", "gelu_new", "relu", "relu2")
INJECTIONS = ("none", "linear", "additive", "diagonal")
INITIAL_STATES = ("embed", "zeros", "trunc_normal")
POSITIONAL = ("rotary", "learned", "none")
ROPE_STYLES = ("rotate_half", "adjacent")
QK_NORMS = ("none", "full", "head")
EXIT_NAMES = ("last", "threshold", "weighted")


def is_integer(value: Any) -> bool:
    """True for an integer (Python or numpy); False for bools, floats and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a finite real number (int or float, numpy too); False for bools, NaN and infinities."""
    if is_integer(value):
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_json_object(value: Any) -> bool:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return False
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Rule:
    """What one field must be: `what` (said in errors), the test, and the Python type it is stored as."""

    what: str
    ok: Callable[[Any], bool]
    cast: Callable[[Any], Any] = lambda v: v


MAX_DEFAULT_LOOPS = 1024
"""The largest default loop count (and L cycles per H cycle) a config may carry; longer runs are asked for with n_loops=."""

POSITIVE_INT = Rule("a positive integer", lambda v: is_integer(v) and v > 0, int)
COUNT = Rule("an integer >= 0", lambda v: is_integer(v) and v >= 0, int)
FLAG = Rule("true or false", lambda v: isinstance(v, bool))
POSITIVE_NUMBER = Rule("a finite number > 0", lambda v: is_number(v) and v > 0, float)
NUMBER = Rule("a finite number", is_number, float)
NON_NEGATIVE_NUMBER = Rule("a finite number >= 0", lambda v: is_number(v) and v >= 0, float)
FRACTION = Rule("a number between 0 and 1", lambda v: is_number(v) and 0 <= v <= 1, float)
TEXT = Rule("a string", lambda v: isinstance(v, str))
NAME = Rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
JSON_OBJECT = Rule("a JSON object (string keys, JSON values)", _is_json_object)
OPTIONAL_JSON_OBJECT = Rule("null or a JSON object", lambda v: v is None or _is_json_object(v))
EXIT = Rule(
    f"one of {list(EXIT_NAMES)} or an iteration index >= 0",
    lambda v: (isinstance(v, str) and v in EXIT_NAMES) or (is_integer(v) and v >= 0),
    lambda v: int(v) if is_integer(v) else v,
)


def choice(options: tuple[str, ...]) -> Rule:
    """A field that must be one of `options`."""
    return Rule(f"one of {list(options)}", lambda v: isinstance(v, str) and v in options)


def show_value(value: Any) -> str:
    """`repr(value)`, cut to 80 characters for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _error(fields: tuple[str, ...], problem: str) -> ConfigError:
    """A ConfigError naming `fields`; `err.fields` and `err.problem` let a loader name its own keys."""
    err = ConfigError(f"{fields[0]}: {problem}" if len(fields) == 1 else problem)
    err.fields, err.problem = fields, problem
    return err


def _rope_scaling_problem(scaling: dict[str, Any]) -> Optional[str]:
    """What is wrong with a `rope_scaling` object, or None (only llama3 scaling is supported)."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        return f"unsupported rope_scaling type {show_value(kind)}; supported: 'llama3'"
    for key, rule in (("factor", POSITIVE_NUMBER), ("original_max_position_embeddings", POSITIVE_INT)):
        if key not in scaling:
            return f"llama3 rope_scaling lacks {key!r}"
        if not rule.ok(scaling[key]):
            return f"llama3 rope_scaling {key!r}: expected {rule.what}, got {show_value(scaling[key])}"
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    for key, value in (("low_freq_factor", low), ("high_freq_factor", high)):
        if not POSITIVE_NUMBER.ok(value):
            return f"llama3 rope_scaling {key!r}: expected {POSITIVE_NUMBER.what}, got {show_value(value)}"
    if high <= low:
        return f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, got {high} and {low}"
    return None


@dataclass
class LoopConfig:
    """Describes one looped transformer. Field names follow TransformerLens where one exists."""

    d_model: int
    n_heads: int
    d_vocab: int
    n_block: int
    n_prelude: int = 0
    n_coda: int = 0
    default_loops: int = 4
    d_head: Optional[int] = None
    n_key_value_heads: Optional[int] = None
    d_mlp: Optional[int] = None
    n_ctx: int = 2048
    # block
    normalization_type: str = "RMS"
    norm_placement: str = "pre"
    norm_eps: float = 1e-6
    mlp_type: str = "swiglu"
    attn_bias: bool = False
    mlp_bias: bool = False
    # attention
    positional_embedding_type: str = "rotary"
    rope_style: str = "rotate_half"
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    qk_bias: bool = False
    qk_norm: str = "none"
    # the loop
    embed_scale: float = 1.0
    injection: str = "none"
    initial_state: str = "embed"
    init_std: float = 0.0
    init_scale: float = 1.0
    iter_norm: bool = False
    """Apply the final norm (same weights) to the state after every iteration (Ouro)."""
    norm_after_loop: bool = False
    """Apply the final norm (same weights) once after the loop, before the coda (Huginn)."""
    final_norm: bool = True
    """Apply the final norm before the unembedding (False when `iter_norm` already did)."""
    exit_gate: bool = False
    early_exit_threshold: float = 1.0
    default_exit: Any = "last"
    """What `model(tokens)` returns when `exit=` is not given, as the checkpoint's own code does by
    default: "last" (the last iteration), "threshold" / "weighted" (Ouro's exits over the gate's
    exit distribution) or an iteration index (Ouro's `early_exit_step`; used when the run has that
    many iterations, "threshold" otherwise)."""
    tie_embeddings: bool = False
    # attention gate, weightless norms, nested recurrence (HRM-Text)
    attn_gate: bool = False
    """A per-head sigmoid gate on the attention output: `o_proj(z * sigmoid(gate_proj(x)))` (HRM-Text)."""
    norm_weight: bool = True
    """Whether the block norms carry a learned weight (False: parameterless RMSNorm, HRM-Text)."""
    l_cycles: int = 0
    """Low-level cycles per iteration (HRM-Text's L_cycles); 0 for every single-timescale family."""
    # bookkeeping
    family: str = "native"
    model_name: str = "loop-lens-model"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_fields(self, allow_unset=("d_head", "n_key_value_heads", "d_mlp"))
        if self.d_head is None:
            if self.d_model % self.n_heads != 0:
                raise _error(
                    ("n_heads", "d_model"),
                    f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                    "give d_head explicitly or pick a divisor",
                )
            self.d_head = self.d_model // self.n_heads
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        self.validate()
        for name, rule in FIELD_RULES.items():  # numpy scalars -> Python numbers, so JSON round-trips
            setattr(self, name, rule.cast(getattr(self, name)))

    def validate(self) -> None:
        """Type- and range-check every field, then their combinations; raise ConfigError naming the
        field(s) (`err.fields`) with the problem (`err.problem`) on the first one that is wrong."""
        _check_fields(self)
        for name in ("default_loops", "l_cycles"):
            if getattr(self, name) > MAX_DEFAULT_LOOPS:
                raise _error((name,), f"{name}={getattr(self, name)} is not a usable default loop count (at most "
                             f"{MAX_DEFAULT_LOOPS}: every run without n_loops= would take that many iterations); "
                             "run longer with n_loops= / --n-loops instead")
        if self.n_heads % self.n_key_value_heads != 0:
            raise _error(
                ("n_key_value_heads", "n_heads"),
                f"n_key_value_heads={self.n_key_value_heads} does not divide n_heads={self.n_heads}",
            )
        if self.positional_embedding_type == "rotary" and self.d_head % 2 != 0:
            raise _error(("d_head", "positional_embedding_type"), f"rotary embeddings need an even d_head, got {self.d_head}")
        if self.rope_scaling is not None:
            problem = _rope_scaling_problem(self.rope_scaling)
            if problem:
                raise _error(("rope_scaling",), problem)
        if self.iter_norm and self.norm_after_loop:
            raise _error(("iter_norm", "norm_after_loop"), "iter_norm and norm_after_loop both set: pick one")
        if self.l_cycles > 0 and (self.n_prelude or self.n_coda or self.injection != "additive"):
            raise _error(
                ("l_cycles", "n_prelude", "n_coda", "injection"),
                f"l_cycles={self.l_cycles} (nested recurrence) needs n_prelude=0, n_coda=0 and injection='additive', "
                f"got {self.n_prelude}, {self.n_coda} and {self.injection!r}",
            )
        if not self.norm_weight and self.normalization_type != "RMS":
            raise _error(("norm_weight", "normalization_type"), "norm_weight=False (parameterless norm) needs RMS norms")
        if self.default_exit != "last" and not self.exit_gate:
            raise _error(
                ("default_exit", "exit_gate"),
                f"default_exit={self.default_exit!r} needs exit_gate=True (an iteration index falls back to "
                "the threshold exit on shorter runs)",
            )

    @property
    def n_layers(self) -> int:
        """Layers stored in the checkpoint (the recurrent block counted once)."""
        return self.n_prelude + self.n_block + self.n_coda

    def depth(self, n_loops: Optional[int] = None, l_cycles: Optional[int] = None) -> int:
        """Unrolled depth: prelude, then `n_loops` copies of the block, then the coda. A nested
        (HRM) loop runs the L stack `l_cycles` times (default `self.l_cycles`) per H cycle."""
        t = self.default_loops if n_loops is None else n_loops
        low = self.l_cycles if l_cycles is None else l_cycles
        return self.n_prelude + t * self.n_block * (low + 1) + self.n_coda

    @property
    def layout(self) -> str:
        """The paper's notation `(p, k x T, c)`; a nested (HRM) loop adds its L cycles per H cycle."""
        nested = f", L stack {self.n_block} x {self.l_cycles} per H cycle" if self.l_cycles else ""
        return f"({self.n_prelude}, {self.n_block} x {self.default_loops}, {self.n_coda}{nested})"

    @property
    def attn_scale(self) -> float:
        """The attention logits' scale, 1 / sqrt(d_head)."""
        return 1.0 / math.sqrt(self.d_head)

    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain Python values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopConfig:
        """From a dict of fields; unknown or missing fields raise ConfigError naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"a LoopConfig is an object of fields, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields}, key=str)
        if unknown:
            raise _error(tuple(map(str, unknown)), f"unknown LoopConfig fields: {unknown}")
        required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise _error(tuple(missing), f"LoopConfig lacks required fields: {missing}")
        return cls(**data)

    def to_json(self, path: Optional[str | Path] = None) -> str:
        """The config as JSON text; written to `path` too when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> LoopConfig:
        """From a JSON string or a path to a JSON file; text that is not JSON raises ConfigError."""
        text = str(text_or_path)
        where = "the text"
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            where = str(text_or_path)
            text = Path(text_or_path).read_text()
        from loop_lens.files import JSONFileError, parse_json

        try:
            data = parse_json(text, where)
        except JSONFileError as err:
            raise ConfigError(str(err)) from err
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> LoopConfig:
        """A copy with some fields changed, checked like a new config."""
        return dataclasses.replace(self, **changes)


FIELD_RULES: dict[str, Rule] = {
    "d_model": POSITIVE_INT,
    "n_heads": POSITIVE_INT,
    "d_vocab": POSITIVE_INT,
    "n_block": POSITIVE_INT,
    "n_prelude": COUNT,
    "n_coda": COUNT,
    "default_loops": POSITIVE_INT,
    "d_head": POSITIVE_INT,
    "n_key_value_heads": POSITIVE_INT,
    "d_mlp": POSITIVE_INT,
    "n_ctx": POSITIVE_INT,
    "normalization_type": choice(NORM_TYPES),
    "norm_placement": choice(NORM_PLACEMENTS),
    "norm_eps": POSITIVE_NUMBER,
    "mlp_type": choice(MLP_TYPES),
    "attn_bias": FLAG,
    "mlp_bias": FLAG,
    "positional_embedding_type": choice(POSITIONAL),
    "rope_style": choice(ROPE_STYLES),
    "rope_theta": POSITIVE_NUMBER,
    "rope_scaling": OPTIONAL_JSON_OBJECT,
    "qk_bias": FLAG,
    "qk_norm": choice(QK_NORMS),
    "embed_scale": NUMBER,
    "injection": choice(INJECTIONS),
    "initial_state": choice(INITIAL_STATES),
    "init_std": NON_NEGATIVE_NUMBER,
    "init_scale": NUMBER,
    "iter_norm": FLAG,
    "norm_after_loop": FLAG,
    "final_norm": FLAG,
    "exit_gate": FLAG,
    "early_exit_threshold": FRACTION,
    "default_exit": EXIT,
    "tie_embeddings": FLAG,
    "attn_gate": FLAG,
    "norm_weight": FLAG,
    "l_cycles": COUNT,
    "family": NAME,
    "model_name": TEXT,
    "extra": JSON_OBJECT,
}
"""The rule each LoopConfig field is checked against (every field has one)."""


def _check_fields(cfg: LoopConfig, allow_unset: tuple[str, ...] = ()) -> None:
    """Raise ConfigError for the first field (in declaration order) that breaks its rule."""
    for name, rule in FIELD_RULES.items():
        value = getattr(cfg, name)
        if value is None and name in allow_unset:
            continue
        if not rule.ok(value):
            if rule.what.startswith("one of") and isinstance(value, str):  # a misspelt option
                raise _error((name,), f"unknown {name} {show_value(value)}; expected {rule.what}")
            raise _error((name,), f"expected {rule.what}, got {show_value(value)}")
