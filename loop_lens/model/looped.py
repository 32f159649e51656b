"""HookedLoopedTransformer: prelude -> loop (one block, `n_loops` times) -> coda, hooked per iteration."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from loop_lens.config import LoopConfig
from loop_lens.model.components import Block, Injection, Norm, Rotary
from loop_lens.model.hooks import NO_HOOKS, BlockHooks, IterationHooks, NormHooks

TokensLike = Union[str, Sequence[str], Int[Tensor, "batch pos"], Int[Tensor, " pos"]]
EXIT_MODES = ("last", "weighted", "threshold")


class HookedNorm(Norm):
    """A norm used at one site only, so it owns its hook points (`ln_final.hook_scale`, ...)."""

    def __init__(self, d: int, kind: str, eps: float):
        super().__init__(d, kind, eps)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor, hooks=None) -> Tensor:
        return super().forward(x, self if hooks is None else hooks)


class HookedLoopedTransformer(HookedRootModule):
    """A looped transformer whose hook names carry the iteration: `iter.{t}.blocks.{l}.*`.

    Parameters exist once (`prelude_blocks`, `blocks` for the recurrent block, `coda_blocks`);
    hook points exist per site (`prelude.{l}`, `iter.{t}.blocks.{l}`, `coda.{l}`). Hook points for
    a new iteration count are added on first use and kept.
    """

    def __init__(self, cfg: LoopConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
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
        self.iter = nn.ModuleList()
        self.coda_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.coda = nn.ModuleList(BlockHooks(cfg) for _ in range(cfg.n_coda))
        self.ln_final = HookedNorm(D, cfg.normalization_type, cfg.norm_eps)
        if cfg.norm_after_loop:
            self.ln_loop = NormHooks()
        self.hook_latent = HookPoint()  # the state handed to the coda (after any post-loop norm)
        self.unembed = nn.Linear(D, cfg.d_vocab, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.ensure_loops(cfg.default_loops)

    # ------------------------------------------------------------------ structure
    def ensure_loops(self, n_loops: int) -> None:
        """Make sure hook points exist for iterations 0..n_loops-1 (created once, then reused)."""
        if n_loops > len(self.iter):
            for _ in range(len(self.iter), n_loops):
                self.iter.append(IterationHooks(self.cfg))
            self.setup()

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
        """The hook names of one iteration (the loop's slice of `hook_dict`)."""
        self.ensure_loops(iteration + 1)
        prefix = f"iter.{iteration}."
        return [n for n in self.hook_dict if n.startswith(prefix)]

    # ------------------------------------------------------------------ tokens
    def to_tokens(self, text: Union[str, Sequence[str]], prepend_bos: bool = True) -> Int[Tensor, "batch pos"]:
        """Tokenize with the attached tokenizer; a list of strings is right-padded."""
        return self.tokenize(text, prepend_bos=prepend_bos)[0]

    def tokenize(
        self, text: Union[str, Sequence[str]], prepend_bos: bool = True
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Tokens and attention mask (1 = real token) for one string or a list, right-padded."""
        from loop_lens.tokenization import encode_batch

        if self.tokenizer is None:
            raise ValueError("this model carries no tokenizer; pass token ids instead of text")
        texts = [text] if isinstance(text, str) else list(text)
        tokens, mask = encode_batch(self.tokenizer, texts, prepend_bos=prepend_bos)
        return tokens.to(self.device), mask.to(self.device)

    def to_str_tokens(self, text_or_tokens: Union[str, Tensor, Sequence[int]]) -> list[str]:
        from loop_lens.tokenization import decode_each

        if self.tokenizer is None:
            raise ValueError("this model carries no tokenizer")
        if isinstance(text_or_tokens, str):
            ids = self.to_tokens(text_or_tokens)[0].tolist()
        else:
            ids = torch.as_tensor(text_or_tokens).reshape(-1).tolist()
        return decode_each(self.tokenizer, ids)

    def _as_tokens(self, input: TokensLike) -> Tensor:
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            return self.to_tokens(input)
        tokens = torch.as_tensor(input, device=self.device)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [batch, pos], got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab):
            raise ValueError(f"token ids must lie in [0, {self.cfg.d_vocab}), got [{tokens.min()}, {tokens.max()}]")
        return tokens

    # ------------------------------------------------------------------ the forward pass
    def initial_state(
        self,
        e: Float[Tensor, "batch pos d_model"],
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The state entering iteration 0, from `cfg.initial_state` (embedding, zeros or
        truncated normal with `cfg.init_std`, times `cfg.init_scale`)."""
        kind = self.cfg.initial_state
        if kind == "embed":
            return e
        if kind == "zeros" or self.cfg.init_std == 0:
            return torch.zeros_like(e)
        if generator is None and seed is not None:
            generator = torch.Generator(device=e.device).manual_seed(seed)
        std = self.cfg.init_std
        s = torch.empty(e.shape, dtype=torch.float32, device=e.device)
        nn.init.trunc_normal_(s, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return (s * self.cfg.init_scale).to(e.dtype)

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
        exit: Union[str, int] = "last",
        stop_at_layer: Optional[int] = None,
        loss_per_token: bool = False,
    ) -> Any:
        """Run the model.

        Args:
            input: token ids [batch, pos] (or [pos]), or text when a tokenizer is attached.
            n_loops: iterations of the recurrent block (default `cfg.default_loops`); any int >= 1.
            initial_state: the state entering iteration 0, [batch, pos, d_model]; overrides
                `cfg.initial_state`. The state used is always visible at `iter.0.hook_state_pre`.
            generator / seed: randomness for a truncated-normal start state.
            attention_mask: [batch, pos], 1 for real tokens (padding is masked out of keys).
            return_type: "logits", "loss", "both" (logits, loss) or None.
            exit: "last" (logits after the last iteration), an int t (exit after iteration t),
                "weighted" (Ouro: sum_t p_t * logits_t) or "threshold" (Ouro: first t whose
                cumulative exit probability reaches `cfg.early_exit_threshold`).
            stop_at_layer: stop before this unrolled depth and return the residual stream there.
        """
        cfg = self.cfg
        tokens = self._as_tokens(input)
        T = cfg.default_loops if n_loops is None else n_loops
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ValueError(f"n_loops must be a positive int, got {n_loops!r}")
        if exit not in EXIT_MODES and not (isinstance(exit, int) and 0 <= exit < T):
            raise ValueError(f"exit must be one of {EXIT_MODES} or an iteration index < {T}, got {exit!r}")
        if exit in ("weighted", "threshold") and self.exit_gate is None:
            raise ValueError(f"exit={exit!r} needs a model with an exit gate (Ouro)")
        depth_total = cfg.depth(T)
        if stop_at_layer is not None and stop_at_layer < 0:
            stop_at_layer += depth_total
        self.ensure_loops(T)
        B, S = tokens.shape
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            if tuple(attention_mask.shape) != (B, S):
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape {(B, S)}")
            if bool(attention_mask.all()):
                attention_mask = None
        rope = self.rotary(S, tokens.device) if self.rotary is not None else None
        run = lambda blk, x, hooks: blk(x, hooks, self.rotary, rope, attention_mask)  # noqa: E731

        x = self.hook_embed(self.embed(tokens) * cfg.embed_scale)
        if cfg.positional_embedding_type == "learned":
            if S > cfg.n_ctx:
                raise ValueError(f"sequence length {S} exceeds n_ctx={cfg.n_ctx}")
            x = x + self.hook_pos_embed(self.pos_embed(torch.arange(S, device=tokens.device)))[None]
        depth = 0
        for blk, hooks in zip(self.prelude_blocks, self.prelude):
            if depth == stop_at_layer:
                return x
            x, depth = run(blk, x, hooks), depth + 1
        e = x
        if initial_state is not None:
            if tuple(initial_state.shape) != tuple(e.shape):
                raise ValueError(f"initial_state shape {tuple(initial_state.shape)} != expected {tuple(e.shape)}")
            s = initial_state.to(device=e.device, dtype=e.dtype)
        else:
            s = self.initial_state(e, generator=generator, seed=seed)
        keep_states = exit != "last"
        states, gates = [], []
        for t in range(T):
            it = self.iter[t]
            s = it.hook_state_pre(s)
            if self.injection is not None:
                s = it.hook_injected(self.injection(s, e))
            for blk, hooks in zip(self.blocks, it.blocks):
                if depth == stop_at_layer:
                    return s
                s, depth = run(blk, s, hooks), depth + 1
            if cfg.iter_norm:
                s = self.ln_final(s, it.ln_state)
            s = it.hook_state_post(s)
            if self.exit_gate is not None:
                gates.append(it.hook_exit_logit(self.exit_gate(s).squeeze(-1)))
            if keep_states:
                states.append(s)
        if stop_at_layer is not None and stop_at_layer >= depth_total:
            raise ValueError(f"stop_at_layer={stop_at_layer} is past the unrolled depth {depth_total}")
        x = self._to_coda(s, hooked=True)
        for blk, hooks in zip(self.coda_blocks, self.coda):
            if depth == stop_at_layer:
                return x
            x, depth = run(blk, x, hooks), depth + 1
        logits = self.unembed(self.ln_final(x) if cfg.final_norm else x)
        if keep_states:
            logits = self._exit_logits(states, gates, exit, attention_mask, logits)
        return self._outputs(logits, tokens, attention_mask, return_type, loss_per_token)

    def _to_coda(self, s: Tensor, hooked: bool) -> Tensor:
        if self.cfg.norm_after_loop:
            s = self.ln_final(s, self.ln_loop if hooked else NO_HOOKS)
        return self.hook_latent(s) if hooked else s

    def finish(
        self,
        state: Float[Tensor, "batch pos d_model"],
        attention_mask: Optional[Tensor] = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits from a state leaving an iteration: the rest of the network (post-loop norm,
        coda, final norm, unembedding), with no hooks. For Huginn this is the coda lens; for a
        model without a coda it is the logit lens of the state."""
        S = state.shape[1]
        rope = self.rotary(S, state.device) if self.rotary is not None else None
        x = self._to_coda(state, hooked=False)
        for blk in self.coda_blocks:
            x = blk(x, NO_HOOKS, self.rotary, rope, attention_mask)
        return self.unembed(self.ln_final(x, NO_HOOKS) if self.cfg.final_norm else x)

    def exit_distribution(self, gate_logits: Float[Tensor, "T batch pos"]) -> Float[Tensor, "T batch pos"]:
        """Ouro's exit probabilities: p_t = lambda_t prod_{j<t}(1 - lambda_j), the last step
        taking the remaining mass (lambda = sigmoid(gate))."""
        lam = torch.sigmoid(gate_logits.float())
        survive = torch.cumprod(1 - lam, dim=0)
        survive_before = torch.cat([torch.ones_like(lam[:1]), survive[:-1]], dim=0)
        p = lam * survive_before
        p[-1] = survive_before[-1]
        return p

    def _exit_logits(self, states, gates, exit, mask, last_logits) -> Tensor:
        if isinstance(exit, int):
            return last_logits if exit == len(states) - 1 else self.finish(states[exit], mask)
        step_logits = torch.stack([self.finish(s, mask) for s in states[:-1]] + [last_logits])
        p = self.exit_distribution(torch.stack(gates))  # [T, batch, pos]
        if exit == "weighted":
            return (p[..., None] * step_logits.float()).sum(0).to(last_logits.dtype)
        reached = torch.cumsum(p, dim=0) >= self.cfg.early_exit_threshold
        reached[-1] = True
        first = reached.float().argmax(dim=0)  # [batch, pos]
        idx = first[None, ..., None].expand(1, *step_logits.shape[1:])
        return step_logits.gather(0, idx)[0]

    def _outputs(self, logits, tokens, mask, return_type, per_token):
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if return_type not in ("loss", "both"):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
        if per_token:
            loss = nll
        elif mask is not None:
            m = mask[:, 1:].float()
            loss = (nll * m).sum() / m.sum()
        else:
            loss = nll.mean()
        return loss if return_type == "loss" else (logits, loss)

    # ------------------------------------------------------------------ TransformerLens run methods
    def run_with_hooks(self, *model_args: Any, fwd_hooks=(), bwd_hooks=(), **kwargs: Any) -> Any:
        """TransformerLens's run_with_hooks; hook points for `n_loops` iterations exist first."""
        self.ensure_loops(self._loops_of(model_args, kwargs))
        return super().run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), **kwargs)

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: Union[None, str, list[str], Callable[[str], bool]] = None,
        cache_dtype: Optional[torch.dtype] = None,
        **kwargs: Any,
    ) -> tuple[Any, LoopCache]:  # noqa: F821
        """Run and cache activations; returns (output, LoopCache).

        Accepts TransformerLens's options (`names_filter` as str / list / callable, `device`,
        `pos_slice`, `remove_batch_dim`, ...) and `cache_dtype` to store activations smaller.
        """
        from loop_lens.cache import LoopCache

        n_loops = self._loops_of(model_args, kwargs)
        self.ensure_loops(n_loops)
        out, cache_dict = super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)
        if cache_dtype is not None:
            cache_dict = {k: v.to(cache_dtype) if v.is_floating_point() else v for k, v in cache_dict.items()}
        has_batch = not kwargs.get("remove_batch_dim", False)
        return out, LoopCache(cache_dict, self, n_loops=n_loops, has_batch_dim=has_batch)

    def _loops_of(self, args: tuple, kwargs: dict) -> int:
        n = kwargs.get("n_loops", args[1] if len(args) > 1 else None)
        return self.cfg.default_loops if n is None else int(n)

    # ------------------------------------------------------------------ saving
    def save(self, directory: Union[str, Path]) -> Path:
        """Write loop_lens's native format: `model.safetensors` + `loop_config.json`
        (+ `tokenizer.json` when a `tokenizers` tokenizer is attached)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            state.pop("unembed.weight", None)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "loop_lens"})
        self.cfg.to_json(d / "loop_config.json")
        if self.tokenizer is not None and hasattr(self.tokenizer, "to_str"):
            (d / "tokenizer.json").write_text(self.tokenizer.to_str())
        return d

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
