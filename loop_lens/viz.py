"""Pictures for notebooks: plotly figures and offline circuitsvis attention views per iteration.

Every function here draws a result from `loop_lens.analysis`; the attention view embeds
circuitsvis's bundled JavaScript once, so it renders with no network (no CDN). HTML is made from
the Jinja2 templates in `loop_lens/templates` with autoescape on: token strings, titles and other
text from checkpoints or users land escaped as HTML text, attributes, or JSON inside a script.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import jinja2
import torch
from markupsafe import Markup

from loop_lens.cache import LoopCache
from loop_lens.plotting import safe_figure

# Characters that could end a <script> element or open a tag or comment inside it (and `'`, for
# single-quoted attributes). json.dumps(ensure_ascii=True) already writes U+2028 / U+2029 (and all
# non-ASCII) as \uXXXX.
_SCRIPT_UNSAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "'": "\\u0027"})
_SCRIPT_END = re.compile(r"</(?=script)", re.IGNORECASE)


def script_json(value: Any) -> Markup:
    """`value` as JSON that is safe to place inside an HTML `<script>` element: `<`, `>`, `&`, `'`
    and every non-ASCII character (U+2028, U+2029 included) are written as `\\uXXXX` escapes."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except ValueError as err:
        raise ValueError(f"cannot write a non-finite number into the page's JSON: {err}") from err
    return Markup(text.translate(_SCRIPT_UNSAFE))


def _inline_script(code: str) -> str:
    """Trusted library JavaScript with every `</script` (any case) written `<\\/script`, so it
    cannot end the element it is inlined in."""
    return _SCRIPT_END.sub("<\\\\/", code)


@lru_cache(maxsize=1)
def templates() -> jinja2.Environment:
    """loop_lens's Jinja2 environment: its packaged templates, autoescape on, undefined names are
    errors, and the `script_json` filter for data inside `<script>`."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("loop_lens", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["script_json"] = script_json
    return env


def parts() -> jinja2.environment.TemplateModule:
    """The report's building blocks (`figure`, `table`, `note`, `layout` macros of `parts.html.j2`);
    each call returns escaped Markup."""
    return templates().get_template("parts.html.j2").module


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's own JavaScript bundle (defines the global `CircuitsVis`), for inlining."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return _inline_script(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def plotly_bundle() -> str:
    """plotly.js as shipped with the plotly package (defines the global `Plotly`), for inlining."""
    import plotly.offline

    return _inline_script(plotly.offline.get_plotlyjs())


def figure_html(fig: Any) -> Markup:
    """A plotly figure as an HTML fragment for a page that already has plotly.js: a div and a
    `Plotly.newPlot` call whose figure JSON is escaped with `script_json` (whatever plotly's version)."""
    import plotly.io

    spec = json.loads(plotly.io.to_json(safe_figure(fig), validate=False))
    spec["config"] = {"displaylogo": False, "responsive": True}
    return parts().figure("ll-fig-" + uuid.uuid4().hex[:12], spec)


class AttentionView:
    """Attention patterns of every head of one block layer, with a control to move through the
    iterations (and layers). Renders offline in Jupyter (`_repr_html_`) or as part of a page."""

    def __init__(self, patterns: torch.Tensor, str_tokens: Sequence[str], title: str = "Attention by iteration",
                 iterations: Optional[Sequence[int]] = None):
        """`patterns` [n_loops, n_layers, n_heads, pos, pos]; `iterations` labels the first axis
        when it holds a selection of the run's iterations (default 0, 1, ...)."""
        if not isinstance(patterns, torch.Tensor) or patterns.ndim != 5 or patterns.shape[-1] != patterns.shape[-2]:
            shape = tuple(patterns.shape) if isinstance(patterns, torch.Tensor) else type(patterns).__name__
            raise ValueError(f"patterns must be a tensor [n_loops, n_layers, n_heads, pos, pos], got {shape}")
        if min(patterns.shape[:3]) < 1:
            raise ValueError(f"patterns need at least one iteration, layer and head, got shape {tuple(patterns.shape)}")
        if isinstance(str_tokens, str) or len(str_tokens) != patterns.shape[-1]:
            given = "a single string" if isinstance(str_tokens, str) else f"{len(str_tokens)} tokens"
            raise ValueError(f"str_tokens must be one string per position: the patterns cover {patterns.shape[-1]} "
                             f"positions, got {given}")
        T = patterns.shape[0]
        labels = list(range(T)) if iterations is None else [int(i) for i in iterations]
        if len(labels) != T:
            raise ValueError(f"iterations must label each of the {T} pattern iterations, got {len(labels)} labels")
        self.iterations = labels
        self.patterns = patterns.float().cpu()  # [T, L, H, S, S] for one batch item
        self.tokens = [str(t) for t in str_tokens]
        self.title = str(title)

    def data(self) -> dict:
        """What the page's script draws: tokens, head names, sizes and every pattern (4 decimals;
        a non-finite weight becomes null)."""
        T, L, H = self.patterns.shape[:3]
        return {
            "tokens": self.tokens,
            "heads": [f"L{layer}H{h}" for layer in range(L) for h in range(H)],
            "n_loops": T,
            "iterations": self.iterations,
            "n_layers": L,
            "attention": [[[[[round(v, 4) if math.isfinite(v) else None for v in row] for row in head] for head in layer]
                           for layer in it] for it in self.patterns.tolist()],
        }

    def html(self, include_bundle: bool = True) -> Markup:
        """The view as an HTML fragment: bundle (optional), controls, the tokens as text, a container
        that circuitsvis draws into, and the script that feeds it."""
        T, L = self.patterns.shape[:2]
        return Markup(templates().get_template("attention_view.html.j2").render(
            view_id="ll-attn-" + uuid.uuid4().hex[:12], title=self.title, tokens=self.tokens, n_loops=T, n_layers=L,
            last_iteration=self.iterations[-1],
            data=self.data(),
            bundle=circuitsvis_bundle() if include_bundle else None))

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
