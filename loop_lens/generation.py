"""Generation for looped models: TransformerLens's `generate`, a KV cache per (iteration, block
layer), and per-token adaptive compute (Huginn's exit criteria, Ouro's exit gate).

Semantics (`docs/generation.md` has the details):

- Batches run left-padded (right-padded or text input is re-laid out), with per-row positions that
  start at 0 on each row's first real token, so a prompt gives the same tokens alone and in a batch.
- The cache keeps keys and values (after RoPE) for every prelude layer, every (iteration, block
  layer) and every coda layer. With a fixed iteration count, cached generation equals
  recomputing the whole sequence at every step.
- Adaptive compute: each new token iterates until its criterion fires (checked after every
  iteration on the row's last position; the prompt exits as one group). A position that stopped
  after k iterations offers, at every later iteration t >= k, the keys and values it computed at
  iteration k - 1 of the same block layer (the reference's "latest" KV lookup). The coda cache
  holds each position's coda keys from the state it exited with.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional, Union

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from loop_lens.checks import check_n_loops, integer, positive_int
from loop_lens.model.hooks import NO_HOOKS
from loop_lens.result import Result

ADAPTIVE = ("kl", "entropy", "argmax", "gate")
DEFAULT_THRESHOLDS = {"kl": 1e-3, "entropy": 1e-3, "argmax": 5}  # the reference's "auto" values
INITIAL_STATES = ("zeros", "embed")
RETURN_TYPES = ("input", "str", "tokens", "result")
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")

Site = tuple  # ("prelude", l) | ("iter", t, l) | ("coda", t or None, l)


class KVCache:
    """Keys and values after RoPE, [batch, kv_head, pos, d_head], per site, and the key mask."""

    def __init__(self) -> None:
        """An empty cache."""
        self.k: dict[Site, Tensor] = {}
        self.v: dict[Site, Tensor] = {}
        self.mask: Optional[Tensor] = None  # [batch, pos], 1 for real tokens
        self.length = 0

    def past(self, site: Site) -> Optional[tuple[Tensor, Tensor]]:
        """The cached keys and values of a site, or None before the first commit."""
        return (self.k[site], self.v[site]) if site in self.k else None

    def commit(self, kv: dict[Site, tuple[Tensor, Tensor]], mask: Tensor) -> None:
        """Append one step's keys and values (every site) and its positions' mask."""
        for site, (k, v) in kv.items():
            self.k[site] = k if site not in self.k else torch.cat([self.k[site], k], dim=2)
            self.v[site] = v if site not in self.v else torch.cat([self.v[site], v], dim=2)
        self.mask = mask if self.mask is None else torch.cat([self.mask, mask], dim=1)
        self.length += mask.shape[1]


class _SiteView:
    """What attention at one site sees in one step: the cached keys and values, and (adaptive
    compute) which positions still iterate; a frozen position offers its last computed keys."""

    def __init__(self, past: Optional[tuple[Tensor, Tensor]], live: Optional[Tensor] = None,
                 last: Optional[tuple[Tensor, Tensor]] = None):
        """`past` cached keys/values, `live` [batch, pos] positions still iterating, `last` their
        keys/values at the previous iteration of this layer."""
        self.past, self.live, self.last = past, live, last
        self.new: Optional[tuple[Tensor, Tensor]] = None

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """This call's keys and values (frozen positions replaced), after the cached ones."""
        if self.live is not None and self.last is not None and not bool(self.live.all()):
            m = self.live[:, None, :, None]
            k, v = torch.where(m, k, self.last[0]), torch.where(m, v, self.last[1])
        self.new = (k, v)
        if self.past is None:
            return k, v
        return torch.cat([self.past[0], k], dim=2), torch.cat([self.past[1], v], dim=2)


@dataclass
class _Plan:
    """One generation's settings, checked once."""

    n_loops: int
    exit: Union[str, int]
    adaptive: Optional[str]
    threshold: float

    @property
    def per_iteration_coda(self) -> bool:
        """Whether the next token reads another iteration than the last (Ouro's exits): then the
        coda keeps keys per iteration, as a full forward's coda-lens readouts compute them."""
        return self.adaptive is None and self.exit != "last"


class _Criterion:
    """Huginn's per-iteration exit criteria and Ouro's gate threshold, per row."""

    def __init__(self, kind: str, threshold: float, batch: int, d_vocab: int, device: torch.device):
        """The state before the first iteration, as the reference initialises it."""
        self.kind, self.threshold = kind, threshold
        if kind == "kl":
            self.prev = torch.full((batch, d_vocab), -float(torch.tensor(float(d_vocab)).log()), device=device)
        elif kind == "entropy":
            self.prev = torch.full((batch,), 100.0, device=device)
        elif kind == "argmax":
            self.prev = torch.full((batch,), -1, dtype=torch.long, device=device)
            self.count = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            self.remaining = torch.ones(batch, device=device)
            self.cumulative = torch.zeros(batch, device=device)

    @property
    def needs_logits(self) -> bool:
        """Whether the criterion reads the next-token distribution (all but the gate)."""
        return self.kind != "gate"

    def check(self, logits: Optional[Tensor], gate: Optional[Tensor]) -> Tensor:
        """[batch] bool: rows whose criterion says stop after this iteration."""
        if self.kind == "gate":
            lam = torch.sigmoid(gate.float())
            self.cumulative = self.cumulative + lam * self.remaining
            self.remaining = self.remaining * (1.0 - lam)
            return self.cumulative >= self.threshold
        if self.kind == "argmax":
            top = logits.argmax(-1)
            self.count = torch.where(top == self.prev, self.count + 1, torch.zeros_like(self.count))
            self.prev = top
            return self.count >= self.threshold
        logp = F.log_softmax(logits, dim=-1)
        if self.kind == "kl":  # KL(previous || current), as the reference computes it
            value = (self.prev.exp() * (self.prev - logp)).sum(-1)
            self.prev = logp
            return value < self.threshold
        probs = logp.exp()
        entropy = -(probs * torch.log(probs + 1e-10)).sum(-1)
        value = (entropy - self.prev).abs()
        self.prev = entropy
        return value < self.threshold


def _embed(model: Any, tokens: Tensor, positions: Tensor) -> Tensor:
    """Token (and learned position) embeddings at per-row positions."""
    x = model.hook_embed(model.embed(tokens) * model.cfg.embed_scale)
    if model.cfg.positional_embedding_type == "learned":
        x = x + model.hook_pos_embed(model.pos_embed(positions))
    return x


def _coda_logits(model: Any, s: Tensor, cache: KVCache, rope: Any, key_mask: Optional[Tensor], t: Optional[int],
                 commits: Optional[dict]) -> Tensor:
    """Unhooked readout of a state (post-loop norm, coda reading site ("coda", t, l), final
    norm, unembedding): logits of each row's last position [batch, d_vocab]."""
    x = model._to_coda(s, hooked=False)
    for layer, blk in enumerate(model.coda_blocks):
        view = _SiteView(cache.past(("coda", t, layer)))
        x = blk(x, NO_HOOKS, model.rotary, rope, key_mask, view)
        if commits is not None:
            commits[("coda", t, layer)] = view.new
    return model._unembed(x[:, -1:], hooked=False)[:, 0]


def _advance(
    model: Any,
    plan: _Plan,
    cache: KVCache,
    tokens: Int[Tensor, "batch pos"],
    positions: Int[Tensor, "batch pos"],
    new_mask: Int[Tensor, "batch pos"],
    starts: Union[str, Tensor],
    known: Optional[Int[Tensor, "batch pos"]] = None,
    done: Optional[Tensor] = None,
) -> tuple[Float[Tensor, "batch d_vocab"], Int[Tensor, " batch"]]:
    """Run new positions against the cache, commit their keys and values, and return the next
    token's logits and the iterations the new positions used (per row).

    `known` gives positions whose iteration count is already decided (a recompute of earlier
    steps); the others exit together per row by the adaptive criterion. `done` rows (finished
    sequences) stop after their first iteration."""
    cfg = model.cfg
    B, S = tokens.shape
    T = plan.n_loops
    full_mask = new_mask if cache.mask is None else torch.cat([cache.mask, new_mask], dim=1)
    key_mask = None if bool(full_mask.all()) else full_mask
    rope = model.rotary.at(positions) if model.rotary is not None else None
    commits: dict[Site, tuple[Tensor, Tensor]] = {}

    x = _embed(model, tokens, positions)
    for layer, (blk, hooks) in enumerate(zip(model.prelude_blocks, model.prelude)):
        view = _SiteView(cache.past(("prelude", layer)))
        x = blk(x, hooks, model.rotary, rope, key_mask, view)
        commits[("prelude", layer)] = view.new
    e = x
    s = e if starts == "embed" else torch.zeros_like(e) if starts == "zeros" else starts.to(e.dtype)

    deciding = known is None or bool((known < 0).any())
    criterion = _Criterion(plan.adaptive, plan.threshold, B, cfg.d_vocab, e.device) if plan.adaptive and deciding else None
    unknown = torch.ones(B, S, dtype=torch.bool, device=e.device) if known is None else known < 0
    row_live = torch.ones(B, dtype=torch.bool, device=e.device)
    exits = torch.full((B,), T, dtype=torch.long, device=e.device)
    last: dict[int, tuple[Tensor, Tensor]] = {}
    states, gates = [], []
    for t in range(T):
        live = row_live[:, None].expand(B, S)
        if known is not None:
            live = torch.where(unknown, live, t < known)
        if not bool(live.any()):
            break
        it = model._iteration_hooks(t)
        before = s
        s = it.hook_state_pre(s)
        if model.injection is not None:
            s = it.hook_injected(model.injection(s, e))
        for layer, blk in enumerate(model.blocks):
            view = _SiteView(cache.past(("iter", t, layer)), live, last.get(layer))
            s = blk(s, it.blocks[layer], model.rotary, rope, key_mask, view)
            last[layer] = commits[("iter", t, layer)] = view.new
        if cfg.iter_norm:
            s = model.ln_final(s, it.ln_state)
        s = it.hook_state_post(s)
        gate = it.hook_exit_logit(model.exit_gate(s).squeeze(-1)) if model.exit_gate is not None else None
        s = torch.where(live[..., None], s, before)
        if criterion is not None:
            logits = _coda_logits(model, s, cache, rope, key_mask, None, None).float() if criterion.needs_logits else None
            stop = criterion.check(logits, None if gate is None else gate[:, -1])
            if done is not None:
                stop = stop | done
            new = stop & row_live
            exits = torch.where(new, torch.full_like(exits, t + 1), exits)
            row_live = row_live & ~new
        elif plan.per_iteration_coda:
            states.append(s)
            gates.append(gate[:, -1])
    for t in range(T):  # iterations nobody ran offer each position's last keys and values
        for layer in range(cfg.n_block):
            commits.setdefault(("iter", t, layer), last[layer])

    coda_t = T - 1 if plan.per_iteration_coda else None
    x = model._to_coda(s, hooked=True)
    for layer, (blk, hooks) in enumerate(zip(model.coda_blocks, model.coda)):
        view = _SiteView(cache.past(("coda", coda_t, layer)))
        x = blk(x, hooks, model.rotary, rope, key_mask, view)
        commits[("coda", coda_t, layer)] = view.new
    logits = model._unembed(x)[:, -1]
    if plan.per_iteration_coda:
        logits = _exit_logits(model, plan, states, gates, logits, cache, rope, key_mask, commits)
    if known is not None and not deciding:
        exits = known.max(dim=1).values
    cache.commit(commits, new_mask)
    return logits.float(), exits


def _exit_logits(model: Any, plan: _Plan, states: list[Tensor], gates: list[Tensor], last_logits: Tensor,
                 cache: KVCache, rope: Any, key_mask: Optional[Tensor], commits: dict) -> Tensor:
    """The checkpoint's own exit (Ouro) for the last position: an iteration index, the gate's
    threshold exit or the weighted exit over every iteration's readout."""
    steps = [_coda_logits(model, s, cache, rope, key_mask, t, commits) for t, s in enumerate(states[:-1])]
    steps.append(last_logits)
    if isinstance(plan.exit, int):
        return steps[plan.exit]
    p = model.exit_distribution(torch.stack(gates))  # [T, batch]
    if plan.exit == "weighted":
        out = steps[0] * p[0, :, None].to(last_logits.dtype)
        for logits, p_t in zip(steps[1:], p[1:]):
            out = out + logits * p_t[:, None].to(last_logits.dtype)
        return out
    reached = torch.cumsum(p, dim=0) >= model.cfg.early_exit_threshold
    first = torch.where(reached.any(0), reached.float().argmax(dim=0), len(steps) - 1)
    return torch.stack(steps)[first, torch.arange(len(first), device=first.device)]


@dataclass(kw_only=True)
class GenerationResult(Result):
    """Generated tokens, their text, and the iterations each generated token used.

    `tokens` is [batch, prompt_length + new], left-padded (`attention_mask` marks real tokens);
    `iterations[b, i]` is how many loop iterations produced generated token i of row b (0 for
    tokens after the row's end-of-sequence token)."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    prompt_length: int
    iterations: Int[Tensor, "batch new"]
    n_loops: int
    adaptive: Optional[str] = None
    threshold: Optional[float] = None
    text: Optional[list[str]] = None
    str_tokens: Optional[list[list[str]]] = None

    @property
    def generated(self) -> Int[Tensor, "batch new"]:
        """The generated tokens only."""
        return self.tokens[:, self.prompt_length:]

    @property
    def mean_iterations(self) -> float:
        """Mean iterations per generated token (tokens after end-of-sequence excluded)."""
        used = self.iterations[self.iterations > 0]
        return float(used.float().mean()) if used.numel() else float("nan")

    def to_frame(self) -> pd.DataFrame:
        """One row per generated token: batch, step, token id (and string), iterations used."""
        rows = []
        for b in range(self.generated.shape[0]):
            for i, tok in enumerate(self.generated[b].tolist()):
                row = {"batch": b, "step": i, "token": tok, "iterations": int(self.iterations[b, i])}
                if self.str_tokens is not None:
                    row["token_str"] = self.str_tokens[b][i]
                rows.append(row)
        return pd.DataFrame(rows, columns=["batch", "step", "token", "token_str", "iterations"]
                            if self.str_tokens is not None else ["batch", "step", "token", "iterations"])

    def plot(self, batch: Optional[int] = None):
        """Iterations used per generated token (bars coloured by token), one panel per row."""
        import plotly.express as px

        frame = self.to_frame()
        if batch is not None:
            frame = frame[frame["batch"] == integer(batch, "batch")]
        label = "token_str" if "token_str" in frame else "token"
        frame = frame.assign(token_label=frame[label].astype(str))
        title = f"iterations per generated token (max {self.n_loops}" + (
            f", adaptive={self.adaptive}, threshold={self.threshold:g})" if self.adaptive else ")")
        fig = px.bar(frame, x="step", y="iterations", color="token_label", facet_row="batch" if frame["batch"].nunique() > 1 else None,
                     hover_data=["token"], title=title, labels={"token_label": "token"})
        fig.update_yaxes(range=[0, self.n_loops])
        return fig


def eos_token(model: Any, eos_token_id: Optional[int] = None) -> Optional[int]:
    """The end-of-sequence id generation stops at: the argument (checked), else the tokenizer's,
    else None."""
    if eos_token_id is not None:
        eos = integer(eos_token_id, "eos_token_id")
        if not 0 <= eos < model.cfg.d_vocab:
            raise ValueError(f"eos_token_id must lie in [0, {model.cfg.d_vocab}), got {eos}")
        return eos
    tok = model.tokenizer
    if tok is None:
        return None
    eos = getattr(tok, "eos_token_id", None)
    if eos is None and hasattr(tok, "token_to_id"):
        eos = next((tok.token_to_id(n) for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
    return None if eos is None else int(eos)


def _left_pad(tokens: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The prompts left-padded (each row's real tokens last) and their mask; refuses masks whose
    real tokens are not one contiguous block."""
    B, S = tokens.shape
    if mask is None:
        return tokens, torch.ones_like(tokens)
    out, out_mask = torch.zeros_like(tokens), torch.zeros_like(tokens)
    for b in range(B):
        idx = mask[b].nonzero().flatten()
        if int(idx[-1] - idx[0]) + 1 != len(idx):
            raise ValueError(f"attention_mask row {b} has padding between real tokens; pad on the left or the right only")
        out[b, S - len(idx):] = tokens[b, idx]
        out_mask[b, S - len(idx):] = 1
    return out, out_mask


def _sample(logits: Tensor, do_sample: bool, top_k: Optional[int], top_p: Optional[float], temperature: float,
            generators: Optional[list[torch.Generator]]) -> Tensor:
    """Next tokens [batch]: greedy, or sampled (temperature, then top-k, then top-p), each row
    from its own generator when seeded."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None:
        order = logits.argsort(dim=-1, descending=True)
        cum = logits.gather(-1, order).softmax(-1).cumsum(-1)
        drop_sorted = cum > top_p
        drop_sorted[:, 1:] = drop_sorted[:, :-1].clone()  # keep the token that crosses top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -float("inf"))
    probs = logits.softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1)[:, 0]
    return torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(generators)])


def _number(value: Any, name: str) -> float:
    """A real number (not a bool), or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_threshold(model: Any, adaptive: Optional[str], threshold: Any) -> float:
    """The adaptive criterion's threshold (the reference's default when None), checked."""
    if adaptive is None:
        if threshold is not None:
            raise ValueError("threshold is set but adaptive is None; pick adaptive= 'kl', 'entropy', 'argmax' or 'gate'")
        return 0.0
    if adaptive not in ADAPTIVE:
        raise ValueError(f"adaptive must be None or one of {list(ADAPTIVE)}, got {adaptive!r}")
    if adaptive == "gate" and model.exit_gate is None:
        raise ValueError("adaptive='gate' needs a model with an exit gate (Ouro)")
    if threshold is None:
        return float(model.cfg.early_exit_threshold) if adaptive == "gate" else float(DEFAULT_THRESHOLDS[adaptive])
    if adaptive == "argmax":
        return float(positive_int(threshold, "threshold"))
    value = _number(threshold, "threshold")
    if adaptive == "gate" and not 0 < value <= 1:
        raise ValueError(f"threshold for adaptive='gate' is a cumulative exit probability in (0, 1], got {value}")
    if value <= 0:
        raise ValueError(f"threshold must be positive, got {value}")
    return value


class _Starts:
    """Start states of every position generated so far (when they are random): the prompt's are
    the forward's own draw (`model(prompt, seed=seed)`), a generated token at real position p
    draws one row from a generator seeded with `seed + p`; without a seed, torch's global RNG."""

    def __init__(self, model: Any, mode: str, seed: Optional[int], mask: Tensor):
        """The prompt's start states (`mode` "random"), or just the mode ("zeros", "embed")."""
        self.model, self.mode, self.seed = model, mode, seed
        self.table: Optional[Tensor] = None
        if mode == "random":
            B, S = mask.shape
            probe = torch.empty(B, S, model.cfg.d_model, dtype=model.dtype, device=mask.device)
            s = model.initial_state(probe, seed=seed, attention_mask=mask if seed is not None else None)
            self.table = s * mask[..., None].to(s.dtype)

    def add(self, positions: Tensor) -> None:
        """Draw the start state of one new token per row, at these real positions [batch]."""
        if self.table is None:
            return
        D = self.model.cfg.d_model
        if self.seed is None:
            new = self.model.initial_state(torch.empty(len(positions), 1, D, dtype=self.model.dtype, device=positions.device))
        else:
            probe = torch.empty(1, 1, D, dtype=self.model.dtype, device=positions.device)
            new = torch.cat([self.model.initial_state(probe, seed=self.seed + int(p)) for p in positions.tolist()])
        self.table = torch.cat([self.table, new], dim=1)

    def view(self, last: Optional[int] = None) -> Union[str, Tensor]:
        """The start states of all positions, or of the last `last`; or the mode's name."""
        if self.table is None:
            return self.mode
        return self.table if last is None else self.table[:, -last:]


@torch.no_grad()
def generate(
    model: Any,
    input: Any = "",
    max_new_tokens: int = 10,
    n_loops: Optional[int] = None,
    stop_at_eos: bool = True,
    eos_token_id: Optional[int] = None,
    do_sample: bool = False,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    use_past_kv_cache: bool = True,
    return_type: Optional[str] = "input",
    seed: Optional[int] = None,
    initial_state: Optional[str] = None,
    verbose: bool = True,
    adaptive: Optional[str] = None,
    threshold: Optional[float] = None,
    attention_mask: Optional[Tensor] = None,
    prepend_bos: bool = True,
    fwd_hooks: Sequence[tuple[Any, Any]] = (),
    l_cycles: Optional[int] = None,
) -> Any:
    """Generate tokens: TransformerLens's `generate` for looped models, as `model.generate(...)`.

    Args:
        input: text, a list of texts (right-padded by the tokenizer) or token ids [batch, pos].
        max_new_tokens: tokens to generate (fewer when every row has met `eos_token_id`).
        n_loops: iterations per token (default `cfg.default_loops`); with `adaptive`, the most.
        stop_at_eos / eos_token_id: stop a row at its end-of-sequence token (the tokenizer's
            when not given) and pad it with that token until every row has stopped.
        do_sample / top_k / top_p / temperature: greedy by default; else sample (temperature
            0 is greedy), keeping the top k tokens, then the nucleus of mass `top_p`.
        use_past_kv_cache: keep keys and values per (iteration, block layer), prelude and
            coda layer; False recomputes the whole sequence at every step (same tokens).
        return_type: "input" (text for text input, else tokens), "str", "tokens" (left-padded
            [batch, pos]) or "result" (a `GenerationResult` with iterations per token).
        seed: makes random start states and sampling reproducible, per row (batch-independent).
        initial_state: None (the model's own: random for Huginn), "zeros" or "embed".
        verbose: show a progress bar.
        adaptive / threshold: per-token exit criterion: "kl" (KL between successive
            iterations' next-token distributions below threshold), "entropy" (entropy change
            below threshold), "argmax" (argmax unchanged for `threshold` iterations) or
            "gate" (Ouro: cumulative exit probability reaches threshold).
        attention_mask: [batch, pos], 1 for real tokens, for padded token input (left or right).
        prepend_bos: for text input, as `to_tokens`.
        fwd_hooks: (name or filter, hook) pairs active during generation; hooks fire at every
            step with the iteration in their names.
        l_cycles: nested (HRM) models: L cycles per H cycle (default the checkpoint's). A nested
            model has no KV cache here: each prompt is run alone on its growing sequence at every
            step (so `use_past_kv_cache` changes nothing), with no adaptive exit.
    """
    T = check_n_loops(n_loops, model.cfg.default_loops)
    nested = bool(getattr(model.cfg, "l_cycles", 0))
    if l_cycles is not None and not nested:
        raise ValueError("l_cycles= sets the L cycles of a nested (HRM) model; this model has a single loop")
    if nested and (adaptive is not None or initial_state is not None):
        raise ValueError("adaptive= and initial_state= are not available for nested (HRM) models")
    max_new = integer(max_new_tokens, "max_new_tokens")
    if max_new < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new}")
    if return_type is None:
        return_type = "input"
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {list(RETURN_TYPES)}, got {return_type!r}")
    if initial_state is not None and initial_state not in INITIAL_STATES:
        raise ValueError(f"initial_state must be None (the model's own), 'zeros' or 'embed', got {initial_state!r}")
    seed = None if seed is None else integer(seed, "seed")
    temperature = _number(temperature, "temperature")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    top_k = None if top_k is None else positive_int(top_k, "top_k")
    if top_p is not None:
        top_p = _number(top_p, "top_p")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    threshold = _check_threshold(model, adaptive, threshold)
    eos = eos_token(model, eos_token_id)
    if stop_at_eos and eos is None and not getattr(model, "_warned_no_eos", False):
        model._warned_no_eos = True  # [tl-compat] once per model, not on every call
        warnings.warn("stop_at_eos=True, but no end-of-sequence id is known (no eos_token_id= and none in the "
                      "tokenizer): every row runs to max_new_tokens (warned once per model)", stacklevel=4)
    if stop_at_eos and eos is None:
        stop_at_eos = False

    is_text = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
    if is_text:
        if attention_mask is not None:
            raise ValueError("attention_mask is for token input; text is padded (and masked) by the tokenizer")
        tokens, mask = model.tokenize(input, prepend_bos=prepend_bos)
    else:
        tokens, _ = model.as_tokens(input)
        mask = model._check_mask(attention_mask, *tokens.shape)
    if return_type == "str" or (return_type == "input" and is_text):
        if model.tokenizer is None:
            raise ValueError("return_type='str' needs a tokenizer; this model carries none (use return_type='tokens')")
    tokens, mask = _left_pad(tokens, mask)
    B, S0 = tokens.shape
    lengths = mask.sum(-1)
    if model.cfg.positional_embedding_type == "learned" and int(lengths.max()) + max_new > model.cfg.n_ctx:
        raise ValueError(f"max_new_tokens={max_new} with a prompt of {int(lengths.max())} tokens exceeds n_ctx="
                         f"{model.cfg.n_ctx} (learned position embeddings)")
    exit = "last" if adaptive is not None else model._resolve_exit(None, T, "logits")
    plan = _Plan(T, exit, adaptive, threshold)
    cfg = model.cfg
    if initial_state is not None:
        mode = initial_state
    elif cfg.initial_state == "embed":
        mode = "embed"
    elif cfg.initial_state == "zeros" or cfg.init_std == 0:
        mode = "zeros"
    else:
        mode = "random"
    starts = _Starts(model, mode, seed, mask)
    generators = None
    if do_sample and seed is not None:
        generators = [torch.Generator(device=tokens.device).manual_seed(seed) for _ in range(B)]

    hooks = model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else nullcontext()
    if nested:
        with hooks:
            seq, seq_mask, its = _nested(model, tokens, mask, max_new, T, l_cycles, (do_sample, top_k, top_p, temperature),
                                         generators, eos if stop_at_eos else None, verbose)
        return _result(model, input, is_text, return_type, seq, seq_mask, S0, its, T, None, None)
    with hooks:
        model._check_hooks_fire(T)
        model._attach_filter_hooks(T)
        seq, seq_mask = tokens, mask
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        known = torch.zeros(B, 0, dtype=torch.long, device=tokens.device)
        finished = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        iterations = []
        cache = KVCache()
        for step in tqdm(range(max_new), disable=not verbose, desc="generate"):
            if use_past_kv_cache:
                width = S0 if step == 0 else 1
                logits, used = _advance(model, plan, cache, seq[:, -width:], positions[:, -width:], seq_mask[:, -width:],
                                        starts.view(None if step == 0 else 1), done=finished)
            elif adaptive is None or step == 0:
                logits, used = _advance(model, plan, KVCache(), seq, positions, seq_mask, starts.view(), done=finished)
            else:  # rebuild the prefix's cache in one pass with its recorded exits, then run the last token
                fresh = KVCache()
                table = starts.view()
                _advance(model, plan, fresh, seq[:, :-1], positions[:, :-1], seq_mask[:, :-1],
                         table if isinstance(table, str) else table[:, :-1], known=known)
                logits, used = _advance(model, plan, fresh, seq[:, -1:], positions[:, -1:], seq_mask[:, -1:],
                                        table if isinstance(table, str) else table[:, -1:], done=finished)
            width = S0 if step == 0 else 1
            known = torch.cat([known, used[:, None].expand(B, width)], dim=1)
            iterations.append(torch.where(finished, torch.zeros_like(used), used))
            nxt = _sample(logits, do_sample, top_k, top_p, temperature, generators)
            if stop_at_eos:
                nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
                finished = finished | (nxt == eos)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)[:, None]], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            starts.add(positions[:, -1])
            if stop_at_eos and bool(finished.all()):
                break

    its = torch.stack(iterations, dim=1) if iterations else torch.zeros(B, 0, dtype=torch.long, device=tokens.device)
    return _result(model, input, is_text, return_type, seq, seq_mask, S0, its, T, adaptive, threshold)


def _nested(model: Any, tokens: Tensor, mask: Tensor, max_new: int, T: int, l_cycles: Optional[int],
            sampling: tuple, generators: Optional[list[torch.Generator]], eos: Optional[int],
            verbose: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Generation for a nested (HRM) model: each row alone on its real tokens (so its positions
    are exact), the whole sequence recomputed at every step. Rows that met `eos` are padded with
    it until the longest row ends, as the single-loop path does."""
    B = tokens.shape[0]
    new: list[list[int]] = []
    bar = tqdm(total=B * max_new, disable=not verbose, desc="generate")
    with torch.no_grad():
        for b in range(B):
            seq, row = tokens[b][mask[b].bool()], []
            for _ in range(max_new):
                logits = model(seq[None], n_loops=T, l_cycles=l_cycles)[:, -1]
                nxt = int(_sample(logits, *sampling, None if generators is None else generators[b:b + 1])[0])
                row.append(nxt)
                seq = torch.cat([seq, seq.new_tensor([nxt])])
                bar.update()
                if eos is not None and nxt == eos:
                    break
            new.append(row)
    bar.close()
    width = max((len(r) for r in new), default=0)
    grown = torch.tensor([r + [eos] * (width - len(r)) for r in new], dtype=tokens.dtype, device=tokens.device).reshape(B, width)
    its = torch.tensor([[T] * len(r) + [0] * (width - len(r)) for r in new], dtype=torch.long, device=tokens.device).reshape(B, width)
    return torch.cat([tokens, grown], dim=1), torch.cat([mask, torch.ones_like(grown)], dim=1), its


def _result(model: Any, input: Any, is_text: bool, return_type: str, seq: Tensor, seq_mask: Tensor, S0: int, its: Tensor,
            T: int, adaptive: Optional[str], threshold: Optional[float]) -> Any:
    """What `generate` returns for `return_type`."""
    B = seq.shape[0]
    if return_type == "tokens" or (return_type == "input" and not is_text):
        return seq
    texts = None
    if model.tokenizer is not None:
        texts = [_decode(model.tokenizer, seq[b][seq_mask[b].bool()].tolist()) for b in range(B)]
    if return_type == "result":
        str_tokens = None
        if model.tokenizer is not None:
            str_tokens = [model.to_str_tokens(seq[b, S0:]) for b in range(B)]
        return GenerationResult(tokens=seq, attention_mask=seq_mask, prompt_length=S0, iterations=its, n_loops=T,
                                adaptive=adaptive, threshold=threshold if adaptive else None, text=texts,
                                str_tokens=str_tokens)
    return texts[0] if isinstance(input, str) else texts


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """Text of token ids (special tokens kept out where the tokenizer supports it)."""
    return tokenizer.decode(ids, skip_special_tokens=True)
