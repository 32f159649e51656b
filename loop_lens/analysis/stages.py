"""Stages of inference: the logit / coda lens at every (iteration, layer), and depth profiles
(ColSum concentration and residual norm) with the paper's three groupings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from loop_lens.analysis import _checks
from loop_lens.analysis._types import LoopedModel, Mask
from loop_lens.analysis.attention import colsum_concentration
from loop_lens.analysis.lens import Lens, block_lens, state_at, take_positions, vocab_labels
from loop_lens.analysis.result import Result, long_frame
from loop_lens.cache import LoopCache
from loop_lens.model.names import hook_name

LENS_VALUES = ("target_prob", "target_rank", "entropy", "kl_to_final")
"""The [T, L, B, S] summaries `LensResult.plot` can draw."""


@dataclass(kw_only=True)
class LensResult(Result):
    """Lens summaries per (iteration, layer, batch, position); only summaries are kept, so the
    memory does not grow with the vocabulary."""

    top_ids: Int[Tensor, "T L B S k"]
    top_probs: Float[Tensor, "T L B S k"]
    target_prob: Float[Tensor, "T L B S"]
    target_rank: Int[Tensor, "T L B S"]  # 0 = top-1
    entropy: Float[Tensor, "T L B S"]  # nats
    kl_to_final: Float[Tensor, "T L B S"]  # KL(final || lens)
    final_top: Int[Tensor, "B S"]  # the model's own top-1
    targets: Int[Tensor, "B S"]  # the tracked tokens (default: the model's final top-1)
    lens: str
    str_tokens: Optional[Sequence[str]] = None  # for labels; index = token id
    positions: Optional[list[int]] = None  # the input positions the S axis holds (None: every position)
    length: int = 0  # the input's length, when `positions` is set (a negative position counts back from it)

    def entry_point(self, k: int = 1) -> Int[Tensor, "B S 2"]:
        """The (iteration, layer) where the target enters the top-k and stays there, in unrolled
        order; (-1, -1) where it never settles."""
        k = _checks.positive_int(k, "k")
        T, L = self.target_rank.shape[:2]
        inside = (self.target_rank < k).reshape(T * L, *self.target_rank.shape[2:])  # [TL, B, S]
        depth = torch.arange(T * L, device=inside.device)[:, None, None]
        last_out = torch.where(~inside, depth, torch.full_like(depth, -1)).amax(0)  # [B, S]
        first_in = last_out + 1
        first_in = torch.where(first_in >= T * L, torch.full_like(first_in, -1), first_in)
        t = torch.where(first_in >= 0, first_in // L, first_in)
        layer = torch.where(first_in >= 0, first_in % L, first_in)
        return torch.stack([t, layer], dim=-1)

    def token(self, token_id: int) -> str:
        """The text of a token id (the id itself without a tokenizer)."""
        return self.str_tokens[token_id] if self.str_tokens is not None else str(token_id)

    def _at(self, position: int, batch: int) -> tuple[int, int]:
        """(index on the S axis, batch index) of a position of the input."""
        B, S = self.target_prob.shape[2:]
        batch = _checks.index(batch, "batch", B, "batch items")
        if self.positions is None:
            return _checks.index(position, "position", S, "positions"), batch
        if isinstance(position, bool) or not isinstance(position, int):
            raise ValueError(f"position must be an int, got {position!r}")
        held = list(self.positions)
        if position < 0:
            position += self.length
        if position not in held:
            raise ValueError(f"position {position} was not read by this lens (positions={held}); "
                             "run logit_lens with it in positions=, or with positions=None")
        return held.index(position), batch

    def grid(self, position: int = -1, batch: int = 0) -> pd.DataFrame:
        """Iteration x layer table of "top token (probability)" at one position."""
        position, batch = self._at(position, batch)
        T, L = self.top_ids.shape[:2]
        data = {
            f"layer {layer}": [
                f"{self.token(int(self.top_ids[t, layer, batch, position, 0]))} ({self.top_probs[t, layer, batch, position, 0]:.2f})"
                for t in range(T)
            ]
            for layer in range(L)
        }
        return pd.DataFrame(data, index=[f"iter {t}" for t in range(T)])

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, layer, batch, position); positions are the input's."""
        frame = long_frame(self.target_prob, ["iteration", "layer", "batch", "position"], "target_prob")
        if self.positions is not None:
            frame["position"] = [self.positions[i] for i in frame["position"]]
        frame["target_rank"] = self.target_rank.reshape(-1).cpu().numpy()
        frame["entropy"] = self.entropy.reshape(-1).float().cpu().numpy()
        frame["kl_to_final"] = self.kl_to_final.reshape(-1).float().cpu().numpy()
        frame["top1"] = self.top_ids[..., 0].reshape(-1).cpu().numpy()
        frame["top1_prob"] = self.top_probs[..., 0].reshape(-1).float().cpu().numpy()
        return frame

    def plot(self, position: int = -1, batch: int = 0, value: str = "target_prob"):
        """Heatmap over (iteration, layer) at one position, annotated with the top token."""
        import plotly.graph_objects as go

        if value not in LENS_VALUES:
            raise ValueError(f"value must be one of {list(LENS_VALUES)}, got {value!r}")
        position, batch = self._at(position, batch)
        z = getattr(self, value)[:, :, batch, position].float().cpu().numpy()
        # plotly reads text as its own HTML subset: escape token strings so they show as typed
        text = [[(self.token(int(self.top_ids[t, layer, batch, position, 0]))) for layer in range(z.shape[1])]
                for t in range(z.shape[0])]
        fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", colorscale="Blues",
                                   x=[f"L{layer}" for layer in range(z.shape[1])], y=[f"t{t}" for t in range(z.shape[0])]))
        fig.update_layout(title=f"{self.lens} lens: {value} (text: top-1 token)", xaxis_title="block layer", yaxis_title="iteration")
        return fig


def logit_lens(
    model: LoopedModel,
    cache: LoopCache,
    targets: Optional[Int[Tensor, "B S"]] = None,
    k: int = 5,
    lens: Union[str, Lens] = "logit",
    mask: Optional[Mask] = None,
    positions: Optional[Sequence[int]] = None,
) -> LensResult:
    """A lens at every (iteration, block layer) output X_{l,t}, summarised per position: the logit
    lens `unembed(final_norm(X_{l,t}))` (`lens="logit"`), the coda lens (`lens="coda"`: the rest of
    the network from X_{l,t}), or any `Lens` instance.

    `targets` [B, S] are the tokens whose probability and rank are tracked (default: the model's
    final top-1 prediction at each position, from the cache's last iteration). `positions` reads
    only these positions (negative counts from the end): a pointwise lens then unembeds only them,
    which for a 49k vocabulary is most of the time and memory; the result's S axis holds them, and
    its methods take the input's positions. A family whose layer output is not the whole state
    (a carry of several tensors) rebuilds the state at each site from the cache (`model.lens_state(cache, hook)`).
    """
    cache = _checks.loop_cache(cache)
    _checks.same_model(model, cache)
    reader = block_lens(model, lens)
    V = model.cfg.d_vocab
    k = _checks.integer(k, "k", 1, V)
    x = cache.stack("hook_resid_post")  # [T, L, B, S, D]
    T, L, B, S, _ = x.shape
    _checks.not_empty(B, S)
    mask = _checks.mask_for(mask, B, S, x.device)
    if targets is not None:
        targets = _checks.token_ids(targets, "targets", B, S, V, x.device)
    keep = None if positions is None else _positions(positions, S)
    at = slice(None) if keep is None else torch.tensor(keep, device=x.device)
    own_state = getattr(model, "lens_state", None)  # a family whose states are more than a layer's output
    with torch.no_grad():
        final_logits = model.finish(state_at(model, cache, hook_name("state_post", iteration=T - 1)), mask)[:, at]
        final_logp = F.log_softmax(final_logits.float(), -1)  # [B, S', V]
        final_top = final_logp.argmax(-1)
        tgt = final_top if targets is None else targets[:, at]
        final_p = final_logp.exp()
        out = {n: [] for n in ("ids", "probs", "tp", "rank", "ent", "kl")}
        # one (iteration, layer) at a time: a [B, S, V] distribution in fp32 is the largest tensor
        # (stacking the layers would hold L of them: 19 GB for a 24-layer, 49k-vocabulary model)
        for t in range(T):
            for layer in range(L):
                name = hook_name("resid_post", layer=layer, iteration=t)
                state = x[t, layer] if own_state is None else own_state(cache, name)
                if reader.pointwise:
                    logits = reader(take_positions(state, at), name)
                else:  # the lens attends over positions: read them all, keep the asked ones
                    logits = reader(state, name, mask)[:, at]
                logp = F.log_softmax(logits.float(), -1)  # [B, S, V]
                del logits
                top = logp.topk(k, dim=-1)
                target_logp = logp.gather(-1, tgt[..., None])[..., 0]
                out["ids"].append(top.indices)
                out["probs"].append(top.values.exp())
                out["tp"].append(target_logp.exp())
                out["rank"].append((logp > target_logp[..., None]).sum(-1))
                out["ent"].append(-(logp.exp() * logp).sum(-1))
                out["kl"].append((final_p * (final_logp - logp)).sum(-1))
    st = {n: torch.stack(v).unflatten(0, (T, L)) for n, v in out.items()}
    return LensResult(
        top_ids=st["ids"], top_probs=st["probs"], target_prob=st["tp"], target_rank=st["rank"], entropy=st["ent"],
        kl_to_final=st["kl"], final_top=final_top, targets=tgt, lens=reader.name, str_tokens=vocab_labels(model),
        positions=keep, length=S if keep is not None else 0,
    )


def _positions(positions: Sequence[int], S: int) -> list[int]:
    """Positions (negative from the end) as distinct indices into S, in the order given."""
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence) or not positions:
        raise ValueError(f"positions must be a non-empty list of ints, got {positions!r}")
    keep = [_checks.index(p, "position", S, "positions") for p in positions]
    if len(set(keep)) != len(keep):
        raise ValueError(f"positions {list(positions)} name a position twice")
    return keep


@dataclass(kw_only=True)
class DepthProfile(Result):
    """ColSum concentration (mean over heads and batch) and residual norm per unrolled depth of the
    recurrent block, with the paper's three groupings; optionally a feedforward baseline."""

    concentration: Float[Tensor, "T L"]
    resid_norm: Float[Tensor, "T L"]
    bos_norm: Float[Tensor, "T L"]
    baseline_concentration: Optional[Float[Tensor, " depth"]] = None
    baseline_resid_norm: Optional[Float[Tensor, " depth"]] = None

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, layer) of the looped model, then one per baseline layer."""
        T, L = self.concentration.shape
        frame = long_frame(self.concentration, ["iteration", "layer"], "concentration")
        frame["resid_norm"] = self.resid_norm.reshape(-1).float().cpu().numpy()
        frame["bos_norm"] = self.bos_norm.reshape(-1).float().cpu().numpy()
        frame["depth"] = frame["iteration"] * L + frame["layer"]
        frame["relative_depth"] = (frame["layer"] + 1) / L
        frame["model"] = "looped"
        if self.baseline_concentration is not None:
            n = len(self.baseline_concentration)
            base = pd.DataFrame({
                "depth": range(n), "concentration": self.baseline_concentration.float().cpu().numpy(),
                "resid_norm": self.baseline_resid_norm.float().cpu().numpy(), "relative_depth": [(i + 1) / n for i in range(n)],
                "model": "feedforward",
            })
            frame = pd.concat([frame, base], ignore_index=True)
        return frame

    def plot(self, value: str = "concentration"):
        """Three panels: raw depth; by recurrence (relative depth within each pass, a line per
        iteration, the feedforward baseline over its own relative depth); by layer."""
        from plotly.subplots import make_subplots

        if value not in ("concentration", "resid_norm"):
            raise ValueError(f"value must be 'concentration' or 'resid_norm', got {value!r}")
        frame = self.to_frame()
        looped = frame[frame.model == "looped"]
        fig = make_subplots(rows=1, cols=3, subplot_titles=("by depth", "by recurrence", "by layer"))
        fig.add_scatter(x=looped.depth, y=looped[value], mode="lines+markers", name="looped", row=1, col=1)
        for t, g in looped.groupby("iteration"):
            fig.add_scatter(x=g.relative_depth, y=g[value], mode="lines+markers", name=f"iter {t}", row=1, col=2)
        for layer, g in looped.groupby("layer"):
            fig.add_scatter(x=g.iteration, y=g[value], mode="lines+markers", name=f"layer {layer}", row=1, col=3)
        base = frame[frame.model == "feedforward"]
        if len(base):
            fig.add_scatter(x=base.depth, y=base[value], mode="lines", line=dict(dash="dash"), name="feedforward", row=1, col=1)
            fig.add_scatter(x=base.relative_depth, y=base[value], mode="lines", line=dict(dash="dash", color="black"), name="feedforward (relative)", row=1, col=2)
        fig.update_layout(title=f"{value} against depth")
        return fig


def _profile(cache: LoopCache, mask: Optional[Mask], name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Concentration, mean residual norm and first-token norm per (iteration, block layer)."""
    a = cache.stack("attn.hook_pattern")  # [T, L, B, H, S, S]
    B, S = a.shape[2], a.shape[-1]
    _checks.not_empty(B, S, name)
    mask = _checks.mask_for(mask, B, S, a.device, holder=name)
    conc = colsum_concentration(a, mask).mean((-2, -1))
    norms = cache.stack("hook_resid_post").float().norm(dim=-1)  # [T, L, B, S]
    if mask is not None:
        m = mask.float()[None, None]
        resid = (norms * m).sum((-2, -1)) / m.sum((-2, -1))
    else:
        resid = norms.mean((-2, -1))
    return conc, resid, norms[..., 0].mean(-1)


def depth_profile(cache: LoopCache, baseline_cache: Optional[LoopCache] = None, mask: Optional[Mask] = None) -> DepthProfile:
    """Concentration and residual norms per (iteration, block layer); a baseline cache (a
    feedforward model on the same input, e.g. `zoo:khop-ff`) is profiled over its own layers, with
    the same mask."""
    cache = _checks.loop_cache(cache)
    conc, resid, bos = _profile(cache, mask, "cache")
    profile = DepthProfile(concentration=conc, resid_norm=resid, bos_norm=bos)
    if baseline_cache is not None:
        base = _checks.loop_cache(baseline_cache, "baseline_cache")
        b_conc, b_resid, _ = _profile(base, mask, "baseline_cache")
        profile.baseline_concentration = b_conc.reshape(-1)  # [T_b * L_b] = its depth
        profile.baseline_resid_norm = b_resid.reshape(-1)
    return profile
