"""The result of a patching sweep (activation or attribution patching)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from loop_lens.checks import positive_int
from loop_lens.result import Result


@dataclass(kw_only=True)
class PatchingResult(Result):
    """A patching sweep over one site kind. `values` holds `metric(patched logits)` (attribution
    patching: its first-order estimate) per site; `prelude` / `coda` hold the prelude's and the
    coda's layers for block sites of models that have them."""

    values: Float[Tensor, "*sweep"]
    """[n_loops, n_block, pos] (resid_post, attn_out, mlp_out), [n_loops, n_block, n_heads]
    (head), [n_loops, pos] (state, injection)."""
    prelude: Optional[Float[Tensor, "n_prelude width"]] = None
    coda: Optional[Float[Tensor, "n_coda width"]] = None
    clean_metric: float
    corrupt_metric: float
    site: str
    method: str  # "activation" or "attribution"
    positions: Optional[list[int]] = None  # the positions of the last axis (None for heads)
    n_loops: int
    seed: Optional[int] = None
    is_normalized: bool = False
    str_tokens: Optional[list[str]] = field(default=None, repr=False)  # the clean prompt's tokens

    @property
    def index_name(self) -> str:
        """What the last axis counts: "head" or "position"."""
        return "head" if self.site == "head" else "position"

    def _labels(self) -> list[str]:
        if self.site == "head" or self.positions is None:
            return [f"H{h}" for h in range(self.values.shape[-1])]
        toks = self.str_tokens
        return [f"{p} {toks[p]}" if toks is not None and p < len(toks) else str(p) for p in self.positions]

    def normalized(self) -> PatchingResult:
        """The same sweep as `(m - m_corrupt) / (m_clean - m_corrupt)`: 0 = no effect, 1 = the
        whole clean metric restored."""
        if self.is_normalized:
            return self
        span = self.clean_metric - self.corrupt_metric
        if span == 0:
            raise ValueError("the clean and corrupted metrics are equal, so the normalized effect is undefined")

        def norm(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else (x - self.corrupt_metric) / span

        return PatchingResult(values=norm(self.values), prelude=norm(self.prelude), coda=norm(self.coda), clean_metric=1.0,
                              corrupt_metric=0.0, site=self.site, method=self.method, positions=self.positions,
                              n_loops=self.n_loops, seed=self.seed, is_normalized=True, str_tokens=self.str_tokens)

    def effect(self) -> Float[Tensor, "*sweep"]:
        """`values - corrupt_metric`: what each patch changes (0 everywhere when clean == corrupt)."""
        return self.values - self.corrupt_metric

    def to_frame(self) -> pd.DataFrame:
        """One row per site: phase, iteration (-1 outside the loop), layer (-1 for per-iteration
        sites), position or head, value, effect."""
        rows = []
        index_values = self.positions if self.site != "head" and self.positions is not None else list(range(self.values.shape[-1]))

        def add(phase: str, t: int, layer: int, vec: Tensor) -> None:
            for i, v in zip(index_values, vec.tolist()):
                rows.append((self.site, phase, t, layer, i, v))

        for layer, vec in enumerate(self.prelude if self.prelude is not None else []):
            add("prelude", -1, layer, vec)
        v = self.values.detach().cpu().float()
        for t in range(v.shape[0]):
            if v.ndim == 2:
                add("loop", t, -1, v[t])
            else:
                for layer in range(v.shape[1]):
                    add("loop", t, layer, v[t, layer])
        for layer, vec in enumerate(self.coda if self.coda is not None else []):
            add("coda", -1, layer, vec)
        frame = pd.DataFrame(rows, columns=["site", "phase", "iteration", "layer", self.index_name, "value"])
        frame["effect"] = frame["value"] - self.corrupt_metric
        return frame

    def top(self, k: int = 10) -> pd.DataFrame:
        """The `k` sites with the largest absolute effect, largest first."""
        k = positive_int(k, "k")
        frame = self.to_frame()
        order = frame["effect"].abs().sort_values(ascending=False, kind="stable").index
        return frame.loc[order[:k]].reset_index(drop=True)

    def plot(self, **kwargs: Any):
        """Heatmaps of the effect, iterations on the y axis: one panel per block layer (one panel
        for per-iteration sites), and one for the prelude and coda layers where present."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        eff = self.effect().detach().cpu().float()
        panels = [("iteration", eff)] if eff.ndim == 2 else [(f"layer {l}", eff[:, l]) for l in range(eff.shape[1])]
        outer = []
        if self.prelude is not None:
            outer += [(f"prelude {l}", (row - self.corrupt_metric)) for l, row in enumerate(self.prelude.detach().cpu().float())]
        if self.coda is not None:
            outer += [(f"coda {l}", (row - self.corrupt_metric)) for l, row in enumerate(self.coda.detach().cpu().float())]
        titles = [f"{self.site}: {name}" if eff.ndim == 3 else self.site for name, _ in panels]
        if outer:
            titles.append("prelude / coda")
        fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, shared_yaxes=False)
        bound = float(max(eff.abs().max(), max((r.abs().max() for _, r in outer), default=torch.tensor(0.0)))) or 1.0
        x = list(self._labels())  # escaped by Result.plot
        for c, (_, z) in enumerate(panels, start=1):
            fig.add_trace(go.Heatmap(z=z.numpy(), x=x, y=[f"t{t}" for t in range(z.shape[0])], colorscale="RdBu", zmid=0,
                                     zmin=-bound, zmax=bound, showscale=c == 1), row=1, col=c)
            fig.update_yaxes(title_text="iteration", autorange="reversed", row=1, col=c)
            fig.update_xaxes(title_text=self.index_name, row=1, col=c)
        if outer:
            z = torch.stack([r for _, r in outer]).numpy()
            fig.add_trace(go.Heatmap(z=z, x=x, y=[name for name, _ in outer], colorscale="RdBu", zmid=0, zmin=-bound,
                                     zmax=bound, showscale=False), row=1, col=len(titles))
        what = "normalized effect" if self.is_normalized else "metric(patched) - metric(corrupt)"
        fig.update_layout(title=f"{self.method} patching, {self.site}, T={self.n_loops}: {what}", **kwargs)
        return fig

