"""The head-stability report: one standalone HTML file that opens offline, and its numbers as JSON.

    loop-lens report zoo:khop-huginn --prompts "..." --n-loops 32 --out report.html --json report.json

or from Python: `ll.report.build_report(model, prompts, n_loops=32).save("report.html")`.
plotly.js and circuitsvis's bundle are inlined once each; nothing is fetched from a CDN.
"""

from __future__ import annotations

import html
import json
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd
import torch
from tqdm.auto import tqdm

from loop_lens.analysis.attention import attention_stability
from loop_lens.analysis.fixed_points import cyclic_similarity, fixed_points, step_sizes
from loop_lens.analysis.stages import logit_lens
from loop_lens.analysis.trajectory import pca_trajectory
from loop_lens.viz import AttentionView

REPORT_HOOKS = ("hook_resid_post", "hook_resid_pre", "attn.hook_pattern", "hook_state_post")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table.ll-table { border-collapse: collapse; font-size: .85em; }
table.ll-table th, table.ll-table td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.ll-table th { background: #f3f3f3; cursor: pointer; user-select: none; }
table.ll-table th.sorted-asc::after { content: " \\25B2"; } table.ll-table th.sorted-desc::after { content: " \\25BC"; }
pre.ll-meta { background: #f7f7f7; padding: .8em; white-space: pre-wrap; font-size: .85em; }
.ll-note { color: #555; font-size: .9em; }
"""

_SORT_JS = """
document.querySelectorAll("table.ll-sortable").forEach(function(table) {
  table.querySelectorAll("th").forEach(function(th, col) {
    th.addEventListener("click", function() {
      const body = table.tBodies[0], rows = Array.from(body.rows);
      const asc = !th.classList.contains("sorted-asc");
      table.querySelectorAll("th").forEach(h => h.classList.remove("sorted-asc", "sorted-desc"));
      th.classList.add(asc ? "sorted-asc" : "sorted-desc");
      const key = r => { const v = r.cells[col].dataset.value ?? r.cells[col].textContent; const n = parseFloat(v); return isNaN(n) ? v : n; };
      rows.sort((a, b) => { const x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1); });
      rows.forEach(r => body.appendChild(r));
    });
  });
});
"""


def _table_html(frame: pd.DataFrame, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, r in frame.iterrows():
        cells = []
        for v in r:
            if isinstance(v, float):
                text = "–" if math.isnan(v) else f"{v:.4g}"
                cells.append(f'<td data-value="{"" if math.isnan(v) else v}">{text}</td>')
            elif v is None:
                cells.append('<td data-value="">–</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="ll-table ll-sortable" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _clean(value: Any) -> Any:
    """JSON-safe: NaN -> None, tensors -> lists."""
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class Report:
    """The computed report: sections of HTML and the numbers behind them."""

    meta: dict
    sections: list[tuple[str, str]] = field(default_factory=list)  # (title, html)
    numbers: dict = field(default_factory=dict)

    def html(self) -> str:
        import plotly.offline

        plotly_js = plotly.offline.get_plotlyjs()
        from loop_lens.viz import circuitsvis_bundle

        meta = "\n".join(f"{k}: {v}" for k, v in self.meta.items())
        body = "".join(f"<section><h2>{html.escape(t)}</h2>{h}</section>" for t, h in self.sections)
        return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>loop_lens report: {html.escape(str(self.meta.get("model", "")))}</title>
<style>{_STYLE}</style>
<script>{plotly_js}</script>
<script>{circuitsvis_bundle()}</script>
</head><body>
<h1>loop_lens head-stability report</h1>
<pre class="ll-meta">{html.escape(meta)}</pre>
{body}
<script>{_SORT_JS}</script>
</body></html>"""

    def save(self, path: Union[str, Path], json_path: Optional[Union[str, Path]] = None) -> Path:
        path = Path(path)
        path.write_text(self.html(), encoding="utf-8")
        if json_path is not None:
            Path(json_path).write_text(json.dumps(_clean({"meta": self.meta, **self.numbers}), indent=1))
        return path

    def _repr_html_(self) -> str:
        return self.html()


def _fig(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def build_report(
    model,
    prompts: Union[str, Sequence[str], torch.Tensor],
    n_loops: Optional[int] = None,
    model_name: str = "",
    command: str = "",
    position: int = -1,
    seed: int = 0,
    stabilisation_tol: float = 1e-2,
    convergence_tol: float = 1e-3,
    progress: bool = True,
) -> Report:
    """Run the model on the prompts (one batch, right-padded) and assemble every section."""
    import loop_lens

    T = n_loops or model.cfg.default_loops
    if isinstance(prompts, torch.Tensor):
        tokens = prompts if prompts.ndim == 2 else prompts[None]
        mask = torch.ones_like(tokens)
        prompt_text = [" ".join(map(str, row.tolist())) for row in tokens]
    else:
        prompt_text = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_text:
            raise ValueError("no prompts given")
        tokens, mask = model.tokenize(prompt_text)
    steps_bar = tqdm(total=7, desc="report", disable=not progress)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, n_loops=T, attention_mask=mask, seed=seed,
                                        names_filter=lambda n: n.endswith(REPORT_HOOKS))
    steps_bar.update()
    m = mask if not bool(mask.all()) else None
    steps = step_sizes(cache, mask=m)
    fp = fixed_points(cache, mask=m)
    sim = cyclic_similarity(cache, mask=m)
    steps_bar.update()
    stab = attention_stability(model, cache, tokens, mask=m)
    table = stab.table(tol=stabilisation_tol)
    steps_bar.update()
    lens = logit_lens(model, cache, mask=m)
    steps_bar.update()
    length0 = int(mask[0].sum())
    pos = position if position >= 0 else length0 + position
    traj = pca_trajectory(cache, position=pos, batch=0)
    steps_bar.update()
    str_tokens = model.to_str_tokens(tokens[0, :length0]) if model.tokenizer is not None else [str(t) for t in tokens[0, :length0].tolist()]
    view = AttentionView(cache.stack("attn.hook_pattern")[:, :, 0, :, :length0, :length0], str_tokens,
                         title="Attention patterns of every head, prompt 0")
    conv = steps.convergence_iteration(convergence_tol)
    cfg = model.cfg
    meta = {
        "command": command or "(Python) loop_lens.report.build_report",
        "model": model_name or cfg.model_name,
        "family": cfg.family,
        "layout": f"{cfg.layout}  (run with n_loops = {T})",
        "prompts": " | ".join(prompt_text)[:2000],
        "seed": seed,
        "loop_lens": loop_lens.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "iterations": "counted from 0 (the paper counts from 1)",
    }
    report = Report(meta)
    report.sections.append(("Layout", f"<p>{html.escape(cfg.layout)}: {cfg.n_prelude} prelude layers, a {cfg.n_block}-layer block run "
                                      f"{T} times, {cfg.n_coda} coda layers. Norms: <code>{cfg.norm_placement}</code>; injection: "
                                      f"<code>{cfg.injection}</code>; per-iteration norm: {cfg.iter_norm}; exit gate: {cfg.exit_gate}.</p>"))
    conv_text = ", ".join(f"layer {i}: {'never' if c < 0 else c}" for i, c in enumerate(conv.max(dim=1).values.tolist()))
    report.sections.append(("Convergence of each block layer", _fig(steps.plot()) +
                            f'<p class="ll-note">Relative step ||X_t - X_(t-1)|| / ||X_t|| per layer (mean over prompts). '
                            f"Convergence iteration (relative step stays below {convergence_tol:g}): {conv_text}.</p>"))
    report.sections.append(("Fixed-point cosine matrix", _fig(fp.plot_layer_cosine()) +
                            f'<p class="ll-note">cos(X*_i, X*_j) with X* = the last iteration; min = {fp.min_layer_cosine:.4f} '
                            f"({'degenerate: one shared point' if fp.degenerate() else 'distinct fixed points per layer'}).</p>"))
    report.sections.append(("Cyclic similarity of residual streams", _fig(sim.plot())))
    report.sections.append(("Head stability", _table_html(table, "ll-head-table") +
                            f'<p class="ll-note">Click a column to sort. Stabilisation iteration: first t after which the Frobenius '
                            f"change of the pattern stays below {stabilisation_tol:g} (median over prompts; – = never). Head type, "
                            "concentration (ColSum), sink score and mixing at the last iteration. kappa = ||W_Q W_K^T||_2, the "
                            "constant of the paper's bound tying pattern change to the residual step.</p>"))
    report.sections.append(("Attention per head and iteration", view.html(include_bundle=False)))
    report.sections.append((f"Logit lens at position {pos}", _fig(lens.plot(position=pos)) + lens.grid(position=pos).to_html(classes="ll-table")))
    report.sections.append((f"PCA trajectory of position {pos}", _fig(traj.plot(dims=2))))
    steps_bar.update(2)
    steps_bar.close()
    report.numbers = {
        "step_sizes": {"relative": steps.relative.mean(-1), "convergence_iteration": conv},
        "fixed_point_cosine": fp.layer_cosine,
        "head_stability": table.to_dict(orient="records"),
        "sink_rate": stab.sink_rate(),
        "logit_lens_top1": lens.top_ids[:, :, 0, pos, 0],
        "logit_lens_top1_prob": lens.top_probs[:, :, 0, pos, 0],
        "trajectory": traj.coords,
    }
    return report
