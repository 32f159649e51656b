"""`model.unrolled(n_loops=T)`: the looped model as a plain TransformerLens model of depth `T`.

`UnrolledModel` is a `HookedRootModule` that shares the looped model's weights and runs its
forward pass, but whose hook names are TransformerLens's over the *unrolled depth*: `hook_embed`,
`blocks.{k}.*` (prelude layers first, then every iteration's block, then the coda) and
`ln_final.*`. Its `cfg` has `n_layers` = the unrolled depth, `device`, `n_heads`, `d_head`, ...,
its `blocks[k]` carry TransformerLens's weight names (`attn.W_Q`, `mlp.W_out`, `ln1.w`, ...), and
its forward takes TransformerLens's keywords. So tools written for TransformerLens models
(`transformer_lens.patching`, `utilities.get_act_name`, SAELens's activation store and trainer)
run on it unmodified.

How the hooks reach the run: a hook attached to `blocks.{k}.attn.hook_z` of the view is carried,
for each forward, by a hook on the looped model's own hook point at that depth
(`iter.{t}.blocks.{l}.attn.hook_z`, found by `loop_index(k)`), which passes the activation
through the view's hook point. What the view's hook returns replaces the activation, so
patching, ablation and splicing work exactly as on the looped model.

Hook points of the loop's bookkeeping, which TransformerLens has no name for, keep their
loop_lens names on the view (`iter.{t}.hook_state_pre`, `iter.{t}.hook_injected`,
`hook_latent`, ...).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from loop_lens.cache import LoopCache, UnrolledCache, UnrolledView, _bias
from loop_lens.checks import check_n_loops
from loop_lens.errors import HookNameError
from loop_lens.model import sites
from loop_lens.model.hooks import NO_HOOKS, Hooks
from loop_lens.model.tl_compat import get_token_position, to_single_token, to_string

if TYPE_CHECKING:
    from loop_lens.model.components import Attention, Block, Norm
    from loop_lens.model.looped import HookedLoopedTransformer

_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
_RANDOM_STARTS = ("trunc_normal", "normal")
# the forward keywords of TransformerLens's HookedTransformer that a looped run has no use for
_UNSUPPORTED = ("start_at_layer", "past_kv_cache", "shortformer_pos_embed", "tokens")


class _Weights:
    """Keeps a weight module without registering it as a submodule (the looped model owns it)."""

    def __init__(self, module: Optional[nn.Module]):
        self.module = module


def _paths(cfg: Any, part: str) -> list[str]:
    """The layer sites under one part of a layer (`attn`, `mlp`), as paths inside it."""
    return [s.path.removeprefix(part + ".") for s in sites.sites("layer", cfg) if s.path.startswith(part + ".")]


class _ViewNorm(Hooks):
    """A norm site's hook points, and its weights under TransformerLens's names (`w`, `b`).
    Calling it applies the norm with no hooks (identity where the model has none)."""

    def __init__(self, norm: Optional[Norm]):
        super().__init__(["hook_scale", "hook_normalized"])
        self._norm = _Weights(norm)

    @property
    def norm(self) -> Optional[Norm]:
        return self._norm.module

    @property
    def weight(self) -> Optional[Tensor]:
        return None if self.norm is None else self.norm.weight

    @property
    def w(self) -> Optional[Tensor]:
        """The norm's scale [d_model] (None for a parameterless norm or no norm)."""
        return self.weight

    @property
    def b(self) -> Optional[Tensor]:
        """The norm's bias [d_model] (LayerNorm only)."""
        return None if self.norm is None else self.norm.bias

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return x if self.norm is None else self.norm(x, NO_HOOKS)


class _ViewAttn(Hooks):
    """One depth's attention hook points and the shared attention weights under TransformerLens's
    names. `W_K` / `W_V` repeat each key/value head over its query heads (TransformerLens's
    grouped-query convention); `_W_K` / `_W_V` are the stored [n_key_value_heads, ...] weights."""

    def __init__(self, cfg: Any, attn: Attention):
        super().__init__(_paths(cfg, "attn"))
        self._attn = _Weights(attn)

    @property
    def _a(self) -> Attention:
        return self._attn.module

    def _repeat(self, w: Tensor) -> Tensor:
        return w.repeat_interleave(self._a.n_heads // self._a.n_kv, dim=0)

    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return self._a.W_Q

    @property
    def _W_K(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self._a.W_K

    @property
    def _W_V(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self._a.W_V

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        return self._repeat(self._a.W_K)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        return self._repeat(self._a.W_V)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return self._a.W_O

    def _proj_bias(self, linear: nn.Linear, heads: int, extra: Optional[Tensor]) -> Tensor:
        b = _bias(linear).reshape(heads, self._a.d_head)
        return b + extra if extra is not None else b

    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        """The query bias (the projection's bias plus a separate qk bias, both added before RoPE)."""
        return self._proj_bias(self._a.q_proj, self._a.n_heads, self._a.q_bias)

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        return self._repeat(self._proj_bias(self._a.k_proj, self._a.n_kv, self._a.k_bias))

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        return self._repeat(self._proj_bias(self._a.v_proj, self._a.n_kv, None))

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        return _bias(self._a.o_proj)

    @property
    def OV(self) -> FactoredMatrix:
        """W_V @ W_O per head: [head, d_model, d_model] as a FactoredMatrix."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q @ W_K^T per head (before RoPE and any qk-norm): [head, d_model, d_model]."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))


class _ViewMLP(Hooks):
    """One depth's MLP hook points and the shared MLP weights under TransformerLens's names
    (`W_gate` for a gated MLP, whose gate feeds `hook_pre` and whose `W_in` feeds `hook_pre_linear`)."""

    def __init__(self, cfg: Any, mlp: nn.Module):
        super().__init__(_paths(cfg, "mlp"))
        self._mlp = _Weights(mlp)

    @property
    def _m(self) -> nn.Module:
        return self._mlp.module

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self._m.up_proj.weight.T

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        return _bias(self._m.up_proj)

    @property
    def W_gate(self) -> Optional[Float[Tensor, "d_model d_mlp"]]:
        return None if self._m.gate_proj is None else self._m.gate_proj.weight.T

    @property
    def b_gate(self) -> Optional[Float[Tensor, " d_mlp"]]:
        return None if self._m.gate_proj is None else _bias(self._m.gate_proj)

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self._m.down_proj.weight.T

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        return _bias(self._m.down_proj)


class _ViewBlock(Hooks):
    """The hook points of one unrolled depth (`blocks.{k}.*`) over the shared weights of the
    layer run there."""

    def __init__(self, cfg: Any, block: Block):
        super().__init__(s.path for s in sites.sites("layer", cfg))
        self.attn = _ViewAttn(cfg, block.attn)
        self.mlp = _ViewMLP(cfg, block.mlp)
        for norm in ("ln1", "ln2", "ln1_post", "ln2_post"):
            if norm in self._modules:
                setattr(self, norm, _ViewNorm(getattr(block, norm)))


class UnrolledConfig:
    """The view's config under TransformerLens's field names: `n_layers` is the unrolled depth;
    `device` and `dtype` follow the weights. `loop_cfg` is the looped model's LoopConfig."""

    def __init__(self, view: UnrolledModel, **fields: Any):
        self._view = _Weights(view)
        self.__dict__.update(fields)

    @property
    def device(self) -> torch.device:
        return self._view.module.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self._view.module.model.dtype

    def to_dict(self) -> dict[str, Any]:
        """Every field, as TransformerLens's config `to_dict()` gives them."""
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        out.update(device=self.device, dtype=self.dtype)
        return out

    def __repr__(self) -> str:
        return f"UnrolledConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items() if k != 'loop_cfg')})"


def _tl_config(view: UnrolledModel, model: HookedLoopedTransformer, depth: int, n_loops: int) -> UnrolledConfig:
    c = model.cfg
    gated = c.mlp_type == "swiglu"
    return UnrolledConfig(
        view,
        n_layers=depth,
        n_loops=n_loops,
        d_model=c.d_model,
        n_heads=c.n_heads,
        d_head=c.d_head,
        d_mlp=c.d_mlp,
        d_vocab=c.d_vocab,
        d_vocab_out=c.d_vocab,
        n_ctx=c.n_ctx,
        n_key_value_heads=c.n_key_value_heads if c.n_key_value_heads not in (None, c.n_heads) else None,
        act_fn="silu" if gated else c.mlp_type,
        gated_mlp=gated,
        normalization_type=c.normalization_type,
        final_rms=c.normalization_type == "RMS",
        eps=c.norm_eps,
        positional_embedding_type=c.positional_embedding_type,
        rotary_dim=c.d_head if c.positional_embedding_type == "rotary" else None,
        rotary_base=c.rope_theta,
        rotary_adjacent_pairs=c.rope_style == "adjacent",
        attention_dir="causal",
        attn_only=False,
        parallel_attn_mlp=False,
        original_architecture=c.family,
        model_name=c.model_name,
        tokenizer_name=None,
        default_prepend_bos=True,
        tokenizer_prepends_bos=True,
        use_attn_result=False,
        use_split_qkv_input=False,
        use_hook_mlp_in=False,
        use_attn_in=False,
        use_hook_tokens=False,
        loop_cfg=c,
    )


class UnrolledModel(HookedRootModule):
    """A looped model run `n_loops` times, seen as a TransformerLens model of depth
    `cfg.n_layers` = the depth of the model's schedule (`n_prelude + n_loops * n_block + n_coda`
    for the plain loop; a family whose pass traverses more layers counts them all).

    Built by `model.unrolled(n_loops=T, **run_kwargs)`; shares the model's weights (its
    parameters are the model's; `to()` / `eval()` act on the model) and runs the model's own
    forward with `run_kwargs` (seed=, exit=, initial_state=, the family's run options...). Every call gives
    exactly what `model(tokens, n_loops=T, **run_kwargs)` gives, and every hook name maps to
    one of the model's hook points (`loop_name(name)`; `loop_index(k)` for a depth).

    A model with a random start state (Huginn) and no seed= / generator= / initial_state= in
    `run_kwargs` runs with seed=0, as `loop_lens.patching` does, so that repeated runs (clean and
    corrupted, cached and patched) start from the same state.
    """

    def __init__(self, model: HookedLoopedTransformer, n_loops: Optional[int] = None, **run_kwargs: Any):
        super().__init__()
        T = check_n_loops(n_loops, model.cfg.default_loops)
        for key in ("n_loops", "return_type", "stop_at_layer", "attention_mask", "loss_per_token"):
            if key in run_kwargs:
                raise ValueError(f"unrolled(): {key}= is an argument of each call on the view, not of the view itself")
        if model.cfg.initial_state in _RANDOM_STARTS and not any(run_kwargs.get(k) is not None for k in
                                                                  ("seed", "generator", "initial_state")):
            run_kwargs["seed"] = 0
        self.model = model  # a submodule: the view's parameters are the model's (setup() skips its hook points)
        self.n_loops = T
        self.run_kwargs = dict(run_kwargs)
        self.tokenizer = model.tokenizer
        options = {k: v for k, v in run_kwargs.items() if k in model.run_options and v is not None}
        self.schedule = model.schedule(T, **options)
        self._index: LoopCache = model._cache_cls({}, model, T, schedule=self.schedule)
        loop_names = model.hook_names(T, **options)
        self.loop_cfg = model.cfg
        self._weights = _Weights(self._index._unrolled_view())  # UnrolledView: the final norm, accumulated_bias
        depth = self._index.depth
        self.cfg = _tl_config(self, model, depth, T)
        self._to_loop: dict[str, str] = {}
        self._build(loop_names, depth)
        self.setup()
        self.train(model.training)  # the view's hook containers take the model's mode (TL's patching checks eval)

    # ------------------------------------------------------------------ structure
    def _layer_modules(self) -> list[Block]:
        """The weight module run at each depth, in running order."""
        return [getattr(self.model, tr.stack)[tr.layer] for tr in self.schedule]

    def _build(self, loop_names: list[str], depth: int) -> None:
        """Hook points for every name the run fires, under its name on the unrolled depth."""
        c = self.model.cfg
        self.hook_embed = HookPoint()
        if c.positional_embedding_type == "learned":
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(_ViewBlock(c, blk) for blk in self._layer_modules())
        self.ln_final = _ViewNorm(self._weights.module.ln_final.norm)
        for ours in loop_names:
            name = self._index.unrolled_name(ours)
            self._to_loop[name] = ours
            if _BLOCK_RE.fullmatch(name) or name in ("hook_embed", "hook_pos_embed") or name.startswith("ln_final."):
                continue
            self._place(name)
        self._unused = [n for n, m in self._own_modules() if isinstance(m, HookPoint) and n not in self._to_loop]

    def _place(self, name: str) -> None:
        """A hook point at a dotted path of plain containers (the loop's own sites: `iter.{t}.*`)."""
        *path, leaf = name.split(".")
        parent: nn.Module = self
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, HookPoint())

    def _own_modules(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.named_modules() if n and n != "model" and not n.startswith("model.")]

    def setup(self) -> None:
        """TransformerLens's setup over the view's own hook points (the model's keep their names).
        Hook points the run never fires (a norm the model does not apply) are left out."""
        self.mod_dict, self.hook_dict = {}, {}
        unused = set(getattr(self, "_unused", ()))
        for name, module in self._own_modules():
            if name in unused:
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    def loop_name(self, name: str) -> str:
        """The model's hook name for a hook name of the view (`blocks.5.hook_resid_post` ->
        `iter.2.blocks.0.hook_resid_post`)."""
        if name not in self._to_loop:
            raise HookNameError(self._unknown(name))
        return self._to_loop[name]

    def unrolled_name(self, loop_name: str) -> str:
        """The view's hook name for one of the model's (`iter.2.blocks.0.hook_resid_post` -> `blocks.5...`)."""
        return self._index.unrolled_name(loop_name)

    def loop_index(self, layer: int) -> tuple:
        """Unrolled layer -> (phase, iteration or None, layer within its phase): `("prelude", None, l)`,
        `("loop", t, l)`, `("coda", None, l)`; a family with more stacks per pass reports its own
        coordinates between the iteration and the layer (the schedule's index)."""
        return self._index.loop_index(layer)

    def depth_index(self, iteration: int, layer: int, **kwargs: Any) -> int:
        """(iteration, block layer) -> unrolled layer."""
        return self._index.depth_index(iteration, layer, **kwargs)

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.hook_dict), n=3)
        hint = f"; did you mean {close}?" if close else ""
        return (f"no hook point named {name!r} on this view (depth {self.cfg.n_layers}, n_loops={self.n_loops})"
                f"{hint}; view.hook_dict lists them all")

    # ------------------------------------------------------------------ TransformerLens's settings
    def _refuse_setting(self, name: str, value: bool) -> None:
        if value:
            raise ValueError(f"{name}(True): loop_lens models compute attention from one residual stream input "
                             "(no split q/k/v inputs, per-head results or MLP-input hooks); hook attn.hook_z instead")

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        self._refuse_setting("set_use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        self._refuse_setting("set_use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        self._refuse_setting("set_use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        self._refuse_setting("set_use_hook_mlp_in", use_hook_mlp_in)

    # ------------------------------------------------------------------ the forward pass
    def forward(
        self,
        input: Any,
        return_type: Optional[str] = "logits",
        loss_per_token: bool = False,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        attention_mask: Optional[Tensor] = None,
        stop_at_layer: Optional[int] = None,
        **kwargs: Any,
    ) -> Any:
        """TransformerLens's forward: `input` is text or tokens [batch, pos]; `return_type`
        "logits" / "loss" / "both" / None; `stop_at_layer=k` returns the residual stream entering
        unrolled layer k. Runs `model(input, n_loops=T, **run_kwargs)`; the view's hooks act on
        the model's hook points at the same depth."""
        for key in _UNSUPPORTED:
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}= is not available on a looped model's view: the loop runs from the embedding "
                                 "every time (hook a layer's input to change it)")
        unknown = sorted(set(kwargs) - set(_UNSUPPORTED))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown} (TransformerLens's forward keywords: return_type, "
                            "loss_per_token, prepend_bos, padding_side, attention_mask, stop_at_layer)")
        fwd = [(self._to_loop[name], _carry(hp)) for name, hp in self.hook_dict.items()
               if hp._forward_hooks or hp._backward_hooks]
        run = dict(self.run_kwargs, n_loops=self.n_loops, return_type=return_type, loss_per_token=loss_per_token,
                   prepend_bos=prepend_bos, padding_side=padding_side, attention_mask=attention_mask,
                   stop_at_layer=stop_at_layer)
        with self.model.hooks(fwd_hooks=fwd):
            return self.model(input, **run)

    def hooks(self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Any:
        """TransformerLens's `hooks` context; a name that is no hook point of the view raises HookNameError."""
        for name, _ in [*fwd_hooks, *bwd_hooks]:
            if isinstance(name, str) and name not in self.mod_dict:
                raise HookNameError(self._unknown(name))
        return super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts)

    def run_with_cache(self, *model_args: Any, return_cache_object: bool = True, **kwargs: Any) -> tuple[Any, Any]:
        """TransformerLens's `run_with_cache`: (output, ActivationCache over the unrolled depth).
        A listed name the run never reaches (it stops first at `stop_at_layer`) raises HookNameError."""
        names = kwargs.get("names_filter")
        listed = [names] if isinstance(names, str) else list(names) if isinstance(names, (list, tuple)) else []
        for name in listed:
            if name not in self.hook_dict:
                raise HookNameError(self._unknown(name))
        out, cache_dict = super().run_with_cache(*model_args, **kwargs)
        missing = [n for n in listed if n not in cache_dict]
        if missing:
            raise HookNameError(f"{missing} never fired: the run stopped at stop_at_layer={kwargs.get('stop_at_layer')} "
                                "before reaching them; cache them with a larger stop_at_layer (or none)")
        if not return_cache_object:
            return out, cache_dict
        return out, UnrolledCache(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))

    # ------------------------------------------------------------------ tokens (TransformerLens's helpers)
    def to_tokens(self, input: Union[str, Sequence[str]], prepend_bos: Optional[bool] = None,
                  padding_side: Optional[str] = None, move_to_device: bool = True,
                  truncate: bool = True) -> Int[Tensor, "batch pos"]:
        """TransformerLens's `to_tokens` (right padding; `prepend_bos` defaults to True)."""
        from loop_lens.model.tl_compat import check_padding_side

        check_padding_side(padding_side)
        return self.model.to_tokens(input, prepend_bos=True if prepend_bos is None else prepend_bos)

    def to_str_tokens(self, input: Any, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None) -> Any:
        """The string of every token of a text or of token ids."""
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        if isinstance(input, Tensor) and input.ndim == 2 and input.shape[0] > 1:
            return [self.model.to_str_tokens(row) for row in input]
        return self.model.to_str_tokens(input)

    to_string = to_string
    to_single_token = to_single_token
    get_token_position = get_token_position

    # ------------------------------------------------------------------ weights, stacked over the unrolled depth
    def _stack(self, part: str, name: str) -> Tensor:
        return torch.stack([getattr(getattr(b, part), name) for b in self.blocks])

    W_Q = property(lambda self: self._stack("attn", "W_Q"), doc="[n_layers, n_heads, d_model, d_head]")
    W_K = property(lambda self: self._stack("attn", "W_K"), doc="[n_layers, n_heads, d_model, d_head] (kv heads repeated)")
    W_V = property(lambda self: self._stack("attn", "W_V"), doc="[n_layers, n_heads, d_model, d_head] (kv heads repeated)")
    W_O = property(lambda self: self._stack("attn", "W_O"), doc="[n_layers, n_heads, d_head, d_model]")
    b_Q = property(lambda self: self._stack("attn", "b_Q"), doc="[n_layers, n_heads, d_head]")
    b_K = property(lambda self: self._stack("attn", "b_K"), doc="[n_layers, n_heads, d_head]")
    b_V = property(lambda self: self._stack("attn", "b_V"), doc="[n_layers, n_heads, d_head]")
    b_O = property(lambda self: self._stack("attn", "b_O"), doc="[n_layers, d_model]")
    W_in = property(lambda self: self._stack("mlp", "W_in"), doc="[n_layers, d_model, d_mlp]")
    b_in = property(lambda self: self._stack("mlp", "b_in"), doc="[n_layers, d_mlp]")
    W_out = property(lambda self: self._stack("mlp", "W_out"), doc="[n_layers, d_mlp, d_model]")
    b_out = property(lambda self: self._stack("mlp", "b_out"), doc="[n_layers, d_model]")

    @property
    def W_gate(self) -> Optional[Tensor]:
        """[n_layers, d_model, d_mlp] for a gated MLP, else None."""
        return None if not self.cfg.gated_mlp else self._stack("mlp", "W_gate")

    @property
    def OV(self) -> FactoredMatrix:
        """W_V @ W_O: [n_layers, n_heads, d_model, d_model] as a FactoredMatrix."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q @ W_K^T (before RoPE and any qk-norm): [n_layers, n_heads, d_model, d_model]."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The embedding (before the model's embedding scale, which `hook_embed` includes)."""
        return self.model.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        if self.cfg.positional_embedding_type != "learned":
            raise AttributeError("W_pos: this model has rotary positions, no learned position embedding")
        return self.model.pos_embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return _bias(self.model.unembed)

    @property
    def unembed(self) -> nn.Module:
        return self.model.unembed

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def has_final_norm(self) -> bool:
        return self._weights.module.has_final_norm

    accumulated_bias = UnrolledView.accumulated_bias
    tokens_to_residual_directions = UnrolledView.tokens_to_residual_directions

    def extra_repr(self) -> str:
        return f"n_loops={self.n_loops}, n_layers={self.cfg.n_layers}, run_kwargs={self.run_kwargs}"


def _carry(view_hook: HookPoint):
    """A hook for the model's hook point that passes the activation through the view's."""

    def carry(activation: Tensor, hook: HookPoint) -> Tensor:
        return view_hook(activation)

    carry.__qualname__ = f"view hook {view_hook.name}"
    return carry
