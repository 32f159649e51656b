"""Stages of inference: the logit / coda lens at every (iteration, layer), and depth profiles
(ColSum concentration and residual norm) with the paper's three groupings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from loop_lens.analysis.attention import colsum_concentration
from loop_lens.analysis.result import Result, long_frame
from loop_lens.cache import LoopCache
from loop_lens.model.hooks import NO_HOOKS


@dataclass
class LensResult(Result):
    """Lens summaries per (iteration, layer, batch, position); only summaries are kept, so the
    memory does not grow with the vocabulary."""

    top_ids: Tensor  # [T, L, B, S, k]
    top_probs: Tensor  # [T, L, B, S, k]
    target_prob: Tensor  # [T, L, B, S]
    target_rank: Tensor  # [T, L, B, S], 0 = top-1
    entropy: Tensor  # [T, L, B, S] nats
    kl_to_final: Tensor  # [T, L, B, S] KL(final || lens)
    final_top: Tensor  # [B, S] the model's own top-1
    targets: Tensor  # [B, S] the target tokens (default: the model's final top-1)
    lens: str
    str_tokens: Optional[Sequence[str]] = None  # for labels; index = token id

    def entry_point(self, k: int = 1) -> Tensor:
        """[B, S, 2]: the (iteration, layer) where the target enters the top-k and stays there, in
        unrolled order; (-1, -1) where it never settles."""
        T, L = self.target_rank.shape[:2]
        inside = (self.target_rank < k).reshape(T * L, *self.target_rank.shape[2:])  # [TL, B, S]
        outside_idx = torch.where(~inside, torch.arange(T * L)[:, None, None], torch.full_like(inside, -1, dtype=torch.long))
        last_out = outside_idx.amax(0)  # [B, S]
        first_in = last_out + 1
        first_in = torch.where(first_in >= T * L, torch.full_like(first_in, -1), first_in)
        t = torch.where(first_in >= 0, first_in // L, first_in)
        layer = torch.where(first_in >= 0, first_in % L, first_in)
        return torch.stack([t, layer], dim=-1)

    def token(self, i: int) -> str:
        return self.str_tokens[i] if self.str_tokens is not None else str(i)

    def grid(self, position: int = -1, batch: int = 0) -> pd.DataFrame:
        """Iteration x layer table of "top token (probability)" at one position."""
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
        frame = long_frame(self.target_prob, ["iteration", "layer", "batch", "position"], "target_prob")
        frame["target_rank"] = self.target_rank.reshape(-1).cpu().numpy()
        frame["entropy"] = self.entropy.reshape(-1).cpu().numpy()
        frame["kl_to_final"] = self.kl_to_final.reshape(-1).cpu().numpy()
        frame["top1"] = self.top_ids[..., 0].reshape(-1).cpu().numpy()
        frame["top1_prob"] = self.top_probs[..., 0].reshape(-1).cpu().numpy()
        return frame

    def plot(self, position: int = -1, batch: int = 0, value: str = "target_prob"):
        """Heatmap over (iteration, layer) at one position, annotated with the top token."""
        import plotly.graph_objects as go

        z = getattr(self, value)[:, :, batch, position].float().cpu().numpy()
        text = [[self.token(int(self.top_ids[t, layer, batch, position, 0])) for layer in range(z.shape[1])] for t in range(z.shape[0])]
        fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", colorscale="Blues",
                                   x=[f"L{layer}" for layer in range(z.shape[1])], y=[f"t{t}" for t in range(z.shape[0])]))
        fig.update_layout(title=f"{self.lens} lens: {value} (text: top-1 token)", xaxis_title="block layer", yaxis_title="iteration")
        return fig


def logit_lens(
    model,
    cache: LoopCache,
    targets: Optional[Tensor] = None,
    k: int = 5,
    lens: str = "logit",
    mask: Optional[Tensor] = None,
) -> LensResult:
    """The logit lens `unembed(final_norm(X_{l,t}))` (or the coda lens, `lens="coda"`: the rest of
    the network from X_{l,t}) at every (iteration, block layer), summarised per position.

    `targets` [B, S] are the tokens whose probability and rank are tracked (default: the model's
    final top-1 prediction at each position, from the cache's last iteration).
    """
    if lens == "coda" and model.cfg.n_coda == 0:
        raise ValueError("this model has no coda; use lens='logit'")
    x = cache.stack("hook_resid_post")  # [T, L, B, S, D]
    T, L, B, S, _ = x.shape
    with torch.no_grad():
        final_logits = model.finish(cache[f"iter.{T - 1}.hook_state_post"], mask)
        final_logp = F.log_softmax(final_logits.float(), -1)  # [B, S, V]
        final_top = final_logp.argmax(-1)
        tgt = final_top if targets is None else targets.to(final_top.device)
        out = {n: [] for n in ("ids", "probs", "tp", "rank", "ent", "kl")}
        for t in range(T):
            xs = x[t]  # [L, B, S, D]
            if lens == "logit":
                logits = model.unembed(model.ln_final(xs, NO_HOOKS))
            else:
                logits = torch.stack([model.finish(xi, mask) for xi in xs])
            logp = F.log_softmax(logits.float(), -1)  # [L, B, S, V]
            p = logp.exp()
            top = logp.topk(k, dim=-1)
            target_logp = logp.gather(-1, tgt[None, ..., None].expand(L, B, S, 1))[..., 0]
            out["ids"].append(top.indices)
            out["probs"].append(top.values.exp())
            out["tp"].append(target_logp.exp())
            out["rank"].append((logp > target_logp[..., None]).sum(-1))
            out["ent"].append(-(p * logp).sum(-1))
            out["kl"].append((final_logp.exp()[None] * (final_logp[None] - logp)).sum(-1))
    st = {n: torch.stack(v) for n, v in out.items()}
    names = None
    if model.tokenizer is not None:
        from loop_lens.tokenization import decode_each

        names = decode_each(model.tokenizer, list(range(model.cfg.d_vocab)))
    return LensResult(st["ids"], st["probs"], st["tp"], st["rank"], st["ent"], st["kl"], final_top, tgt, lens, names)


@dataclass
class DepthProfile(Result):
    """ColSum concentration (mean over heads and batch) and residual norm per unrolled depth of the
    recurrent block, with the paper's three groupings; optionally a feedforward baseline."""

    concentration: Float[Tensor, "T L"]
    resid_norm: Float[Tensor, "T L"]
    bos_norm: Float[Tensor, "T L"]
    baseline_concentration: Optional[Tensor] = None  # [depth]
    baseline_resid_norm: Optional[Tensor] = None

    def to_frame(self) -> pd.DataFrame:
        T, L = self.concentration.shape
        frame = long_frame(self.concentration, ["iteration", "layer"], "concentration")
        frame["resid_norm"] = self.resid_norm.reshape(-1).cpu().numpy()
        frame["bos_norm"] = self.bos_norm.reshape(-1).cpu().numpy()
        frame["depth"] = frame["iteration"] * L + frame["layer"]
        frame["relative_depth"] = (frame["layer"] + 1) / L
        frame["model"] = "looped"
        if self.baseline_concentration is not None:
            n = len(self.baseline_concentration)
            base = pd.DataFrame({
                "depth": range(n), "concentration": self.baseline_concentration.cpu().numpy(),
                "resid_norm": self.baseline_resid_norm.cpu().numpy(), "relative_depth": [(i + 1) / n for i in range(n)],
                "model": "feedforward",
            })
            frame = pd.concat([frame, base], ignore_index=True)
        return frame

    def plot(self, value: str = "concentration"):
        """Three panels: raw depth; by recurrence (relative depth within each pass, a line per
        iteration, the feedforward baseline over its own relative depth); by layer."""
        from plotly.subplots import make_subplots

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


def depth_profile(cache: LoopCache, baseline_cache: Optional[LoopCache] = None, mask: Optional[Tensor] = None) -> DepthProfile:
    """Concentration and residual norms per (iteration, block layer); a baseline cache (a
    feedforward model, e.g. `zoo:khop-ff`) is profiled over its own layers for comparison."""
    a = cache.stack("attn.hook_pattern")  # [T, L, B, H, S, S]
    conc = colsum_concentration(a, mask).mean((-2, -1))
    x = cache.stack("hook_resid_post").float()  # [T, L, B, S, D]
    norms = x.norm(dim=-1)
    if mask is not None:
        m = mask.float()[None, None]
        resid = (norms * m).sum((-2, -1)) / m.sum((-2, -1))
    else:
        resid = norms.mean((-2, -1))
    bos = norms[..., 0].mean(-1)
    profile = DepthProfile(conc, resid, bos)
    if baseline_cache is not None:
        ba = baseline_cache.stack("attn.hook_pattern")  # [Tb, Lb, ...] -> depth
        profile.baseline_concentration = colsum_concentration(ba, mask).mean((-2, -1)).reshape(-1)
        profile.baseline_resid_norm = baseline_cache.stack("hook_resid_post").float().norm(dim=-1).mean((-2, -1)).reshape(-1)
    return profile
