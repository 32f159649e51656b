"""Trajectories: PCA of one token's latent states across (iteration, layer) (the paper's orbit figures)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from loop_lens.analysis import _checks
from loop_lens.analysis.result import Result
from loop_lens.cache import LoopCache


@dataclass(kw_only=True)
class Trajectory(Result):
    """Coordinates of X_{l,t} for one (batch, position) on its top principal components."""

    coords: Float[Tensor, "T L C"]
    explained_variance_ratio: Float[Tensor, " C"]
    batch: int
    position: int

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, layer) with its coordinates pc1, pc2, ..."""
        T, L, C = self.coords.shape
        rows = []
        for t in range(T):
            for layer in range(L):
                row = dict(iteration=t, layer=layer, depth=t * L + layer)
                row.update({f"pc{c + 1}": float(self.coords[t, layer, c]) for c in range(C)})
                rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, dims: int = 2):
        """2-D or 3-D path through the states, coloured by block layer, in iteration order."""
        import plotly.express as px

        if dims not in (2, 3) or dims > self.coords.shape[-1]:
            raise ValueError(f"dims must be 2 or 3 and at most the {self.coords.shape[-1]} components computed, got {dims!r}")
        frame = self.to_frame()
        evr = self.explained_variance_ratio.tolist()
        title = f"Trajectory of position {self.position} (explained variance {sum(evr[:dims]):.0%})"
        if dims == 3:
            fig = px.line_3d(frame, x="pc1", y="pc2", z="pc3", color="layer", markers=True, hover_data=["iteration"], title=title)
        else:
            fig = px.line(frame, x="pc1", y="pc2", color="layer", markers=True, hover_data=["iteration"], title=title)
            fig.add_scatter(x=frame.pc1, y=frame.pc2, mode="lines", line=dict(color="lightgrey", width=1), name="unrolled order")
        return fig


def pca_trajectory(cache: LoopCache, position: int = -1, batch: int = 0, n_components: int = 3, kind: str = "hook_resid_post") -> Trajectory:
    """PCA (centred SVD) of the states of one token over every (iteration, block layer)."""
    cache = _checks.loop_cache(cache)
    states = cache.model.measured_state(cache.stack(kind), kind)  # [T, L, B, S, D], as the model measures states
    B, S = states.shape[2:4]
    _checks.not_empty(B, S)
    position = _checks.index(position, "position", S, "positions")
    batch = _checks.index(batch, "batch", B, "batch items")
    n_components = _checks.positive_int(n_components, "n_components")
    x = states[:, :, batch, position].float()  # [T, L, D]
    T, L, D = x.shape
    flat = x.reshape(T * L, D)
    centred = flat - flat.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    c = min(n_components, vh.shape[0])
    var = s.square()
    coords = (centred @ vh[:c].T).reshape(T, L, c)
    return Trajectory(coords=coords, explained_variance_ratio=var[:c] / var.sum().clamp_min(1e-12), batch=batch, position=position)
