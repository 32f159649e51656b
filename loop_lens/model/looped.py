"""HookedLoopedTransformer: prelude -> loop (one block, `n_loops` times) -> coda, hooked per iteration."""

from __future__ import annotations

import difflib
import functools
import json
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from loop_lens.checks import check_n_loops, float_dtype, hook_iteration, hook_name_problem, integer, real_tensor
from loop_lens.checks import seed as check_seed
from loop_lens.config import LoopConfig
from loop_lens.errors import HookError, HookNameError, RunOptionError
from loop_lens.model import tl_compat
from loop_lens.model.components import Block, Injection, Norm, Rotary
from loop_lens.model.hooks import NO_HOOKS, BlockHooks, IterationHooks, NormHooks
from loop_lens.model.names import parse_hook_name
from loop_lens.model.run import Run, StopAtLayer
from loop_lens.model.schedule import Schedule, Step
from loop_lens.saving import save_checkpoint
from loop_lens.tokenization import decode_each, encode_batch

TokensLike = Union[str, Sequence[str], Int[Tensor, "batch pos"], Int[Tensor, " pos"]]
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
EXIT_MODES = ("last", "weighted", "threshold")
RETURN_TYPES = ("logits", "loss", "both", None)
SPARE_ITERATION_HOOKS = 64  # released iteration hook containers kept for reuse (a few MB at most)


class HookedNorm(Norm):
    """A norm used at one site only, so it owns its hook points (`ln_final.hook_scale`, ...)."""

    def __init__(self, d: int, kind: str, eps: float):
        super().__init__(d, kind, eps)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor, hooks=None) -> Tensor:
        return super().forward(x, self if hooks is None else hooks)


@dataclass
class _FilterHook:
    """A hook attached by a name filter. Its iteration hook points are created when a run reaches
    them, so a filter reaches every iteration of every run, whatever ran before."""

    names: Callable[[str], bool]
    hook: Callable
    dir: str
    level: Optional[int]
    is_permanent: bool
    prepend: bool
    attached: set[int] = field(default_factory=set)
    reach: dict[int, Any] = field(default_factory=dict)  # per iteration, what a family's _unreached remembers offering


def _checked_hook(user_hook: Callable) -> Callable:
    """Wrap a forward hook so that a return value that cannot replace the activation (another
    shape, dtype, device, or not a tensor) raises HookError naming the hook point."""

    @functools.wraps(user_hook)
    def checked(activation: Tensor, hook: HookPoint) -> Optional[Tensor]:
        out = user_hook(activation, hook=hook)
        if out is None:
            return None
        if not isinstance(out, Tensor):
            raise HookError(
                f"hook {_hook_label(user_hook)} on {hook.name} returned a {type(out).__name__}; return a tensor "
                f"of shape {tuple(activation.shape)} and dtype {activation.dtype}, or None to keep the activation"
            )
        if out.shape != activation.shape or out.dtype != activation.dtype or out.device != activation.device:
            raise HookError(
                f"hook {_hook_label(user_hook)} on {hook.name} returned shape {tuple(out.shape)} {out.dtype} on "
                f"{out.device}, but the activation is {tuple(activation.shape)} {activation.dtype} on "
                f"{activation.device}; a hook must return the same shape, dtype and device (or None)"
            )
        return out

    return checked


def _hook_label(hook: Callable) -> str:
    func = hook.func if isinstance(hook, functools.partial) else hook
    return repr(getattr(func, "__qualname__", type(func).__name__))


def _has_hooks(module: nn.Module) -> bool:
    return any(isinstance(m, HookPoint) and (m._forward_hooks or m._backward_hooks) for m in module.modules())


class HookedLoopedTransformer(HookedRootModule):
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

    def loop_hook_names(self, iteration: int = 0) -> list[str]:
        """The hook names of one iteration, whether or not its hook points exist yet."""
        return [f"iter.{iteration}.{s}" for s in self._iter_suffixes]

    def hook_names(self, n_loops: Optional[int] = None, **options: Any) -> list[str]:
        """Every hook name a run with `n_loops` iterations (and the family's run `options`) fires,
        in the order they fire."""
        T = check_n_loops(n_loops, self.cfg.default_loops)
        with self._options(**options):  # without options: the checkpoint's own, whatever an outer call runs
            fixed = [n for n in self.hook_dict if not n.startswith("iter.") and n not in self._silent_hooks]
            before = [n for n in fixed if n.startswith(("hook_embed", "hook_pos_embed", "prelude."))]
            after = [n for n in fixed if n not in before]
            return before + [n for t in range(T) for n in self.loop_hook_names(t)] + after

    def ensure_loops(self, n_loops: int) -> None:
        """Create the hook points of iterations 0..n_loops-1 now (they are otherwise created when
        a hook or cache reaches them, and dropped when nothing is attached any more)."""
        self._materialise(range(check_n_loops(n_loops, self.cfg.default_loops)))

    def _iteration_hooks(self, t: int) -> Any:
        """The hooks container of iteration t: its hook points if they exist, else NO_HOOKS."""
        return self.iter[str(t)] if str(t) in self.iter else NO_HOOKS

    def _materialise(self, iterations: Any) -> None:
        missing = [t for t in iterations if str(t) not in self.iter]
        for t in missing:
            self.iter[str(t)] = self._spare_hooks.pop() if self._spare_hooks else self._new_iteration_hooks()
        if missing:
            self.setup()

    def _new_iteration_hooks(self) -> nn.Module:
        """A fresh hook container for one iteration."""
        return self.iteration_hooks_cls(self.cfg)

    def _release(self) -> None:
        """Drop the hook points of iterations where nothing is attached any more (keeping a few
        containers to reuse, so repeated hooked runs do not rebuild them)."""
        self._drop([k for k, it in self.iter.items() if not _has_hooks(it) and k not in self._pinned_iterations])

    def _drop(self, keys: Sequence[str]) -> None:
        """Drop these iterations' containers (keeping a few to reuse)."""
        for k in keys:
            container = self.iter[k]
            del self.iter[k]
            if len(self._spare_hooks) < SPARE_ITERATION_HOOKS:
                container.clear_hook_contexts()
                self._spare_hooks.append(container)
        if keys:
            self.setup()

    @property
    def _silent_hooks(self) -> frozenset[str]:
        """Hook points that exist but never fire: the final norm's when the model applies that
        norm inside every iteration instead (Ouro: `iter.{t}.ln_state.*`)."""
        return frozenset() if self.cfg.final_norm else frozenset({"ln_final.hook_scale", "ln_final.hook_normalized"})

    def _hook_point(self, name: str) -> HookPoint:
        """The hook point called `name`, creating its iteration's hook points if needed."""
        if name in self._silent_hooks:
            raise HookNameError(f"{name!r} never fires on this model: its final norm runs inside every iteration "
                                f"(hook iter.{{t}}.ln_state.* instead)")
        hp = self.mod_dict.get(name)
        if isinstance(hp, HookPoint):
            return hp
        if hook_name_problem(name):
            raise HookNameError(hook_name_problem(name))
        named = self._iterations_named([name])
        if named:
            self._materialise(named)
            return self.mod_dict[name]
        try:
            parts = parse_hook_name(name)
        except ValueError:
            parts = None
        t = parts.iteration if parts is not None and parts.iteration is not None else 0
        known = [n for n in self.hook_dict if not n.startswith("iter.")] + self.loop_hook_names(t)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise HookNameError(f"no hook point named {name!r} on this model{hint} (model.hook_names(T) lists them all)")

    def _iterations_named(self, names: Sequence[Any]) -> list[int]:
        """The iterations whose hook points these names (of any run length) refer to."""
        found = set()
        for name in names:
            if hook_iteration(name) is not None and name.split(".", 2)[-1] in self._iter_suffixes:
                found.add(hook_iteration(name))
        return sorted(found)

    # ------------------------------------------------------------------ hooks (TransformerLens API)
    @contextmanager
    def hooks(self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Any:
        """TransformerLens's `hooks` context; the iterations its hook names reach get their hook
        points in one pass (they are dropped again when the context resets its hooks)."""
        self._materialise(self._iterations_named([name for name, _ in [*fwd_hooks, *bwd_hooks]]))
        with super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts) as model:
            yield model

    def add_hook(
        self,
        name: Union[str, Callable[[str], bool]],
        hook: Callable,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: Optional[int] = None,
        prepend: bool = False,
    ) -> None:
        """TransformerLens's `add_hook`. A name creates its iteration's hook points; a filter
        applies to every iteration of every later run (its hook points are created as runs reach
        them). Forward hooks that return a wrong shape, dtype or type raise HookError."""
        if not callable(hook):
            raise TypeError(f"the hook for {name if isinstance(name, str) else 'a filter'!r} is a {type(hook).__name__}, "
                            "not a function (activation, hook) -> activation or None")
        fn = _checked_hook(hook) if dir == "fwd" else hook
        if isinstance(name, str):
            try:
                hp = self._hook_point(name)
                self.check_and_add_hook(hp, name, fn, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)
            except BaseException:
                self._release()  # a refused name leaves no hook points behind
                raise
            return
        if not callable(name):
            raise TypeError(f"a hook name must be a string or a filter function, got {type(name).__name__}")
        for n, hp in list(self.hook_dict.items()):
            if not n.startswith("iter.") and n not in self._silent_hooks and name(n):
                self.check_and_add_hook(hp, n, fn, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)
        self._filter_hooks.append(_FilterHook(name, fn, dir, level, is_permanent, prepend))

    def _enable_hook(self, name: Union[str, Callable], hook: Callable, dir: str) -> None:
        self.add_hook(name, hook, dir=dir, level=self.context_level)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False, level: Optional[int] = None) -> None:
        """TransformerLens's hook removal; also forgets matching filter hooks and drops the hook
        points of iterations left with no hooks."""
        super().remove_all_hook_fns(direction, including_permanent=including_permanent, level=level)
        self._filter_hooks = [
            f for f in self._filter_hooks
            if not ((direction in ("both", f.dir)) and (including_permanent or not f.is_permanent) and (level is None or f.level == level))
        ]
        self._release()

    def _enter_pass(self, t: int) -> Any:
        """The hook container of pass t as the loop reaches it, after giving every filter hook
        the names of pass t it has not been offered yet (creating their hook points now). A
        container made here for forward filter hooks alone is dropped again when the pass ends
        (`_leave_pass`), so hooks by filter cost memory for one pass at a time, whatever the run's
        length."""
        todo = [(f, names) for f in self._filter_hooks if (names := [n for n in self._unreached(f, t) if f.names(n)])]
        if todo:
            fresh = str(t) not in self.iter
            self._materialise([t])
            for f, names in todo:
                for n in names:
                    self.check_and_add_hook(self.mod_dict[n], n, f.hook, dir=f.dir, is_permanent=f.is_permanent,
                                            level=f.level, prepend=f.prepend)
            if fresh and all(f.dir == "fwd" for f, _ in todo):
                self._passing.add(t)
        return self._iteration_hooks(t)

    def _leave_pass(self, t: int) -> None:
        """Drop pass t's container if `_enter_pass` made it for forward filter hooks alone (and
        nothing was added to it by name since); filters will be offered pass t again next run."""
        if t not in self._passing:
            return
        self._passing.discard(t)
        container = self.iter[str(t)]
        if self._named_hook_at(container):
            return
        for module in container.modules():
            if isinstance(module, HookPoint):
                module.remove_hooks("both", including_permanent=True)
        for f in self._filter_hooks:
            f.attached.discard(t)
            f.reach.pop(t, None)
        self._drop([str(t)])

    def _unreached(self, f: _FilterHook, t: int) -> list[str]:
        """The hook names of iteration t in this run that filter hook `f` has not been offered
        yet (marking them offered)."""
        if t in f.attached:
            return []
        f.attached.add(t)
        return self.loop_hook_names(t)

    def _named_hook_at(self, module: nn.Module) -> Optional[str]:
        """The name of a hook point under `module` holding a hook added by name, or None. Hooks a
        filter function attached are left out: a filter applies to whatever each run reaches."""
        by_filter = {id(f.hook) for f in self._filter_hooks}
        for m in module.modules():
            if isinstance(m, HookPoint) and any(id(h.user_hook) not in by_filter for h in [*m.fwd_hooks, *m.bwd_hooks]):
                return m.name
        return None

    def _run_label(self, n_loops: int) -> str:
        """How a run's length reads in messages."""
        return f"n_loops={n_loops}"

    def _check_hooks_fire(self, n_loops: int) -> None:
        """Refuse hooks added by name on iterations this run does not reach (they would not fire)."""
        for key, it in self.iter.items():
            hooked = self._named_hook_at(it) if int(key) >= n_loops else None
            if hooked:
                raise HookNameError(
                    f"a hook is attached at {hooked}, but this run has {self._run_label(n_loops)} (iterations "
                    f"0..{n_loops - 1}): it would not fire. Run more iterations, or remove it with model.reset_hooks()"
                )

    # ------------------------------------------------------------------ tokens
    def to_tokens(self, text: Union[str, Sequence[str]], prepend_bos: bool = True) -> Int[Tensor, "batch pos"]:
        """Tokenize with the attached tokenizer; a list of strings is right-padded."""
        return self.tokenize(text, prepend_bos=prepend_bos)[0]

    def tokenize(
        self, text: Union[str, Sequence[str]], prepend_bos: bool = True
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Tokens and attention mask (1 = real token) for one string or a list, right-padded."""
        if self.tokenizer is None:
            raise ValueError("this model carries no tokenizer; pass token ids instead of text")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text given: an empty list of prompts")
        tokens, mask = encode_batch(self.tokenizer, texts, prepend_bos=prepend_bos, d_vocab=self.cfg.d_vocab)
        return tokens.to(self.device), mask.to(self.device)

    def to_str_tokens(self, text_or_tokens: Union[str, Tensor, Sequence[int]]) -> list[str]:
        """The string of every token (of a text, or of token ids)."""
        if self.tokenizer is None:
            raise ValueError("this model carries no tokenizer")
        if isinstance(text_or_tokens, str):
            ids = self.to_tokens(text_or_tokens)[0].tolist()
        else:
            ids = torch.as_tensor(text_or_tokens).reshape(-1).tolist()
        return decode_each(self.tokenizer, ids)

    def as_tokens(self, input: TokensLike, name: str = "tokens") -> tuple[Tensor, Optional[Tensor]]:
        """Token ids [batch, pos] on the model's device (and the padding mask when text was
        given), checked: integer, 2-d (or 1-d), not empty, inside the vocabulary. Errors name
        the argument as `name`."""
        if isinstance(input, (list, tuple)) and len(input) == 0:
            raise ValueError("empty input: an empty list of prompts")
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            tokens, mask = self.tokenize(input)
            return tokens, mask
        try:
            tokens = torch.as_tensor(input, device=self.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"input must be token ids [batch, pos] or text, got {type(input).__name__}: {err}") from err
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor [batch, pos], got shape {tuple(tokens.shape)} dtype {tokens.dtype}")
        if tokens.numel() == 0:
            raise ValueError(f"empty input: {name} has shape {tuple(tokens.shape)}; give at least one token per prompt")
        if tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab:
            raise ValueError(f"{name}: token ids must lie in [0, {self.cfg.d_vocab}), got [{int(tokens.min())}, {int(tokens.max())}]")
        return tokens.long(), None

    # ------------------------------------------------------------------ checks, once per forward
    def _prepare(
        self,
        input: TokensLike,
        n_loops: Any,
        attention_mask: Optional[Tensor],
        return_type: Optional[str],
        exit: Union[None, str, int],
        stop_at_layer: Any,
        seed: Any = None,
        generator: Optional[torch.Generator] = None,
        initial_state: Optional[Tensor] = None,
    ) -> Run:
        """Check every argument before any compute and return the run's settings."""
        cfg = self.cfg
        T = check_n_loops(n_loops, cfg.default_loops)
        tokens, text_mask = self.as_tokens(input)
        B, S = tokens.shape
        self._check_start(seed, generator, initial_state, self._state_shape(B, S))
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {list(RETURN_TYPES)}, got {return_type!r}")
        if return_type in ("loss", "both") and S < 2:
            raise ValueError(f"a loss needs at least 2 tokens per prompt (it predicts each next token); got {S}")
        mask = self._check_mask(attention_mask if attention_mask is not None else text_mask, B, S)
        if cfg.positional_embedding_type == "learned" and S > cfg.n_ctx:
            raise ValueError(f"sequence length {S} exceeds n_ctx={cfg.n_ctx} (learned position embeddings)")
        if cfg.positional_embedding_type == "rotary" and S > cfg.n_ctx and not self._warned_long_input:
            self._warned_long_input = True
            warnings.warn(f"input of {S} tokens is longer than n_ctx={cfg.n_ctx}: the model was not trained on "
                          "sequences this long", stacklevel=3)
        depth = self._depth(T)
        if stop_at_layer is not None:
            if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, numbers.Integral):
                raise ValueError(f"stop_at_layer must be an integer, got {stop_at_layer!r}")
            if not -depth <= stop_at_layer <= depth:
                raise ValueError(f"stop_at_layer={stop_at_layer} is outside [-{depth}, {depth}] (the unrolled depth at "
                                 f"{self._run_label(T)})")
            stop_at_layer = int(stop_at_layer) % depth if stop_at_layer < 0 else int(stop_at_layer)
        self._check_hooks_fire(T)
        rope = self._rope(S, tokens.device)
        return Run(tokens, T, self._resolve_exit(exit, T, return_type), mask, self.rotary, rope, stop_at_layer,
                   start=initial_state, seed=seed, generator=generator)

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

    @staticmethod
    def _check_start(seed: Any, generator: Any, initial_state: Any, shape: tuple[int, int, int]) -> None:
        """The start-state arguments: at most one of seed / generator / initial_state, each valid."""
        given = [n for n, v in (("seed", seed), ("generator", generator), ("initial_state", initial_state)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of seed=, generator= or initial_state=, not {' and '.join(given)}")
        if seed is not None:
            check_seed(seed)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        real_tensor(initial_state, "initial_state")
        if isinstance(initial_state, str):  # "zeros" / "embed", as the CLI's --initial-state
            if initial_state not in ("zeros", "embed"):
                raise ValueError(f"initial_state must be a tensor {shape}, 'zeros' or 'embed', got {initial_state!r}")
        elif initial_state is not None and (not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != shape):
            got = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else type(initial_state).__name__
            raise ValueError(f"initial_state has shape {got}, expected {shape} [batch, pos, state width]")

    def _check_mask(self, mask: Optional[Tensor], B: int, S: int) -> Optional[Tensor]:
        if mask is None:
            return None
        real_tensor(mask, "attention_mask")
        mask = torch.as_tensor(mask, device=self.device)
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but the tokens have shape {(B, S)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask marks no real token in prompt(s) {empty}")
        return None if bool(mask.all()) else mask.long()

    def _resolve_exit(self, exit: Union[None, str, int], T: int, return_type: Optional[str]) -> Union[str, int]:
        """The exit a run takes. With `exit=None` it is the checkpoint's own default: for Ouro the
        gate's threshold exit (or `early_exit_step`), and the weighted exit when a loss is asked
        for, as `OuroForCausalLM.forward` does with labels."""
        gated = self.exit_gate is not None
        if exit is None:
            if gated and return_type in ("loss", "both"):
                return "weighted"
            exit = self.cfg.default_exit
            if isinstance(exit, int) and not isinstance(exit, bool) and not 0 <= exit < T:
                exit = "threshold"
        elif isinstance(exit, bool) or not (exit in EXIT_MODES or (isinstance(exit, numbers.Integral) and -T <= exit < T)):
            raise ValueError(f"exit must be one of {EXIT_MODES} or an iteration index in [-{T}, {T}), got {exit!r}")
        if isinstance(exit, numbers.Integral) and exit < 0:
            exit = T + int(exit)
        if exit in ("weighted", "threshold") and not gated:
            raise ValueError(f"exit={exit!r} needs a model with an exit gate (Ouro)")
        if isinstance(exit, numbers.Integral) and exit == T - 1:
            return "last"
        return exit if isinstance(exit, str) else int(exit)

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
        self._check_listed_reached(names_filter, cache_dict, kwargs.get("stop_at_layer"))  # [tl-compat]
        if cache_dtype is not None:
            cache_dict = {k: v.to(cache_dtype) if v.is_floating_point() else v for k, v in cache_dict.items()}
        has_batch = not kwargs.get("remove_batch_dim", False)
        return out, self._cache_cls(cache_dict, self, n_loops=T, has_batch_dim=has_batch, schedule=self._schedule(T))

    def _names_in_run(self, names_filter: NamesFilter, n_loops: int) -> set[str]:
        """The hook names a filter selects among those a run of `n_loops` fires; creates their
        iterations' hook points."""
        if isinstance(names_filter, str) or (isinstance(names_filter, Sequence) and not callable(names_filter)):
            listed = [names_filter] if isinstance(names_filter, str) else list(names_filter)
            self._materialise(self._iterations_named(listed))
            for name in listed:
                self._hook_point(name)
                parts = parse_hook_name(name) if name.startswith("iter.") else None
                if parts is not None and parts.iteration >= n_loops:
                    raise HookNameError(f"{name!r} is at iteration {parts.iteration}, but this run has n_loops={n_loops}")
            return set(listed)
        if names_filter is not None and not callable(names_filter):
            raise ValueError(f"names_filter must be None, a name, a list of names or a function, got {type(names_filter).__name__}")
        keep = names_filter or (lambda name: True)
        wanted = {n for n in self.hook_dict if not n.startswith("iter.") and n not in self._silent_hooks and keep(n)}
        hooked = []
        for t in range(n_loops):
            names = [n for n in self.loop_hook_names(t) if keep(n)]
            if names:
                hooked.append(t)
                wanted.update(names)
        self._materialise(hooked)
        return wanted

    def _loops_of(self, args: tuple, kwargs: dict) -> int:
        return check_n_loops(kwargs.get("n_loops", args[1] if len(args) > 1 else None), self.cfg.default_loops)

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
    _pinned_iterations: frozenset[str] = frozenset()  # iterations kept materialised for nnsight (pin_loops)

    def unrolled(self, n_loops: Optional[int] = None, **run_kwargs: Any) -> Any:
        """This model run `n_loops` times, as a TransformerLens `HookedRootModule` of depth
        `cfg.n_layers` = the unrolled depth, sharing these weights: hook names `hook_embed`,
        `blocks.{k}.*`, `ln_final.*`, TransformerLens's cfg, forward keywords, tokenizer helpers
        and weights stacked over depth, `loop_index(k)` back to (phase, iteration, layer).
        `run_kwargs` (seed=, exit=, initial_state=, the family's run options...) go to every forward.
        See `loop_lens.model.unrolled.UnrolledModel` and docs/interop.md."""
        from loop_lens.model.unrolled import UnrolledModel

        return UnrolledModel(self, n_loops, **run_kwargs)

    def pin_loops(self, n_loops: Optional[int] = None) -> HookedLoopedTransformer:
        """Create the hook points of iterations 0..n_loops-1 and keep them (they are otherwise
        created when a hook reaches them and dropped when idle), so that tools which walk the
        module tree once, such as nnsight's `NNsight(model)`, find every iteration. Returns the
        model. `pin_loops(0)` unpins."""
        T = integer(n_loops if n_loops is not None else self.cfg.default_loops, "n_loops")
        if T < 0:
            raise ValueError(f"n_loops must be >= 0, got {T}")
        self._materialise(range(T))
        self._pinned_iterations = frozenset(str(t) for t in range(T))
        self._release()
        return self

    def _tl_text_input(self, input: Any, attention_mask: Any, prepend_bos: Optional[bool], padding_side: Optional[str]):
        """TransformerLens's `prepend_bos` / `padding_side` for text input (tokens pass unchanged)."""
        from loop_lens.model.tl_compat import check_padding_side

        check_padding_side(padding_side)
        if prepend_bos is not None and not isinstance(prepend_bos, bool):
            raise ValueError(f"prepend_bos must be None, True or False, got {prepend_bos!r}")
        text = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
        if prepend_bos is None or not text:
            return input, attention_mask
        tokens, mask = self.tokenize(input, prepend_bos=prepend_bos)
        return tokens, attention_mask if attention_mask is not None else mask

    def _check_listed_reached(self, names_filter: Any, cache_dict: dict, stop_at_layer: Any) -> None:
        """A hook name listed in names_filter that a stop_at_layer run never reached raises (as a
        hook added on an iteration the run does not reach does)."""
        if stop_at_layer is None or callable(names_filter) or names_filter is None:
            return
        listed = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        missing = [n for n in listed if n not in cache_dict]
        if missing:
            raise HookNameError(f"names_filter lists {missing[:5]}, but the run stops at stop_at_layer={stop_at_layer} "
                                "before reaching them: they would not be cached. Cache them in a run with a larger "
                                "stop_at_layer (or none)")

    def setup(self) -> None:
        """TransformerLens's setup; `hook_dict` then names, on a missing iteration hook, the call
        that creates it (iteration hook points exist only while hooked, cached or pinned)."""
        super().setup()
        self.hook_dict = _HookDict(self.hook_dict)

    def add_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False, device: Any = None,
                          remove_batch_dim: bool = False, cache: Optional[dict] = None) -> dict:
        """TransformerLens's `add_caching_hooks` (and so `cache_all` / `cache_some`): the hooks
        reach every iteration of every later run, whatever its n_loops (a filter hook)."""
        from loop_lens.model.tl_compat import caching_hook, names_filter_fn

        cache = {} if cache is None else cache
        keep = names_filter_fn(names_filter)
        self.is_caching = True
        self.add_hook(keep, caching_hook(cache, device, remove_batch_dim, False), "fwd")
        if incl_bwd:
            self.add_hook(keep, caching_hook(cache, device, remove_batch_dim, True), "bwd")
        return cache

    def get_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False, device: Any = None,
                          remove_batch_dim: bool = False, cache: Optional[dict] = None, pos_slice: Any = None,
                          n_loops: Optional[int] = None) -> tuple[dict, list, list]:
        """TransformerLens's `get_caching_hooks`, over every hook point of a run of `n_loops`
        iterations (default `cfg.default_loops`) and every one that exists now: (cache,
        fwd_hooks, bwd_hooks) for `model.hooks(...)` / `run_with_hooks`."""
        from loop_lens.model.tl_compat import caching_hook, names_filter_fn

        cache = {} if cache is None else cache
        keep = names_filter_fn(names_filter)
        names = [n for n in self.hook_dict if n not in self._silent_hooks]
        names += [n for n in self.hook_names(n_loops) if n not in self.hook_dict]
        self.is_caching = True
        fwd = caching_hook(cache, device, remove_batch_dim, False, pos_slice)
        bwd = caching_hook(cache, device, remove_batch_dim, True, pos_slice)
        chosen = [n for n in names if keep(n)]
        return cache, [(n, fwd) for n in chosen], [(n, bwd) for n in chosen] if incl_bwd else []

    to_string = tl_compat.to_string
    to_single_token = tl_compat.to_single_token
    get_token_position = tl_compat.get_token_position


class _HookDict(dict):
    """`hook_dict`: the hook points that exist now. A missing `iter.*` name raises a KeyError
    naming the calls that create or list iteration hook points."""

    def __missing__(self, key: Any) -> Any:
        if isinstance(key, str) and key.startswith("iter."):
            raise KeyError(f"{key!r}: iteration hook points exist only while something is hooked, cached or pinned "
                           "there. model.hook_names(n_loops) lists every name of a run; model.pin_loops(n_loops) "
                           "creates and keeps them; run_with_cache / run_with_hooks / add_hook create them as needed")
        raise KeyError(key)

