"""LoopCache: a TransformerLens ActivationCache that knows about iterations.

A `LoopCache` stores activations under loop_lens hook names (`prelude.{l}.*`,
`iter.{t}.blocks.{l}.*`, `coda.{l}.*`). TransformerLens's own calls work on it over the
*unrolled depth*: depth `k` runs the prelude's layers first, then each iteration's block, then the
coda, so `cache["pattern", k]`, `cache["blocks.{k}.hook_resid_post"]`, `cache.accumulated_resid()`
and every other `ActivationCache` helper give exactly what they give on `cache.unrolled()`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice, SliceInput, get_act_name

from loop_lens.config import LoopConfig
from loop_lens.model import sites
from loop_lens.model.hooks import NO_HOOKS
from loop_lens.model.names import _suffix
from loop_lens.model.schedule import Schedule


def _on_unrolled(name: str) -> Callable[..., Any]:
    """A LoopCache method that runs TransformerLens's `name` on the unrolled cache."""
    tl_method = getattr(ActivationCache, name, None)
    if tl_method is None:  # [tl-compat] a helper this TransformerLens release does not have (3.9: logit_lens)
        def missing(self: LoopCache, *args: Any, **kwargs: Any) -> Any:
            from importlib.metadata import version

            raise AttributeError(f"ActivationCache.{name} is not in transformer-lens {version('transformer-lens')}; "
                                 "upgrade to transformer-lens 4.x, or use loop_lens.analysis.Lens for lenses")

        missing.__name__ = name
        return missing

    @functools.wraps(tl_method)
    def method(self: LoopCache, *args: Any, **kwargs: Any) -> Any:
        return self._run_unrolled(name, *args, **kwargs)

    method.__doc__ = (
        f"TransformerLens's `ActivationCache.{name}` (same arguments) with layer = unrolled depth: "
        f"exactly `cache.unrolled().{name}(...)`."
    )
    return method


class LoopCache(ActivationCache):
    """Activations of one run, keyed by loop_lens hook names (`iter.{t}.blocks.{l}.*`).

    Two indexings live side by side:

    - loop-native: `cache["iter.3.blocks.1.hook_resid_post"]`, `cache.stack("resid_post")`
      ([n_loops, n_block, ...]), `depth_index(t, l)`, `loop_index(depth)`. `keys()`, `values()`,
      `items()`, iteration and `len` are over these names; `unrolled_name(key)` gives each one's
      name on the unrolled depth.
    - TransformerLens's: a `(name, layer)` key or a `blocks.{k}.*` name takes `layer` / `k` as the
      unrolled depth (prelude, then each iteration's block, then the coda; negative counts from
      the end), so `cache["pattern", k]` is the pattern of the layer run at depth `k` and
      `cache["pattern", depth_index(t, l)] is cache["iter.{t}.blocks.{l}.attn.hook_pattern"]`.
      Every public `ActivationCache` method gives exactly what it gives on `unrolled()`; methods
      returning a cache (`apply_slice_to_batch_dim`, `remove_batch_dim`, `to`) return a LoopCache.

    Where a method cannot make sense it raises and names the call to make instead: the
    decompositions (`decompose_resid`, `get_full_resid_decomposition`) on models whose layer
    outputs do not sum to the residual stream (see `UnrolledCache`), and the SSM methods.
    """

    def __init__(
        self,
        cache_dict: dict[str, Tensor],
        model: Any,
        n_loops: int,
        has_batch_dim: bool = True,
        schedule: Optional[Schedule] = None,
    ):
        """`model` is the looped model that ran; `schedule` the run's layout (default: the
        model's schedule of `n_loops` passes with its own run options)."""
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.n_loops = n_loops
        self.schedule = model.schedule(n_loops) if schedule is None else schedule

    def __getitem__(self, key: Union[str, tuple]) -> Tensor:
        """A loop-native name, or a TransformerLens key (`"blocks.{k}.*"`, `(name, layer)`,
        shorthand such as `"pattern3"`) whose layer is the unrolled depth."""
        if isinstance(key, str):
            if key in self.cache_dict:
                return self.cache_dict[key]
            if key.startswith(("iter.", "prelude.", "coda.")):
                if key not in self._hook_names():
                    raise KeyError(f"{key!r} is not in this cache: no such hook point in this run of the model "
                                   f"({self._run_label()}; model.hook_names(T) lists them)")
                raise KeyError(f"{key!r} is not in this cache; was it excluded by names_filter?")
            name = get_act_name(key)
        else:
            name_part, *rest = key
            if rest and rest[0] is not None and rest[0] < 0:
                rest[0] += self.depth
            name = get_act_name(name_part, *rest)
        loop = self.loop_name(name)
        if loop not in self.cache_dict:
            raise KeyError(
                f"{key!r} ({name!r} on the unrolled depth, {loop!r} here) is not in this cache; "
                "was it excluded by names_filter?"
            )
        return self.cache_dict[loop]

    @property
    def cfg(self) -> LoopConfig:
        """The model's LoopConfig."""
        return self.model.cfg

    @property
    def depth(self) -> int:
        """The run's unrolled depth."""
        return self.schedule.depth

    @property
    def options(self) -> dict[str, Any]:
        """The family's run options the cached run used (as `forward` took them)."""
        return self.schedule.options

    def _hook_names(self) -> list[str]:
        """Every hook name the cached run fired."""
        return self.model.hook_names(self.n_loops, **self.options)

    def _run_label(self) -> str:
        """How the cached run's length reads in messages."""
        return ", ".join(f"{k}={v}" for k, v in {"n_loops": self.n_loops, **self.options}.items())

    def _like(self, cache_dict: dict[str, Tensor], has_batch_dim: bool) -> LoopCache:
        """A cache of the same run (same class and schedule) holding `cache_dict`."""
        like = type(self).__new__(type(self))
        like.__dict__.update(self.__dict__)
        ActivationCache.__init__(like, cache_dict, self.model, has_batch_dim=has_batch_dim)
        return like

    def depth_index(self, iteration: int, layer: int) -> int:
        """Unrolled depth of block layer `layer` at iteration `iteration`."""
        if not (0 <= iteration < self.n_loops and 0 <= layer < self.cfg.n_block):
            raise IndexError(f"(iteration={iteration}, layer={layer}) outside {self.n_loops} x {self.cfg.n_block}")
        return self.schedule.depth_of(f"iter.{iteration}.blocks.{layer}")

    def loop_index(self, depth: int) -> tuple:
        """Unrolled depth -> (phase, iteration or None, layer within its phase); a family with
        more stacks reports its own coordinates between the iteration and the layer."""
        return self.schedule.at(depth).index

    def stack(self, kind: str) -> Tensor:
        """One hook kind over all iterations and block layers: [n_loops, n_block, ...].

        Per-iteration hooks (`hook_state_post`, `hook_exit_logit`, ...) give [n_loops, ...].
        """
        suffix = _suffix(kind)
        per_iter = sites.scope_of(suffix) == "pass"
        out = []
        for t in range(self.n_loops):
            if per_iter:
                out.append(self[f"iter.{t}.{suffix}"])
            else:
                out.append(torch.stack([self[f"iter.{t}.blocks.{l}.{suffix}"] for l in range(self.cfg.n_block)]))
        return torch.stack(out)

    # ------------------------------------------------------------------ the two namings
    def unrolled_name(self, name: str) -> str:
        """A loop-native hook name -> its name on the unrolled depth
        (`iter.1.blocks.0.hook_resid_pre` -> `blocks.{depth_index(1, 0)}.hook_resid_pre`)."""
        return self.schedule.unrolled_name(name)

    def loop_name(self, name: str) -> str:
        """A name on the unrolled depth (`blocks.{k}.*`) -> the loop-native hook name."""
        return self.schedule.loop_name(name)

    def unrolled(self) -> UnrolledCache:
        """The same tensors as an ActivationCache over the unrolled depth (`blocks.{k}.*`, the
        model seen as `depth` layers), on which TransformerLens's helpers run unchanged."""
        renamed = {self.unrolled_name(name): value for name, value in self.cache_dict.items()}
        pos, embed = renamed.get("hook_pos_embed"), renamed.get("hook_embed")
        if pos is not None and embed is not None and pos.ndim < embed.ndim:
            renamed["hook_pos_embed"] = pos.expand_as(embed)  # TransformerLens caches it per batch row
        return UnrolledCache(renamed, self._unrolled_view(), has_batch_dim=self.has_batch_dim)

    def _unrolled_view(self) -> UnrolledView:
        return UnrolledView(self.model, self.schedule)

    def _run_unrolled(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run TransformerLens's `name` on `unrolled()`; keep what it caches (head results)."""
        un = self.unrolled()
        before = set(un.cache_dict)
        out = getattr(un, name)(*args, **kwargs)
        for key in [k for k in un.cache_dict if k not in before]:
            self.cache_dict[self.loop_name(key)] = un.cache_dict[key]
        return out

    # ------------------------------------------------------------------ TransformerLens's methods
    accumulated_resid = _on_unrolled("accumulated_resid")
    apply_ln_to_stack = _on_unrolled("apply_ln_to_stack")
    compute_head_results = _on_unrolled("compute_head_results")
    compute_ssm_effective_attention = _on_unrolled("compute_ssm_effective_attention")
    compute_ssm_state = _on_unrolled("compute_ssm_state")
    decompose_resid = _on_unrolled("decompose_resid")
    get_full_resid_decomposition = _on_unrolled("get_full_resid_decomposition")
    get_neuron_results = _on_unrolled("get_neuron_results")
    logit_attrs = _on_unrolled("logit_attrs")
    logit_lens = _on_unrolled("logit_lens")
    ssm_layers = _on_unrolled("ssm_layers")
    stack_activation = _on_unrolled("stack_activation")
    stack_head_results = _on_unrolled("stack_head_results")
    stack_neuron_results = _on_unrolled("stack_neuron_results")

    def apply_slice_to_batch_dim(self, batch_slice: Union[Slice, SliceInput]) -> LoopCache:
        """TransformerLens's batch slice, as a LoopCache with the same iterations."""
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return self._like(sliced.cache_dict, sliced.has_batch_dim)


class UnrolledCache(ActivationCache):
    """A LoopCache renamed onto the unrolled depth. TransformerLens's helpers run unchanged, except
    those that would give numbers with no meaning for this model: they raise and name the call to
    make instead."""

    model: UnrolledView

    def _additivity_breaks(self, per_head: bool) -> list[str]:
        """Why the final residual is not embed + every layer's output (per head / neuron if asked):
        the model says (`_additivity_breaks`)."""
        return self.model.model._additivity_breaks(per_head)

    def _require_additive(self, method: str, per_head: bool = False) -> None:
        breaks = self._additivity_breaks(per_head)
        if breaks:
            raise ValueError(
                f"{method} splits the residual stream into parts that sum to it, but in this model "
                f"they do not: {'; '.join(breaks)}. The residual stream at every depth is "
                "cache.accumulated_resid() (exact for any model); what each layer wrote is "
                "cache.stack_activation('attn_out') / cache.stack_activation('mlp_out'), per head "
                "cache.stack_head_results(), per neuron cache.stack_neuron_results(layer)."
            )

    def decompose_resid(self, *args: Any, **kwargs: Any) -> Any:
        """TransformerLens's `decompose_resid`; raises where the parts would not sum to the
        residual stream (injection, residual norms, per-iteration or post-loop norms)."""
        self._require_additive("decompose_resid")
        return super().decompose_resid(*args, **kwargs)

    def get_full_resid_decomposition(self, *args: Any, **kwargs: Any) -> Any:
        """TransformerLens's `get_full_resid_decomposition`; raises where head and neuron results
        would not sum to the residual stream (as `decompose_resid`, and sublayer-output norms)."""
        self._require_additive("get_full_resid_decomposition", per_head=True)
        return super().get_full_resid_decomposition(*args, **kwargs)

    def compute_ssm_state(self, *args: Any, **kwargs: Any) -> Any:
        """Not for a looped transformer (no SSM mixer); raises naming the state to read instead."""
        raise TypeError(_NO_SSM.format(method="compute_ssm_state"))

    def compute_ssm_effective_attention(self, *args: Any, **kwargs: Any) -> Any:
        """Not for a looped transformer (no SSM mixer); raises naming what to read instead."""
        raise TypeError(_NO_SSM.format(method="compute_ssm_effective_attention"))


_NO_SSM = (
    "{method} reads SSM mixer layers, and a looped transformer has none (cache.ssm_layers() == []). "
    "The state it carries from one iteration to the next is cache.stack('hook_state_post') "
    "[n_loops, batch, pos, d_model]; its attention is cache.stack('pattern')."
)


def _bias(linear: nn.Linear) -> Float[Tensor, " d_out"]:
    """A linear layer's bias, zeros when it has none."""
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)


def _tl_block(block: Any) -> SimpleNamespace:
    """One layer's weights under TransformerLens's names (`attn.W_O`, `mlp.W_out`, ...)."""
    return SimpleNamespace(
        ln1=block.ln1,
        ln2=block.ln2,
        ln1_post=block.ln1_post,
        ln2_post=block.ln2_post,
        attn=SimpleNamespace(W_O=block.attn.W_O, b_O=_bias(block.attn.o_proj)),
        mlp=SimpleNamespace(W_out=block.mlp.down_proj.weight.T, b_out=_bias(block.mlp.down_proj)),
    )


class _FinalNorm(nn.Module):
    """The norm between the last layer's output and the unembedding (identity if there is none)."""

    def __init__(self, norm: Optional[nn.Module]):
        super().__init__()
        self.norm = norm

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return x if self.norm is None else self.norm(x, NO_HOOKS)


def additivity_breaks(c: LoopConfig, per_head: bool) -> list[str]:
    """Why, in a model with config `c`, the final residual is not embed + every layer's output
    (per head / neuron if asked); empty when it is."""
    breaks = []
    if c.norm_placement == "sandwich_resid":
        breaks.append("norm_placement='sandwich_resid' normalises the residual stream after every sublayer")
    elif per_head and c.norm_placement != "pre":
        breaks.append(
            f"norm_placement={c.norm_placement!r} normalises each sublayer's output, so head and "
            "neuron results do not sum to attn_out / mlp_out"
        )
    if c.injection != "none":
        breaks.append(f"injection={c.injection!r} recombines the state with the embedding at every iteration")
    if c.initial_state != "embed":
        breaks.append(
            f"initial_state={c.initial_state!r} starts the loop from a state that is not the prelude's output"
        )
    if c.iter_norm:
        breaks.append("iter_norm normalises the state after every iteration")
    if c.norm_after_loop:
        breaks.append("norm_after_loop normalises the state before the coda")
    return breaks


class UnrolledView:
    """The model as TransformerLens's cache helpers see it: `n_layers` = unrolled depth, with
    `blocks[k]` the (shared) weights of the layer run at depth k, from the run's schedule, and
    the schedule's final norm."""

    def __init__(self, model: Any, schedule: Schedule):
        c = model.cfg
        self.model = model
        self.loop_cfg = c
        self.cfg = SimpleNamespace(
            n_layers=schedule.depth,
            d_model=c.d_model,
            n_heads=c.n_heads,
            d_head=c.d_head,
            d_vocab=c.d_vocab,
            d_mlp=c.d_mlp,
            normalization_type=c.normalization_type,
            attn_only=False,
            final_rms=c.normalization_type == "RMS",
            model_name=c.model_name,
        )
        shared: dict[tuple[str, int], SimpleNamespace] = {}  # one view per layer's weights, shared across passes
        for tr in schedule:
            if (tr.stack, tr.layer) not in shared:
                shared[tr.stack, tr.layer] = _tl_block(getattr(model, tr.stack)[tr.layer])
        self.blocks = [shared[tr.stack, tr.layer] for tr in schedule]
        final = getattr(model, schedule.final_norm) if schedule.final_norm else None
        self.has_final_norm = final is not None
        self.ln_final = _FinalNorm(final)
        self.unembed = model.unembed

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding."""
        return self.model.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """The unembedding bias (zeros: loop_lens unembeddings have none)."""
        return _bias(self.model.unembed)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """Sum of the attention (and MLP) output biases written before unrolled depth `layer`."""
        total = torch.zeros(self.cfg.d_model, device=self.model.device, dtype=self.model.dtype)
        for block in self.blocks[:layer]:
            total = total + block.attn.b_O + (block.mlp.b_out if include_mlp_biases else 0)
        if mlp_input:
            total = total + self.blocks[layer].attn.b_O
        return total

    def tokens_to_residual_directions(self, tokens: Any) -> Tensor:
        """Unembedding directions with the final norm's weight folded in (TL folds it into W_U),
        so `logit_attrs` of a normalised decomposition sums to the logit."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.model.device)
        folded = self.model.W_U
        weight = self.ln_final.norm.weight if self.ln_final.norm is not None else None
        if weight is not None:
            folded = folded * weight[:, None]
        return folded[:, tokens].movedim(0, -1)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is one token."""
        ids = self.model.to_tokens(string, prepend_bos=False)[0]
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one")
        return int(ids[0])
