"""The head-stability report: one standalone HTML file that opens offline, and its numbers as JSON.

    loop-lens report zoo:khop-huginn --prompts "..." --n-loops 32 --out report.html --json report.json

or from Python: `ll.report.build_report(model, prompts, n_loops=32).save("report.html")`.
plotly.js and circuitsvis's bundle are inlined once each; nothing is fetched from a CDN. The page is
rendered from Jinja2 templates with autoescape on, so model names, prompts, tokens and the command
line appear as text and never as markup or script.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import pandas as pd
import torch
from markupsafe import Markup
from torch import Tensor
from tqdm.auto import tqdm

from loop_lens.analysis.attention import attention_stability
from loop_lens.analysis.fixed_points import cyclic_similarity, fixed_points, step_sizes
from loop_lens.analysis.stages import logit_lens
from loop_lens.analysis.trajectory import pca_trajectory
from loop_lens.checks import check_n_loops, finite_number, integer, single_loop
from loop_lens.checks import seed as check_seed
from loop_lens.files import write_text_atomic
from loop_lens.patching import activation_patch
from loop_lens.viz import AttentionView, circuitsvis_bundle, figure_html, parts, plotly_bundle, templates

REPORT_HOOKS = ("hook_resid_post", "hook_resid_pre", "attn.hook_pattern", "hook_state_post")
ATTENTION_POSITIONS = 64  # the attention view shows the first 64 positions, as `viz.attention` does
ATTENTION_WEIGHTS = 4_000_000  # and embeds at most this many pattern weights (about 30 MB of HTML)


def _attention_view(cache: Any, str_tokens: Sequence[str], length: int) -> tuple[AttentionView, str]:
    """The report's attention view of prompt 0 and a note saying what it shows. A 1B-class model's
    full set (16 iterations x 24 layers x 16 heads x 256^2 positions) is 400M weights, too many
    for a page: beyond `ATTENTION_WEIGHTS` the view keeps evenly spaced iterations, first and last
    always."""
    patterns = cache.stack("attn.hook_pattern")  # [T, L, B, H, S, S]
    T, L, _, H = patterns.shape[:4]
    S = min(length, ATTENTION_POSITIONS)
    keep = max(1, min(T, ATTENTION_WEIGHTS // (L * H * S * S)))
    if T > 1:
        keep = max(keep, 2)
    iterations = sorted({round(i * (T - 1) / (keep - 1)) for i in range(keep)}) if keep > 1 else [T - 1]
    view = AttentionView(patterns[iterations, :, 0, :, :S, :S], list(str_tokens)[:S],
                         title="Attention patterns of every head, prompt 0", iterations=iterations)
    shown = []
    if S < length:
        shown.append(f"positions 0..{S - 1} of {length}")
    if len(iterations) < T:
        shown.append(f"iterations {', '.join(map(str, iterations))} of 0..{T - 1}")
    note = ("" if not shown else "This view shows " + " and ".join(shown) + f" (a page embeds at most "
            f"{ATTENTION_WEIGHTS:,} weights); `loop_lens.viz.attention(cache)` in a notebook shows any of them.")
    return view, note


class _Cell(NamedTuple):
    """One table cell: the text shown and the `data-value` its column sorts by (None: the text)."""

    text: str
    value: Optional[str] = None


def _cell(v: Any) -> _Cell:
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return _Cell("–", "")
    if isinstance(v, (float, np.floating)):
        return _Cell(f"{v:.4g}", repr(float(v)))
    return _Cell(str(v))


def _table_html(frame: pd.DataFrame, table_id: Optional[str] = None, sortable: bool = False,
                index: Optional[str] = None) -> Markup:
    """A DataFrame as an escaped HTML table; `index` names a first column holding the row labels."""
    columns = ([index] if index is not None else []) + [str(c) for c in frame.columns]
    rows = [([_Cell(str(label))] if index is not None else []) + [_cell(v) for v in row]
            for label, row in zip(frame.index, frame.itertuples(index=False, name=None))]
    return parts().table(columns, rows, table_id=table_id, sortable=sortable)


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
    """The computed report: its meta lines, its sections and the numbers behind them.

    A section is `(title, body)`; the title is text, the body is `Markup` made from the package's
    templates (trusted HTML) or plain text, which the page escapes."""

    meta: dict
    sections: list[tuple[str, Union[Markup, str]]] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    def html(self) -> str:
        """The standalone page: plotly.js and circuitsvis inlined, every text escaped."""
        return templates().get_template("report.html.j2").render(
            title=str(self.meta.get("model", "")), meta={str(k): str(v) for k, v in self.meta.items()},
            sections=[(str(t), b) for t, b in self.sections], plotly_js=plotly_bundle(), circuitsvis_js=circuitsvis_bundle())

    def save(self, path: Union[str, Path], json_path: Optional[Union[str, Path]] = None) -> Path:
        """Write the page to `path` (and the meta and numbers as JSON to `json_path`), each atomically:
        a crash mid-write leaves the previous file whole. Returns `path`."""
        path = Path(path)
        page = self.html()
        numbers = None if json_path is None else json.dumps(_clean({"meta": self.meta, **self.numbers}), indent=1)
        write_text_atomic(path, page)
        if numbers is not None:
            write_text_atomic(Path(json_path), numbers)
        return path

    def _repr_html_(self) -> str:
        return self.html()


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
    corrupt: Optional[str] = None,
    generate: int = 0,
    adaptive: Optional[str] = None,
    threshold: Optional[float] = None,
    **options: Any,
) -> Report:
    """Run the model on the prompts (one batch, right-padded) and assemble every section.

    Optional sections: `corrupt=` (a prompt of the same length as prompt 0) adds activation
    patching of every (iteration, layer, position) residual from prompt 0 into the corrupted run,
    with the logit difference between the two runs' answers as the metric; `generate=N` adds N
    generated tokens after prompt 0 with the iterations each used (`adaptive=` / `threshold=`
    pick an exit criterion, as `model.generate`).

    `options` are the family's run keywords (as `forward` takes them); a family may add a layout
    paragraph and sections of its own (`model._describe_layout`, `model._report_sections`)."""
    cfg = model.cfg
    T = check_n_loops(n_loops, model.cfg.default_loops)
    run_kwargs = {k: v for k, v in options.items() if v is not None}
    with model._options(**run_kwargs):  # checks them before any compute
        pass
    if corrupt is not None:
        single_loop(model, "corrupt= (activation patching)")
    position = integer(position, "position")
    seed = check_seed(seed)
    if threshold is not None:
        finite_number(threshold, "threshold")
    start = {"seed": seed} if model.random_start else {}  # a family without a random start refuses seed=
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"the model's weights hold NaN or infinite values in {bad[:8]}{' ...' if len(bad) > 8 else ''}: "
                         "its activations (and every analysis of them) would not be finite; check the checkpoint")
    if isinstance(prompts, torch.Tensor):
        if prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool or prompts.ndim not in (1, 2):
            raise ValueError(f"token prompts must be integer ids [pos] or [batch, pos], got {prompts.dtype} "
                             f"of shape {tuple(prompts.shape)}")
        tokens = prompts if prompts.ndim == 2 else prompts[None]
        if tokens.numel() == 0:
            raise ValueError(f"token prompts are empty (shape {tuple(tokens.shape)})")
        mask = torch.ones_like(tokens)
        prompt_text = [" ".join(map(str, row.tolist())) for row in tokens]
    else:
        prompt_text = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_text:
            raise ValueError("no prompts given")
        wrong = [i for i, p in enumerate(prompt_text) if not isinstance(p, str)]
        if wrong:
            raise ValueError(f"prompts must be strings; prompt {wrong[0]} is {type(prompt_text[wrong[0]]).__name__}")
        tokens, mask = model.tokenize(prompt_text)
    length0 = int(mask[0].sum())
    if not -length0 <= position < length0:
        raise ValueError(f"position {position} is outside prompt 0, which has {length0} tokens "
                         f"(use {-length0} .. {length0 - 1})")
    pos = position if position >= 0 else length0 + position
    generate = integer(generate, "generate")
    if generate < 0:
        raise ValueError(f"generate must be >= 0 tokens, got {generate}")
    corrupt_tokens = None
    if corrupt is not None:
        if isinstance(prompts, torch.Tensor) or not isinstance(corrupt, str):
            raise ValueError("corrupt= takes a text prompt, with text prompts")
        corrupt_tokens, corrupt_mask = model.tokenize([corrupt])
        if int(corrupt_mask.sum()) != length0:
            raise ValueError(f"the corrupted prompt has {int(corrupt_mask.sum())} tokens, prompt 0 has {length0}: "
                             "patching needs the same length")
    steps_bar = tqdm(total=7, desc="report", disable=not progress)
    with torch.no_grad():
        hooks = REPORT_HOOKS + tuple(model.report_hooks)
        logits, cache = model.run_with_cache(tokens, n_loops=T, attention_mask=mask, **start,
                                             names_filter=lambda n: n.endswith(hooks), **run_kwargs)
    steps_bar.update()
    m = mask if not bool(mask.all()) else None
    steps = step_sizes(cache, mask=m)
    fp = fixed_points(cache, mask=m)
    sim = cyclic_similarity(cache, mask=m)
    steps_bar.update()
    heads = model.report_heads_refusal is None
    stab = attention_stability(model, cache, tokens, mask=m) if heads else None
    table = stab.table(tol=stabilisation_tol) if heads else None
    steps_bar.update()
    # models with a coda (or a norm between loop and coda) read their states through it: the coda lens
    lens_name = "coda" if cfg.n_coda or cfg.norm_after_loop else "logit"
    lens = logit_lens(model, cache, mask=m, lens=lens_name, positions=[pos])  # the page shows one position
    probs = torch.softmax(logits[0, pos].float(), dim=-1)
    answer_id, answer_prob = int(probs.argmax()), float(probs.max())
    steps_bar.update()
    traj = pca_trajectory(cache, position=pos, batch=0)
    steps_bar.update()
    str_tokens = model.to_str_tokens(tokens[0, :length0]) if model.tokenizer is not None else [str(t) for t in tokens[0, :length0].tolist()]
    view, view_note = _attention_view(cache, str_tokens, length0) if heads else (None, "")
    conv = steps.convergence_iteration(convergence_tol)
    meta = {
        "command": command or "(Python) loop_lens.report.build_report",
        "model": model_name or cfg.model_name,
        "family": cfg.family,
        "layout": f"{cfg.layout}  (run with n_loops = {T}"
                  + "".join(f", {k} = {v}" for k, v in cache.options.items()) + ")",
        "prompts": " | ".join(prompt_text)[:2000],
        "seed": seed if start else "none (the model has no random start state)",
        "loop_lens": package_version("loop-lens"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "iterations": "counted from 0 (the paper counts from 1)",
        "prediction": f"prompt 0, position {pos}: {_token_text(model, answer_id)!r} (p = {answer_prob:.3f}) after {T} iterations",
    }
    block = parts()
    report = Report(meta)
    extra: dict[str, Any] = {}
    stack = model.report_stack_label  # which stack the sections below read, where a family has more than one
    report.sections.append(("Layout", block.layout(cfg, T, model._describe_layout(T, cache.options))))
    conv_text = ", ".join(f"layer {i}: {'never' if c < 0 else c}" for i, c in enumerate(conv.max(dim=1).values.tolist()))
    report.sections.append((f"{stack}Convergence of each block layer", figure_html(steps.plot()) + block.note(
        "Relative step ||X_t - X_(t-1)|| / ||X_t|| per layer (mean over prompts). Convergence iteration (relative "
        f"step stays below {convergence_tol:g}): {conv_text}.")))
    extra.update(model._report_sections(report, cache, tokens, m, stabilisation_tol, convergence_tol))
    report.sections.append((f"{stack}Fixed-point cosine matrix", figure_html(fp.plot_layer_cosine()) + block.note(
        f"cos(X*_i, X*_j) with X* = the last iteration; min = {fp.min_layer_cosine:.4f} "
        f"({'degenerate: one shared point' if fp.degenerate() else 'distinct fixed points per layer'}).")))
    report.sections.append((f"{stack}Cyclic similarity of residual streams", figure_html(sim.plot())))
    if heads:
        report.sections.append((f"{stack}Head stability", _table_html(table, "ll-head-table", sortable=True) + block.note(
            "Click a column to sort. Stabilisation iteration: first t after which the Frobenius change of the pattern "
            f"stays below {stabilisation_tol:g} (median over prompts; – = never). Head type, concentration (ColSum), "
            "sink score and mixing at the last iteration. kappa = ||W_Q W_K^T||_2, the constant of the paper's bound "
            "tying pattern change to the residual step.")))
        report.sections.append((f"{stack}Attention per head and iteration", view.html(include_bundle=False)
                                + (block.note(view_note) if view_note else "")))
    else:
        report.sections.append((f"{stack}Head stability", block.note(
            f"Not computed for this model: {model.report_heads_refusal}")))
    report.sections.append((f"{stack}{lens_name.capitalize()} lens at position {pos}", block.note(
        f"The model predicts {_token_text(model, answer_id)!r} (p = {answer_prob:.3f}) at position {pos} after {T} "
        f"iterations. Each cell reads one (iteration, layer) output through the {lens_name} lens"
        + (" (the rest of the network: post-loop norm, coda, final norm, unembedding)." if lens_name == "coda" else
           " (final norm and unembedding).")) + figure_html(lens.plot(position=pos)) + _table_html(lens.grid(position=pos), index="")))
    report.sections.append((f"{stack}PCA trajectory of position {pos}", figure_html(traj.plot(dims=2))))
    if corrupt_tokens is not None:
        patched = _patching_section(model, tokens[:1, :length0], corrupt_tokens, T, seed)
        report.sections.append(("Activation patching: where is the answer decided?", figure_html(patched.result.plot()) +
                                block.note(patched.note) + _table_html(patched.result.top(10), index="")))
        extra["patching"] = {"metric": patched.note, "site": "resid_post", "normalized": patched.result.values}
    if generate:
        gen = model.generate(tokens[:1, :length0], max_new_tokens=generate, n_loops=T, **start, adaptive=adaptive,
                             threshold=threshold, return_type="result", verbose=False, stop_at_eos=False, **run_kwargs)
        report.sections.append(("Compute per generated token", figure_html(gen.plot()) + block.note(
            f"{generate} tokens generated after prompt 0; mean {gen.mean_iterations:.2f} iterations per token "
            f"(at most {T}{f', adaptive exit {adaptive!r} at {threshold:g}' if adaptive else ''}).")
            + _table_html(gen.to_frame(), index="")))
        extra["generation"] = {"tokens": gen.generated[0], "iterations": gen.iterations[0], "adaptive": adaptive,
                                        "threshold": threshold}
    steps_bar.update(2)
    steps_bar.close()
    report.numbers = {
        "step_sizes": {"relative": steps.relative.mean(-1), "convergence_iteration": conv},
        "fixed_point_cosine": fp.layer_cosine,
        **({"head_stability": table.to_dict(orient="records"), "sink_rate": stab.sink_rate()} if heads else {}),
        "prediction": {"position": pos, "token_id": answer_id, "token": _token_text(model, answer_id), "prob": answer_prob},
        "lens": lens_name,
        "lens_top1": lens.top_ids[:, :, 0, 0, 0],  # the lens read position `pos` only
        "lens_top1_prob": lens.top_probs[:, :, 0, 0, 0],
        "trajectory": traj.coords,
        **extra,
    }
    return report


def _token_text(model: Any, token_id: int) -> str:
    """A token's text (its id when the model has no tokenizer)."""
    return model.to_str_tokens([token_id])[0] if model.tokenizer is not None else str(token_id)


class _Patched(NamedTuple):
    result: Any
    note: str


def _patching_section(model: Any, clean: Tensor, corrupt: Tensor, T: int, seed: int) -> _Patched:
    """Normalised activation patching of the residual stream, metric = logit(clean answer) -
    logit(corrupted answer) at the last position."""
    with torch.no_grad():
        a = int(model(clean, n_loops=T, seed=seed)[0, -1].argmax())
        b = int(model(corrupt, n_loops=T, seed=seed)[0, -1].argmax())
    if a == b:
        raise ValueError(f"the clean and corrupted prompts both answer {_token_text(model, a)!r}: no difference to patch")

    def metric(logits: Tensor) -> Tensor:
        return (logits[..., -1, a] - logits[..., -1, b]).mean()

    result = activation_patch(model, clean, corrupt, metric, site="resid_post", n_loops=T, seed=seed).normalized()
    note = (f"metric: logit({_token_text(model, a)!r}) - logit({_token_text(model, b)!r}) at the last position; 1 = the "
            "clean run's value, 0 = the corrupted run's. Each cell puts one (iteration, layer, position) output of the "
            "clean run into the corrupted run.")
    return _Patched(result, note)
