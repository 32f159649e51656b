"""Pictures for notebooks: plotly figures and offline circuitsvis attention views per iteration.

Every function here draws a result from `loop_lens.analysis`; the attention view embeds
circuitsvis's bundled JavaScript once, so it renders with no network (no CDN).
"""

from __future__ import annotations

import html
import json
import uuid
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from loop_lens.cache import LoopCache


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's own JavaScript bundle (defines the global `CircuitsVis`), for inlining."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script>", "<\\/script>")


class AttentionView:
    """Attention patterns of every head of one block layer, with a control to move through the
    iterations (and layers). Renders offline in Jupyter (`_repr_html_`) or as part of a page."""

    def __init__(self, patterns: torch.Tensor, str_tokens: Sequence[str], title: str = "Attention by iteration"):
        # patterns: [T, L, H, S, S] for one batch item
        self.patterns = patterns.float().cpu()
        self.tokens = [str(t) for t in str_tokens]
        self.title = title

    def data(self) -> dict:
        T, L, H = self.patterns.shape[:3]
        return {
            "tokens": self.tokens,
            "heads": [f"L{layer}H{h}" for layer in range(L) for h in range(H)],
            "n_loops": T,
            "n_layers": L,
            "attention": [[[[[round(v, 4) for v in row] for row in head] for head in layer] for layer in it] for it in self.patterns.tolist()],
        }

    def html(self, include_bundle: bool = True) -> str:
        """The view as an HTML fragment: bundle (optional), controls, a container, a script."""
        vid = "ll-attn-" + uuid.uuid4().hex[:10]
        T, L = self.patterns.shape[:2]
        payload = json.dumps(self.data())
        bundle = f"<script>{circuitsvis_bundle()}</script>" if include_bundle else ""
        return f"""{bundle}
<div class="ll-attention" id="{vid}">
  <h3>{html.escape(self.title)}</h3>
  <label>iteration <input type="range" class="ll-iter" min="0" max="{T - 1}" value="0" step="1">
    <span class="ll-iter-label">0</span> / {T - 1}</label>
  <label style="margin-left:1em">layer <select class="ll-layer">{"".join(f'<option value="{layer}">{layer}</option>' for layer in range(L))}</select></label>
  <div class="ll-attn-container"></div>
</div>
<script>
(function() {{
  const root = document.getElementById("{vid}");
  const data = {payload};
  const slider = root.querySelector(".ll-iter"), layerSel = root.querySelector(".ll-layer");
  const label = root.querySelector(".ll-iter-label"), box = root.querySelector(".ll-attn-container");
  function show() {{
    const t = +slider.value, l = +layerSel.value;
    label.textContent = t;
    box.innerHTML = "";
    const div = document.createElement("div");
    div.id = "{vid}-" + t + "-" + l + "-" + Date.now();
    div.dataset.iteration = t; div.dataset.layer = l;
    box.appendChild(div);
    const H = data.attention[t][l].length;
    CircuitsVis.render(div.id, CircuitsVis.AttentionHeads, {{
      attention: data.attention[t][l], tokens: data.tokens,
      attentionHeadNames: data.heads.slice(l * H, (l + 1) * H)
    }});
  }}
  slider.addEventListener("input", show); layerSel.addEventListener("change", show);
  show();
}})();
</script>"""

    def _repr_html_(self) -> str:
        return self.html(include_bundle=True)


def attention(
    cache: LoopCache,
    str_tokens: Optional[Sequence[str]] = None,
    batch: int = 0,
    max_positions: int = 64,
) -> AttentionView:
    """All heads of every block layer at every iteration, for one batch item (first
    `max_positions` positions), with an iteration slider and a layer selector."""
    pattern = cache.stack("attn.hook_pattern")[:, :, batch]  # [T, L, H, S, S]
    S = min(pattern.shape[-1], max_positions)
    pattern = pattern[..., :S, :S]
    tokens = list(str_tokens)[:S] if str_tokens is not None else [str(i) for i in range(S)]
    return AttentionView(pattern, tokens)


def convergence(steps, by: str = "layer"):
    """Step size by iteration (one line per layer), from `analysis.step_sizes`."""
    return steps.plot(by=by)


def fixed_point_cosines(fp):
    """Heatmap of cos(X*_i, X*_j) between block layers, from `analysis.fixed_points`."""
    return fp.plot_layer_cosine()


def cyclic_similarity(sim):
    """Heatmap over every (iteration, layer) pair, from `analysis.cyclic_similarity`."""
    return sim.plot()


def logit_lens_grid(lens, position: int = -1, batch: int = 0, value: str = "target_prob"):
    """Iteration x layer heatmap annotated with the top token, from `analysis.logit_lens`."""
    return lens.plot(position=position, batch=batch, value=value)


def stages(profile, value: str = "concentration"):
    """The paper's three groupings (depth / by recurrence / by layer), from `analysis.depth_profile`."""
    return profile.plot(value=value)


def trajectory(traj, dims: int = 2):
    """PCA path of one token's states, from `analysis.pca_trajectory`."""
    return traj.plot(dims=dims)
