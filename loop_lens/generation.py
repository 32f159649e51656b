"""Generation for looped models: TransformerLens's `generate`, a KV cache per (iteration, block
layer), and per-token adaptive compute (Huginn's exit criteria, Ouro's exit gate).

Semantics (`docs/generation.md` has the details):

- Batches run left-padded (right-padded or text input is re-laid out), with per-row positions that
  start at 0 on each row's first real token, so a prompt gives the same tokens alone and in a batch.
- The cache keeps keys and values (after RoPE) for every prelude layer, every (iteration, block
  layer) and every coda layer. With a fixed iteration count, cached generation equals
  recomputing the whole sequence at every step.
- A layer may keep a state of its own per site between steps (`kv.past_state(name)` /
  `kv.keep_state(name, tensor)` on its KV view: e.g. the last inputs of a causal convolution over
  the sequence); it is committed with the step's keys, for the sites that ran.
- Adaptive compute: each new token iterates until its criterion fires (checked after every
  iteration on the row's last position; the prompt exits as one group). A position that stopped
  after k iterations offers, at every later iteration t >= k, the keys and values it computed at
  iteration k - 1 of the same block layer (the reference's "latest" KV lookup). The coda cache
  holds each position's coda keys from the state it exited with.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from loop_lens.checks import check_n_loops, finite_number, integer, positive_int
from loop_lens.checks import seed as check_seed
from loop_lens.model.run import Run
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
        self.states: dict[Site, dict[str, Tensor]] = {}  # a layer's own per-site state (e.g. convolution inputs)

    def past(self, site: Site) -> Optional[tuple[Tensor, Tensor]]:
        """The cached keys and values of a site, or None before the first commit."""
        return (self.k[site], self.v[site]) if site in self.k else None

    def commit(self, kv: dict[Site, tuple[Tensor, Tensor]], mask: Tensor,
               states: Optional[dict[Site, dict[str, Tensor]]] = None) -> None:
        """Append one step's keys and values (every site) and its positions' mask; replace the
        per-site states the step kept."""
        for site, kept in (states or {}).items():
            self.states.setdefault(site, {}).update(kept)
        for site, (k, v) in kv.items():
            self.k[site] = k if site not in self.k else torch.cat([self.k[site], k], dim=2)
            self.v[site] = v if site not in self.v else torch.cat([self.v[site], v], dim=2)
        self.mask = mask if self.mask is None else torch.cat([self.mask, mask], dim=1)
        self.length += mask.shape[1]


class _SiteView:
    """What attention at one site sees in one step: the cached keys and values, and (adaptive
    compute) which positions still iterate; a frozen position offers its last computed keys."""

    def __init__(self, past: Optional[tuple[Tensor, Tensor]], live: Optional[Tensor] = None,
                 last: Optional[tuple[Tensor, Tensor]] = None, states: Optional[dict[str, Tensor]] = None):
        """`past` cached keys/values, `live` [batch, pos] positions still iterating, `last` their
        keys/values at the previous iteration of this layer, `states` the layer's own state kept
        at this site by the previous step."""
        self.past, self.live, self.last = past, live, last
        self.states = states or {}
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
    options: dict = field(default_factory=dict)  # the family's run options (forward's own keywords)

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


class _StepRun(Run):
    """A generation step's run: attention reads and extends the KV cache at every site, positions
    whose iteration count is decided (`known`) or whose criterion fired stop iterating (and offer
    their last keys and values), and the loop reports each row's exit."""

    def __init__(self, model: Any, plan: _Plan, cache: KVCache, tokens: Tensor, positions: Tensor, new_mask: Tensor,
                 starts: Union[str, Tensor], known: Optional[Tensor], done: Optional[Tensor]):
        full_mask = new_mask if cache.mask is None else torch.cat([cache.mask, new_mask], dim=1)
        rope = model._rope(tokens.shape[1], tokens.device, positions)
        super().__init__(tokens, plan.n_loops, plan.exit, None if bool(full_mask.all()) else full_mask, model.rotary,
                         rope, None, options=plan.options, positions=positions, start=starts, coda_t=plan.n_loops - 1 if plan.per_iteration_coda else None)
        B, S = tokens.shape
        self.model, self.plan, self.cache, self.known, self.done = model, plan, cache, known, done
        self.commits: dict[Site, tuple[Tensor, Tensor]] = {}
        self.state_commits: dict[Site, dict[str, Tensor]] = {}  # what layers kept per site this step
        self.last: dict[tuple, tuple[Tensor, Tensor]] = {}  # a pass's tail (site after ("iter", t)) -> its last keys
        self.deciding = known is None or bool((known < 0).any())
        self.criterion = (_Criterion(plan.adaptive, plan.threshold, B, model.cfg.d_vocab, tokens.device)
                          if plan.adaptive and self.deciding else None)
        self.unknown = torch.ones(B, S, dtype=torch.bool, device=tokens.device) if known is None else known < 0
        self.row_live = torch.ones(B, dtype=torch.bool, device=tokens.device)
        self.exits = torch.full((B,), plan.n_loops, dtype=torch.long, device=tokens.device)
        self.live: Optional[Tensor] = None

    @property
    def keeps_states(self) -> bool:
        return self.plan.per_iteration_coda

    def readout_all(self) -> bool:
        return True  # every pass's coda keys are kept for the next step

    def kv(self, site: tuple, hooked: bool) -> _SiteView:
        read, writes = self.model._kv_policy(site, self.n_loops)
        states = self.cache.states.get(read)
        if site[0] != "iter":
            return _Committing(self, site, _SiteView(self.cache.past(read), states=states),
                               writes and (hooked or site[1] is not None))
        return _Committing(self, site, _SiteView(self.cache.past(read), self.live, self.last.get(site[2:]), states), writes)

    def running(self, t: int) -> bool:
        B, S = self.tokens.shape
        live = self.row_live[:, None].expand(B, S)
        if self.known is not None:
            live = torch.where(self.unknown, live, t < self.known)
        self.live = live
        return bool(live.any())

    def after_pass(self, model: Any, t: int, before: Any, carry: Any, gate: Optional[Tensor]) -> Any:
        carry = model._freeze(carry, before, self.live)
        if self.criterion is not None:
            s = model._state(carry)
            logits = model._readout(s, self)[:, -1].float() if self.criterion.needs_logits else None
            stop = self.criterion.check(logits, None if gate is None else gate[:, -1])
            if self.done is not None:
                stop = stop | self.done
            new = stop & self.row_live
            self.exits = torch.where(new, torch.full_like(self.exits, t + 1), self.exits)
            self.row_live = self.row_live & ~new
        elif self.keeps_states:
            self.states.append(model._state(carry))
            self.gates.append(gate)
        return carry

    def finish(self, new_mask: Tensor) -> Tensor:
        """Commit this step's keys and values (passes nobody ran offer each position's last
        ones) and return each row's iterations."""
        for t in range(self.n_loops):
            for tail, kv in self.last.items():
                if self.model._kv_policy(("iter", t, *tail), self.n_loops)[1]:  # a site that reads another's never writes
                    self.commits.setdefault(("iter", t, *tail), kv)
        self.cache.commit(self.commits, new_mask, self.state_commits)
        if self.known is not None and not self.deciding:
            return self.known.max(dim=1).values
        return self.exits


class _Committing:
    """A site view that records what it computed: the pass's last keys (inside the loop) and,
    where `commit` (hooked calls and per-pass readouts; a criterion's readout only reads; the
    model's `_kv_policy` may say a site never writes), the step's commit for the site."""

    def __init__(self, run: _StepRun, site: tuple, view: _SiteView, commit: bool):
        self.run, self.site, self.view, self.commit = run, site, view, commit

    def past_state(self, name: str) -> Optional[Tensor]:
        """The layer's own state `name` kept at this site by the previous step (None at the first)."""
        return self.view.states.get(name)

    def keep_state(self, name: str, value: Tensor) -> None:
        """Keep `value` as this site's state `name` for the next step (where this view commits)."""
        if self.commit:
            self.run.state_commits.setdefault(self.site, {})[name] = value

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        out = self.view(k, v)
        if self.site[0] == "iter":
            self.run.last[self.site[2:]] = self.view.new
        if self.commit:
            self.run.commits[self.site] = self.view.new
        return out


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
    """Run new positions against the cache through the model's own network, commit their keys and
    values, and return the next token's logits and the iterations the new positions used (per row).

    `known` gives positions whose iteration count is already decided (a recompute of earlier
    steps); the others exit together per row by the adaptive criterion. `done` rows (finished
    sequences) stop after their first iteration."""
    run = _StepRun(model, plan, cache, tokens, positions, new_mask, starts, known, done)
    logits = model._network(run)[:, -1]
    return logits.float(), run.finish(new_mask)


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
    value = finite_number(threshold, "threshold")
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
    **options: Any,
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
        options: the family's own run keywords, as `forward` takes them.
    """
    T = check_n_loops(n_loops, model.cfg.default_loops)
    max_new = integer(max_new_tokens, "max_new_tokens")
    if max_new < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new}")
    if return_type is None:
        return_type = "input"
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {list(RETURN_TYPES)}, got {return_type!r}")
    if initial_state is not None and initial_state not in INITIAL_STATES:
        raise ValueError(f"initial_state must be None (the model's own), 'zeros' or 'embed', got {initial_state!r}")
    seed = None if seed is None else check_seed(seed)
    temperature = finite_number(temperature, "temperature")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    top_k = None if top_k is None else positive_int(top_k, "top_k")
    if top_p is not None:
        top_p = finite_number(top_p, "top_p")
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
    with model._options(**options) as opts, hooks:
        plan.options = opts
        model._check_hooks_fire(T)
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
