"""LoopConfig: every looped family's switches in one dataclass.

A looped model is `(n_prelude, n_block x n_loops, n_coda)`: prelude layers run once, the
recurrent block of `n_block` layers runs `n_loops` times, the coda runs once. The families in
`shared/docs/looped-architectures.md` differ only in the handful of switches below.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    # bookkeeping
    family: str = "native"
    model_name: str = "loop-lens-model"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_head is None:
            if self.n_heads <= 0 or self.d_model % self.n_heads != 0:
                raise ConfigError(
                    f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                    "give d_head explicitly or pick a divisor"
                )
            self.d_head = self.d_model // self.n_heads
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field that is wrong."""
        for name, value, allowed in [
            ("norm_placement", self.norm_placement, NORM_PLACEMENTS),
            ("normalization_type", self.normalization_type, NORM_TYPES),
            ("mlp_type", self.mlp_type, MLP_TYPES),
            ("injection", self.injection, INJECTIONS),
            ("initial_state", self.initial_state, INITIAL_STATES),
            ("positional_embedding_type", self.positional_embedding_type, POSITIONAL),
            ("rope_style", self.rope_style, ROPE_STYLES),
            ("qk_norm", self.qk_norm, QK_NORMS),
        ]:
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
        for name in ("d_model", "n_heads", "d_vocab", "n_block", "d_head", "d_mlp", "n_ctx"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_prelude", "n_coda"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.default_loops < 1:
            raise ConfigError(f"default_loops must be >= 1, got {self.default_loops}")
        if self.n_key_value_heads <= 0 or self.n_heads % self.n_key_value_heads != 0:
            raise ConfigError(
                f"n_key_value_heads={self.n_key_value_heads} does not divide n_heads={self.n_heads}"
            )
        if self.positional_embedding_type == "rotary" and self.d_head % 2 != 0:
            raise ConfigError(f"rotary embeddings need an even d_head, got {self.d_head}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(f"unsupported rope_scaling type {kind!r}; supported: 'llama3'")
        if self.initial_state == "trunc_normal" and self.init_std < 0:
            raise ConfigError(f"init_std must be >= 0, got {self.init_std}")
        if self.iter_norm and self.norm_after_loop:
            raise ConfigError("iter_norm and norm_after_loop both set: pick one")

    @property
    def n_layers(self) -> int:
        """Layers stored in the checkpoint (the recurrent block counted once)."""
        return self.n_prelude + self.n_block + self.n_coda

    def depth(self, n_loops: Optional[int] = None) -> int:
        """Unrolled depth: prelude, then `n_loops` copies of the block, then the coda."""
        t = self.default_loops if n_loops is None else n_loops
        return self.n_prelude + t * self.n_block + self.n_coda

    @property
    def layout(self) -> str:
        """The paper's notation `(p, k x T, c)`."""
        return f"({self.n_prelude}, {self.n_block} x {self.default_loops}, {self.n_coda})"

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.d_head)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LoopConfig fields: {unknown}")
        return cls(**data)

    def to_json(self, path: Optional[str | Path] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> LoopConfig:
        """From a JSON string or a path to a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> LoopConfig:
        return dataclasses.replace(self, **changes)
