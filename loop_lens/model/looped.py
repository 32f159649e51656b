"""HookedLoopedTransformer: prelude -> loop (one block, `n_loops` times) -> coda, hooked per iteration."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from loop_lens import generation
from loop_lens.cache import LoopCache, additivity_breaks
from loop_lens.checks import check_n_loops, float_dtype
from loop_lens.config import LoopConfig
from loop_lens.errors import RunOptionError
from loop_lens.model.components import Block, Injection, Norm, Rotary
from loop_lens.model.hooking import HookLifecycle, NamesFilter, TokensLike, _FilterHook
from loop_lens.model.hooks import NO_HOOKS, BlockHooks, IterationHooks, NormHooks
from loop_lens.model.inputs import InputChecks
from loop_lens.model.run import Run, StopAtLayer
from loop_lens.model.schedule import Schedule, Step
from loop_lens.saving import save_checkpoint


class HookedNorm(Norm):
    """A norm used at one site only, so it owns its hook points (`ln_final.hook_scale`, ...)."""

    def __init__(self, d: int, kind: str, eps: float):
        super().__init__(d, kind, eps)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor, hooks=None) -> Tensor:
        return super().forward(x, self if hooks is None else hooks)


class HookedLoopedTransformer(HookLifecycle, InputChecks, HookedRootModule):
    """A looped transformer whose hook names carry the iteration: `iter.{t}.blocks.{l}.*`.

    Parameters exist once (`prelude_blocks`, `blocks` for the recurrent block, `coda_blocks`).
    Hook points exist for the prelude, the coda and the final norm, and for an iteration only
    while something is hooked or cached there: `iter` holds those, keyed by the iteration, so a
    run of any length costs no memory per iteration.
    """

    iteration_hooks_cls = staticmethod(IterationHooks)  # makes the hook container of one iteration
    run_options: tuple[str, ...] = ()  # the family's own run keywords (what `_options` takes)
    single_loop_refusal: Optional[str] = None  # a family whose passes are not one stack: which tools refuse it, and why
    _cache_cls: type[LoopCache] = LoopCache  # what run_with_cache returns

    def __init__(self, cfg: LoopConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.iter = nn.ModuleDict()  # iteration index (str) -> its hook container, only where hooked
        self._build(cfg)
        template = self.iteration_hooks_cls(cfg)
        self._iter_suffixes = tuple(n for n, m in template.named_modules() if isinstance(m, HookPoint))
        self._filter_hooks: list[_FilterHook] = []
        self._passing: set[int] = set()  # passes whose container _enter_pass made for filter hooks alone
        self._spare_hooks: list[nn.Module] = []  # released containers, reused (not submodules)
        self._warned_long_input = False
        self.setup()

    def _build(self, cfg: LoopConfig) -> None:
        """Create the weights and the hook points outside the loop (prelude, coda, model-level).
        A family whose layers differ overrides this."""
        D = cfg.d_model
        self.embed = nn.Embedding(cfg.d_vocab, D)
        self.hook_embed = HookPoint()  # [batch, pos, d_model], after the embedding scale
        if cfg.positional_embedding_type == "learned":
            self.pos_embed = nn.Embedding(cfg.n_ctx, D)
            self.hook_pos_embed = HookPoint()
        self.rotary = Rotary(cfg) if cfg.positional_embedding_type == "rotary" else None
        self.prelude_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.prelude = nn.ModuleList(BlockHooks(cfg) for _ in range(cfg.n_prelude))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_block))
        self.injection = Injection(cfg) if cfg.injection != "none" else None
        self.exit_gate = nn.Linear(D, 1) if cfg.exit_gate else None
        self.coda_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.coda = nn.ModuleList(BlockHooks(cfg) for _ in range(cfg.n_coda))
        self.ln_final = HookedNorm(D, cfg.normalization_type, cfg.norm_eps)
        if cfg.norm_after_loop:
            self.ln_loop = NormHooks()
        self.hook_latent = HookPoint()  # the state handed to the coda (after any post-loop norm)
        self.unembed = nn.Linear(D, cfg.d_vocab, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight

    # ------------------------------------------------------------------ structure
    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.weight.T

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.weight

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype


    # ------------------------------------------------------------------ hooks (TransformerLens API)


    # ------------------------------------------------------------------ tokens


    # ------------------------------------------------------------------ checks, once per forward

    def _depth(self, n_loops: int) -> int:
        """The unrolled depth of a run of `n_loops` iterations (with the current run options)."""
        return self._schedule(n_loops).depth

    # ------------------------------------------------------------------ the schedule
    def schedule(self, n_loops: Optional[int] = None, **options: Any) -> Schedule:
        """The layers a run of `n_loops` passes traverses, in order (`model/schedule.py`): the
        unrolled depth, `stop_at_layer`, the cache's `depth_index` / `loop_index` / `unrolled()`
        read it. `options` are the family's run keywords (see `_options`)."""
        T = check_n_loops(n_loops, self.cfg.default_loops)
        with self._options(**options):
            return self._schedule(T)

    def _schedule(self, n_loops: int) -> Schedule:
        """The schedule under the current run options: prelude, one pass of the block per
        iteration, coda. The final norm is the model's own, or (Ouro without a coda) the last
        iteration's per-iteration norm."""
        c = self.cfg
        last_iter_norm = not c.final_norm and c.iter_norm and c.n_coda == 0
        return Schedule(
            n_loops,
            prelude=tuple(f"prelude.{l}" for l in range(c.n_prelude)),
            steps=tuple(Step((l,), f"blocks.{l}", "blocks", l) for l in range(c.n_block)),
            coda=tuple(f"coda.{l}" for l in range(c.n_coda)),
            final_norm="ln_final" if c.final_norm or last_iter_norm else None,
            final_alias=f"iter.{n_loops - 1}.ln_state" if last_iter_norm else None,
            options=self._current_options(),
        )

    def _current_options(self) -> dict[str, Any]:
        """The run options in force (inside `_options`); the plain loop has none."""
        return {}

    # ------------------------------------------------------------------ what a family adds to the report
    report_stack_label = ""  # which stack the report's sections read, for a family with more than one
    report_hooks: tuple[str, ...] = ()  # hook-name endings a family's own report sections read (cached beside the core's)
    report_heads_refusal: Optional[str] = None  # why the head-stability table and attention view do not apply
    random_start = True  # seed= / generator= may draw a start state (False: the family refuses them)

    def _describe_layout(self, n_loops: int, options: dict[str, Any]) -> Optional[str]:
        """The report's layout paragraph, for a family the plain description does not fit."""
        return None

    def _report_sections(self, report: Any, cache: LoopCache, tokens: Tensor, mask: Optional[Tensor],
                         stabilisation_tol: float, convergence_tol: float) -> dict[str, Any]:
        """A family's own report sections (appended to `report.sections`); returns their numbers."""
        return {}

    def _additivity_breaks(self, per_head: bool) -> list[str]:
        """Why the final residual is not embed + every layer's output (TransformerLens's
        decompositions refuse then, naming these)."""
        return additivity_breaks(self.cfg, per_head)


    # ------------------------------------------------------------------ the forward pass
    def forward(
        self,
        input: TokensLike,
        n_loops: Optional[int] = None,
        *,
        initial_state: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        attention_mask: Optional[Tensor] = None,
        return_type: Optional[str] = "logits",
        exit: Union[None, str, int] = None,
        stop_at_layer: Optional[int] = None,
        loss_per_token: bool = False,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> Any:
        """Run the model: embed, prelude, the loop, coda, unembed.

        Args:
            input: token ids [batch, pos] (or [pos]), or text when a tokenizer is attached.
            n_loops: iterations of the recurrent block (default `cfg.default_loops`); any integer >= 1.
            initial_state: the state entering iteration 0, [batch, pos, d_model], or "zeros" /
                "embed" (as the CLI's --initial-state); overrides `cfg.initial_state`. The state
                used is always visible at `iter.0.hook_state_pre`.
            generator / seed: randomness for a truncated-normal start state. With `seed=`, each
                prompt draws its own start state over its real tokens, so a prompt gets the same
                numbers alone, in any batch and with any padding.
            attention_mask: [batch, pos], 1 for real tokens (padding is masked out of keys).
            return_type: "logits", "loss", "both" (logits, loss) or None.
            exit: None (the checkpoint's own default: the last iteration, or for Ouro the gate's
                threshold exit), "last", an iteration index t, "weighted" (Ouro: sum_t p_t logits_t)
                or "threshold" (Ouro: first t whose cumulative exit probability reaches
                `cfg.early_exit_threshold`).
            stop_at_layer: stop before this unrolled depth and return the residual stream there;
                the full depth returns the residual before the final norm (TransformerLens's
                convention).
            loss_per_token: with a loss, return it per token [batch, pos - 1].
            prepend_bos / padding_side: TransformerLens's, for text input (padding is on the right).
        """
        input, attention_mask = self._tl_text_input(input, attention_mask, prepend_bos, padding_side)  # [tl-compat]
        run = self._prepare(input, n_loops, attention_mask, return_type, exit, stop_at_layer, seed, generator, initial_state)
        try:
            logits = self._network(run)
        except StopAtLayer as stop:
            return stop.residual
        return self._outputs(logits, run, return_type, loss_per_token)

    # ------------------------------------------------------------------ the network, written once
    @contextmanager
    def _options(self, **given: Any) -> Iterator[dict[str, Any]]:
        """The family's own run keywords, checked (a family with run options overrides this; the
        plain loop has none). Inside, the model runs with them; the dict goes into `Run.options`."""
        if given:
            raise RunOptionError(f"unexpected keyword argument(s) {sorted(given)}: this model "
                                 f"({self.cfg.family}) takes no such run option")
        yield {}

    def _network(self, run: Run) -> Float[Tensor, "batch pos d_vocab"]:
        """Embed, prelude, the loop, coda, unembed, and the exit: what `forward` and every
        generation step run (they differ only in their `Run`)."""
        e = self._prelude(self._embed(run.tokens, run.positions), run)
        s = self._state(self._loop(self._begin(e, run), e, run))
        x = self._coda(self._to_coda(s, hooked=True), run)
        if run.stop_at_layer == run.depth:
            raise StopAtLayer(x)
        logits = self._unembed(x)
        if run.exit != "last":
            logits = self._exit_logits(run.states, run.gates, run, logits)
        return logits

    def _embed(self, tokens: Int[Tensor, "batch pos"], positions: Optional[Tensor] = None) -> Float[Tensor, "batch pos d_model"]:
        """Token (and learned position) embeddings; `positions` [batch, pos] per row, else 0..pos-1."""
        x = self.hook_embed(self.embed(tokens) * self.cfg.embed_scale)
        if self.cfg.positional_embedding_type == "learned":
            if positions is None:
                x = x + self.hook_pos_embed(self.pos_embed(torch.arange(tokens.shape[1], device=tokens.device)))[None]
            else:
                x = x + self.hook_pos_embed(self.pos_embed(positions))
        return x

    def _prelude(self, x: Float[Tensor, "batch pos d_model"], run: Run) -> Float[Tensor, "batch pos d_model"]:
        for layer, (blk, hooks) in enumerate(zip(self.prelude_blocks, self.prelude)):
            x = run.layer(("prelude", layer), blk, hooks, x)
        return x

    def _begin(self, e: Tensor, run: Run) -> Any:
        """What enters pass 0 (the family's carry; here the state). `run.start` is the model's
        rule (None), "zeros", "embed" or a given tensor."""
        given = run.start
        if given is None:
            return self.initial_state(e, generator=run.generator, seed=run.seed, attention_mask=run.mask)
        if isinstance(given, str):
            return e if given == "embed" else torch.zeros_like(e)
        return given.to(device=e.device, dtype=e.dtype)

    def _state(self, carry: Any) -> Tensor:
        """The state a carry holds (what lenses and the coda read)."""
        return carry

    def _freeze(self, carry: Any, before: Any, live: Tensor) -> Any:
        """The carry with positions where `live` [batch, pos] is False kept as `before`."""
        return torch.where(live[..., None], carry, before)

    def _loop(self, carry: Any, e: Float[Tensor, "batch pos d_model"], run: Run) -> Any:
        """The loop, written once for every family: pass after pass, each the family's `_pass`
        and `_gate`, each handed to the run (`Run.after_pass`). Returns the last carry."""
        for t in range(run.n_loops):
            if not run.running(t):
                break
            hooks = self._enter_pass(t)
            before = carry
            carry = self._pass(run, t, carry, e, hooks)
            carry = run.after_pass(self, t, before, carry, self._gate(run, t, carry, hooks))
            self._leave_pass(t)
        return carry

    def _pass(self, run: Run, t: int, s: Tensor, e: Tensor, hooks: Any) -> Tensor:
        """One pass of the looped section (the family's step): inject, the block, (Ouro) the
        per-iteration norm."""
        s = hooks.hook_state_pre(s)
        if self.injection is not None:
            s = hooks.hook_injected(self.injection(s, e))
        for layer, blk in enumerate(self.blocks):
            s = run.layer(("iter", t, layer), blk, hooks.blocks[layer], s)
        if self.cfg.iter_norm:
            if t == run.n_loops - 1 and self.cfg.n_coda == 0 and run.stop_at_layer == run.depth:
                raise StopAtLayer(s)  # the full depth: the residual before the last norm, which is the final norm
            s = self.ln_final(s, hooks.ln_state)
        return hooks.hook_state_post(s)

    def _gate(self, run: Run, t: int, carry: Any, hooks: Any) -> Optional[Tensor]:
        """The exit gate's logit after pass t [batch, pos] (Ouro), or None."""
        if self.exit_gate is None:
            return None
        return hooks.hook_exit_logit(self.exit_gate(self._state(carry)).squeeze(-1))

    def _rope(self, S: int, device: torch.device, positions: Optional[Tensor] = None) -> Any:
        """What the layers' attention takes as positions: RoPE's (cos, sin) for 0..S-1 or for
        `positions` [batch, pos] (generation), None without RoPE. A family whose layers differ
        (one RoPE per attention type) returns what its layers read."""
        if self.rotary is None:
            return None
        return self.rotary(S, device) if positions is None else self.rotary.at(positions)

    def measured_state(self, x: Tensor, kind: str) -> Tensor:
        """An activation of hook kind `kind` as the geometric analyses (step sizes, fixed points,
        cyclic similarity, trajectories, streaming steps) measure it: as it is. A family whose
        layers read only the direction of the residual stream (nGPT) returns it on the unit
        sphere, so a change of length the next layer discards is not counted as a step."""
        return x

    def _state_shape(self, batch: int, pos: int) -> tuple[int, int, int]:
        """The shape of the state a pass carries, as `initial_state=` must give it (a family whose
        state has its own width says so)."""
        return (batch, pos, self.cfg.d_model)

    def _kv_policy(self, site: tuple, n_loops: int) -> tuple[tuple, bool]:
        """Generation's KV cache at a site: which site's cached keys it reads, and whether it
        appends its own (default: its own, and yes; a family whose passes share a cache says so)."""
        return site, True

    def _to_coda(self, s: Tensor, hooked: bool) -> Tensor:
        if self.cfg.norm_after_loop:
            s = self.ln_final(s, self.ln_loop if hooked else NO_HOOKS)
        return self.hook_latent(s) if hooked else s

    def _coda(self, x: Float[Tensor, "batch pos d_model"], run: Run) -> Float[Tensor, "batch pos d_model"]:
        for layer, (blk, hooks) in enumerate(zip(self.coda_blocks, self.coda)):
            x = run.layer(("coda", run.coda_t, layer), blk, hooks, x)
        return x

    def _unembed(self, x: Float[Tensor, "batch pos d_model"], hooked: bool = True) -> Float[Tensor, "batch pos d_vocab"]:
        if self.cfg.final_norm:
            x = self.ln_final(x) if hooked else self.ln_final(x, NO_HOOKS)
        return self.unembed(x)

    def _readout(self, state: Tensor, run: Run, t: Optional[int] = None) -> Float[Tensor, "batch pos d_vocab"]:
        """Unhooked logits of a state: the rest of the network after the loop, its coda layers at
        sites `("coda", t, l)` of `run` (which neither count for `stop_at_layer` nor stop)."""
        x = self._to_coda(state, hooked=False)
        for layer, blk in enumerate(self.coda_blocks):
            x = run.layer(("coda", t, layer), blk, NO_HOOKS, x, count=False)
        return self._unembed(x, hooked=False)

    def initial_state(
        self,
        e: Float[Tensor, "batch pos d_model"],
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        attention_mask: Optional[Tensor] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The state entering iteration 0, from `cfg.initial_state` (embedding, zeros or
        truncated normal with `cfg.init_std`, times `cfg.init_scale`).

        With `seed=` (and no generator) every prompt draws its own state over its real tokens
        (`attention_mask`), from a generator seeded with `seed`: the same prompt gets the same
        start state alone, in any batch and with any padding. With `generator=` one draw fills the
        whole batch, as the reference code does."""
        cfg = self.cfg
        if cfg.initial_state == "embed":
            return e
        if cfg.initial_state == "zeros" or cfg.init_std == 0:
            return torch.zeros_like(e)
        if seed is not None and generator is None:
            s = torch.zeros(e.shape, dtype=torch.float32, device=e.device)
            for b in range(e.shape[0]):
                real = attention_mask[b].bool() if attention_mask is not None else slice(None)
                n = int(attention_mask[b].sum()) if attention_mask is not None else e.shape[1]
                g = torch.Generator(device=e.device).manual_seed(int(seed))
                s[b, real] = self._trunc_normal((n, e.shape[-1]), g, e.device)
        else:
            s = self._trunc_normal(tuple(e.shape), generator, e.device)
        return (s * cfg.init_scale).to(e.dtype)

    def _trunc_normal(self, shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device) -> Tensor:
        std = self.cfg.init_std
        s = torch.empty(shape, dtype=torch.float32, device=device)
        return nn.init.trunc_normal_(s, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)

    def finish(
        self,
        state: Float[Tensor, "batch pos d_model"],
        attention_mask: Optional[Tensor] = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits from a state leaving an iteration: the rest of the network (post-loop norm,
        coda, final norm, unembedding), with no hooks. For Huginn this is the coda lens; for a
        model without a coda it is the logit lens of the state."""
        rope = self._rope(state.shape[1], state.device)
        return self._readout(state, Run(state, 0, "last", attention_mask, self.rotary, rope, None))

    def exit_distribution(self, gate_logits: Float[Tensor, "T batch pos"]) -> Float[Tensor, "T batch pos"]:
        """Ouro's exit probabilities: p_t = lambda_t prod_{j<t}(1 - lambda_j), the last step
        taking the remaining mass (lambda = sigmoid(gate)); computed step by step in the gate's
        dtype, in the reference's order, so threshold decisions match it exactly."""
        lam = torch.sigmoid(gate_logits)
        remaining = torch.ones_like(lam[0])
        p = []
        for t in range(lam.shape[0] - 1):
            p.append(lam[t] * remaining)
            remaining = remaining * (1.0 - lam[t])
        p.append(remaining)
        return torch.stack(p)

    def _exit_logits(self, states: list[Tensor], gates: list[Tensor], run: Run, last_logits: Tensor) -> Tensor:
        """Logits of an exit other than the last iteration. One iteration's [batch, pos, vocab]
        logits at a time: holding all T of them took 3.2 GB at T = 64 on a 49k vocabulary."""
        if isinstance(run.exit, int):
            return self._readout(states[run.exit], run, run.exit)
        last = len(states) - 1
        p = self.exit_distribution(torch.stack(gates))  # [T, batch, pos]
        if run.exit == "weighted":  # sum_t p_t logits_t, added in the reference's order
            out = None
            for t, s in enumerate(states):
                term = (last_logits if t == last else self._readout(s, run, t)) * p[t, ..., None].to(last_logits.dtype)
                out = term if out is None else out + term
            return out
        reached = torch.cumsum(p, dim=0) >= self.cfg.early_exit_threshold
        first = torch.where(reached.any(0), reached.float().argmax(dim=0), last)  # [batch, pos]
        if self.cfg.n_coda == 0:  # the rest of the network reads each position alone: finish the chosen states once
            chosen = torch.stack(states).gather(0, first[None, ..., None].expand(1, *states[0].shape))[0]
            return self._readout(chosen, run)
        out = last_logits.clone()
        for t, s in enumerate(states[:-1]):
            here = first == t
            if run.readout_all() or bool(here.any()):
                out[here] = self._readout(s, run, t)[here]
        return out

    def _outputs(self, logits: Tensor, run: Run, return_type: Optional[str], per_token: bool) -> Any:
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, run.tokens[:, 1:, None])[..., 0]
        if per_token:
            loss = nll
        elif run.mask is not None:
            m = run.mask[:, 1:].float()
            loss = (nll * m).sum() / m.sum().clamp_min(1)
        else:
            loss = nll.mean()
        return loss if return_type == "loss" else (logits, loss)

    # ------------------------------------------------------------------ TransformerLens run methods
    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NamesFilter = None,
        cache_dtype: Optional[torch.dtype] = None,
        **kwargs: Any,
    ) -> tuple[Any, LoopCache]:
        """Run and cache activations; returns (output, LoopCache).

        `names_filter` is TransformerLens's (a name, a list of names, or a function of the name);
        only the hook points it selects are created and cached. Accepts TransformerLens's options
        (`device`, `pos_slice`, `remove_batch_dim`, ...) and `cache_dtype` to store activations
        smaller. A filter that selects nothing warns; a listed name that is no hook point of this
        run raises HookNameError.
        """
        if cache_dtype is not None:
            cache_dtype = float_dtype(cache_dtype, "cache_dtype")
        T = self._loops_of(model_args, kwargs)
        try:
            wanted = self._names_in_run(names_filter, T)
        except Exception:
            self._release()  # drop the hook points made for a filter that was then refused
            raise
        if not wanted:
            warnings.warn(f"names_filter {names_filter!r} matches no hook point of this run: the cache is empty", stacklevel=2)
        out, cache_dict = super().run_with_cache(*model_args, names_filter=wanted.__contains__, **kwargs)
        self._check_listed_reached(names_filter, cache_dict, kwargs.get("stop_at_layer"), wanted)
        if cache_dtype is not None:
            cache_dict = {k: v.to(cache_dtype) if v.is_floating_point() else v for k, v in cache_dict.items()}
        has_batch = not kwargs.get("remove_batch_dim", False)
        return out, self._cache_cls(cache_dict, self, n_loops=T, has_batch_dim=has_batch, schedule=self._schedule(T))


    # ------------------------------------------------------------------ generation
    generate = generation.generate  # model.generate(input, max_new_tokens=..., ...): TL's generate for looped models

    # ------------------------------------------------------------------ saving
    def save(self, directory: Union[str, Path], overwrite: bool = False) -> Path:
        """Write loop_lens's native format (`loop_config.json`, `model.safetensors`, and
        `tokenizer.json` when a `tokenizers` tokenizer is attached), atomically: killed at any
        moment, the folder loads as the previous checkpoint or as this one. A folder holding
        anything but an earlier loop_lens save is refused (SaveError) unless `overwrite=True`."""
        return save_checkpoint(self, directory, overwrite=overwrite)

    def extra_repr(self) -> str:
        return f"layout={self.cfg.layout}, family={self.cfg.family!r}"

    def summary(self) -> dict[str, Any]:
        """Layout, parameter count and config, as `loop-lens inspect` prints them."""
        return {
            "family": self.cfg.family,
            "layout": self.cfg.layout,
            "n_params": sum(p.numel() for p in self.parameters()),
            "config": json.loads(self.cfg.to_json()),
        }

    # ------------------------------------------------------------------ [tl-compat] TransformerLens / nnsight interop
    # Everything below is self-contained (issue 24); the edits elsewhere in this file carry "[tl-compat]".

    def unrolled(self, n_loops: Optional[int] = None, **run_kwargs: Any) -> Any:
        """This model run `n_loops` times, as a TransformerLens `HookedRootModule` of depth
        `cfg.n_layers` = the unrolled depth, sharing these weights: hook names `hook_embed`,
        `blocks.{k}.*`, `ln_final.*`, TransformerLens's cfg, forward keywords, tokenizer helpers
        and weights stacked over depth, `loop_index(k)` back to (phase, iteration, layer).
        `run_kwargs` (seed=, exit=, initial_state=, the family's run options...) go to every forward.
        See `loop_lens.model.unrolled.UnrolledModel` and docs/interop.md."""
        from loop_lens.model.unrolled import UnrolledModel

        return UnrolledModel(self, n_loops, **run_kwargs)


