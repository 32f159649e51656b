"""Lenses: next-token logits read off any hidden state of a looped run (Lu et al. 2025 on Huginn;
the paper's section 3), and the lens of the state leaving each iteration.

A `Lens` is bound to one model and maps a hidden state `[..., pos, d_model]` to logits
`[..., pos, d_vocab]`. It is told where the state was read (`hook`, a hook name such as
`iter.3.blocks.1.hook_resid_post`), so the logit lens knows when the model has normed the state
already, and a lens trained per site can pick its parameters from it: a tuned lens (a learned
translator per (iteration, layer) in front of the logit lens) is a subclass of `Lens` whose
`__call__` reads the hook name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from loop_lens.analysis import _checks
from loop_lens.analysis._types import LoopedModel, Mask
from loop_lens.analysis.result import Result, long_frame
from loop_lens.cache import LoopCache
from loop_lens.model.hooks import NO_HOOKS
from loop_lens.model.names import hook_name, parse_hook_name
from loop_lens.tokenization import decode_each


class Lens(ABC):
    """A map from a hidden state of `model` to next-token logits."""

    name: ClassVar[str]
    """Short name, as analyses accept it in place of an instance (`lens="logit"`)."""
    pointwise: ClassVar[bool]
    """True when each position's logits depend on that position's state alone, so callers may
    pass only the positions they need."""

    def __init__(self, model: LoopedModel):
        self.model = model

    @abstractmethod
    def __call__(
        self,
        x: Float[Tensor, "*lead pos d_model"],
        hook: Optional[str] = None,
        attention_mask: Optional[Mask] = None,
    ) -> Float[Tensor, "*lead pos d_vocab"]:
        """Logits from `x`, read at hook point `hook` (None: a residual stream not yet normed)."""

    def check_model(self, model: LoopedModel) -> None:
        """Raise ValueError unless this lens can read `model`'s states: the model it was built for
        must have the same config (a lens learned from one model's weights checks those too)."""
        diff = _checks.config_diff(self.model.cfg, model.cfg)
        if diff:
            raise ValueError(f"lens {self!r} was built for a model whose config differs from this model's (lens vs model: {diff})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model.cfg.model_name!r})"


class LogitLens(Lens):
    """`unembed(final_norm(x))`, without the norm where the model has applied it already."""

    name = "logit"
    pointwise = True

    def __call__(
        self,
        x: Float[Tensor, "*lead pos d_model"],
        hook: Optional[str] = None,
        attention_mask: Optional[Mask] = None,
    ) -> Float[Tensor, "*lead pos d_vocab"]:
        """Logits of `x`; `attention_mask` is not needed (each position is read alone). A model
        whose states need more than the final norm (a state of its own width projected back) reads
        them with its own `logit_lens_readout(x, hook, normed)`."""
        own = getattr(self.model, "logit_lens_readout", None)
        if own is not None:
            return own(x, hook, self.normed(hook))
        if self.normed(hook):
            return self.model.unembed(x)
        return self.model.unembed(self.model.ln_final(x, NO_HOOKS))

    def normed(self, hook: Optional[str]) -> bool:
        """True where the model's final norm produced the activation at `hook`: the state leaving
        an iteration of a model that norms every iteration (Ouro's `iter_norm`), and the latent
        handed to the coda after a post-loop norm (Huginn) or an `iter_norm` state."""
        if hook is None:
            return False
        kind, cfg = parse_hook_name(hook).kind, self.model.cfg
        if kind == "hook_state_post":
            return cfg.iter_norm
        return kind == "hook_latent" and (cfg.iter_norm or cfg.norm_after_loop)


class CodaLens(Lens):
    """The rest of the network from x: post-loop norm, coda, final norm, unembedding
    (`model.finish`). For a model without a coda this is the logit lens of a state leaving an
    iteration."""

    name = "coda"
    pointwise = False

    def __call__(
        self,
        x: Float[Tensor, "*lead batch pos d_model"],
        hook: Optional[str] = None,
        attention_mask: Optional[Mask] = None,
    ) -> Float[Tensor, "*lead batch pos d_vocab"]:
        """Logits of `x` [..., batch, pos, d_model]; the coda attends over all positions, so pass
        every position and the attention mask of the run."""
        if isinstance(x, Tensor) and x.ndim > 3:
            return torch.stack([self(xi, hook, attention_mask) for xi in x])
        return self.model.finish(x, attention_mask)


LENSES: dict[str, type[Lens]] = {lens.name: lens for lens in (LogitLens, CodaLens)}


def state_at(model: LoopedModel, cache: LoopCache, hook: str) -> Any:
    """The state a lens reads at `hook` in `cache`: `cache[hook]`, or what the model's own
    `lens_state(cache, hook)` builds there (a family whose layers' outputs are not the whole state:
    e.g. a carry of a partial sum and stored block states, rebuilt from the cache)."""
    own = getattr(model, "lens_state", None)
    return cache[hook] if own is None else own(cache, hook)


def take_positions(state: Any, at: Any) -> Any:
    """`state[:, at]` (positions of a [batch, pos, ...] state); a state of several tensors (a
    NamedTuple such as a carry) is sliced field by field."""
    if isinstance(state, tuple):
        return type(state)(*(part[:, at] for part in state))
    return state[:, at]


def get_lens(model: LoopedModel, lens: Union[str, Lens]) -> Lens:
    """A lens for `model` from a name in `LENSES` or a Lens instance built for a model with the
    same config (`Lens.check_model`)."""
    if isinstance(lens, Lens):
        lens.check_model(model)
        return lens
    if isinstance(lens, str) and lens in LENSES:
        return LENSES[lens](model)
    raise ValueError(f"lens must be one of {sorted(LENSES)} or a Lens instance, got {lens!r}")


def block_lens(model: LoopedModel, lens: Union[str, Lens]) -> Lens:
    """A lens to read block-layer outputs with; the coda lens needs a coda (without one it would
    only repeat the logit lens, or skip the final norm of a model that norms every iteration)."""
    out = get_lens(model, lens)
    if isinstance(out, CodaLens) and model.cfg.n_coda == 0:
        raise ValueError("this model has no coda, so the coda lens of a block layer is not defined; use lens='logit'")
    return out


def vocab_labels(model: LoopedModel) -> Optional[list[str]]:
    """Each token id's text for labels (index = id), when the model carries a tokenizer."""
    if model.tokenizer is None:
        return None
    return decode_each(model.tokenizer, list(range(model.cfg.d_vocab)))


@dataclass(kw_only=True)
class StateLensResult(Result):
    """A lens applied to the state leaving each iteration (`hook_state_post`): full logits per
    (iteration, batch, position)."""

    logits: Float[Tensor, "T B S V"]
    lens: str
    str_tokens: Optional[Sequence[str]] = None

    @property
    def log_probs(self) -> Float[Tensor, "T B S V"]:
        """Log-softmax of the logits, in fp32."""
        return F.log_softmax(self.logits.float(), -1)

    def token(self, token_id: int) -> str:
        """The text of a token id (the id itself without a tokenizer)."""
        return self.str_tokens[token_id] if self.str_tokens is not None else str(token_id)

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, batch, position): top-1 token, its probability, the entropy."""
        logp = self.log_probs
        top = logp.max(-1)
        frame = long_frame(top.indices, ["iteration", "batch", "position"], "top1")
        frame["top1_prob"] = top.values.exp().reshape(-1).cpu().numpy()
        frame["entropy"] = (-(logp.exp() * logp).sum(-1)).reshape(-1).cpu().numpy()
        frame["top1_token"] = [self.token(int(i)) for i in frame["top1"]]
        return frame

    def plot(self, batch: int = 0):
        """Heatmap over (iteration, position) of the top-1 probability, annotated with the token."""
        import plotly.graph_objects as go

        b = _checks.index(batch, "batch", self.logits.shape[1], "batch items")
        top = self.log_probs[:, b].max(-1)  # [T, S]
        z = top.values.exp().cpu().numpy()
        text = [[self.token(int(i)) for i in row] for row in top.indices.tolist()]  # escaped by Result.plot
        fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", colorscale="Blues",
                                   x=[f"pos {s}" for s in range(z.shape[1])], y=[f"t{t}" for t in range(z.shape[0])]))
        fig.update_layout(title=f"{self.lens} lens of each iteration's state: top-1 probability",
                          xaxis_title="position", yaxis_title="iteration")
        return fig


def lens_of_states(
    model: LoopedModel, cache: LoopCache, lens: Union[str, Lens] = "logit", mask: Optional[Mask] = None
) -> StateLensResult:
    """A lens on the state leaving each iteration, `s_t` = `iter.{t}.hook_state_post`."""
    cache = _checks.loop_cache(cache)
    _checks.same_model(model, cache)
    reader = get_lens(model, lens)
    states = cache.stack("hook_state_post")  # [T, B, S, D]
    _checks.not_empty(states.shape[1], states.shape[2])
    mask = _checks.mask_for(mask, states.shape[1], states.shape[2], states.device)
    with torch.no_grad():
        names = [hook_name("state_post", iteration=t) for t in range(states.shape[0])]
        logits = torch.stack([reader(state_at(model, cache, n), n, mask) for n in names])
    return StateLensResult(logits=logits, lens=reader.name, str_tokens=vocab_labels(model))


def logit_lens_of_states(model: LoopedModel, cache: LoopCache, mask: Optional[Mask] = None) -> StateLensResult:
    """Logit lens of each iteration's state, `lm_head(ln_f(s_t))`; for models whose state is normed
    every iteration (Ouro) the norm is not applied twice, so this equals the "exit at step t" logits."""
    return lens_of_states(model, cache, "logit", mask)


def coda_lens(model: LoopedModel, cache: LoopCache, mask: Optional[Mask] = None) -> StateLensResult:
    """Coda lens of each iteration's state: the rest of the network, `lm_head(ln_f(coda(ln_f(s_t))))`
    for Huginn (no inner ln_f for models without a post-loop norm)."""
    return lens_of_states(model, cache, "coda", mask)
