"""Glue for other interpretability libraries (docs/interop.md).

- TransformerLens's own tools and SAELens: `model.unrolled(n_loops=T)` (loop_lens.model.unrolled).
- nnsight: `loop_lens.interop.nnsight(model, n_loops=T)`.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

NNSIGHT_ALIAS = "loops"


def nnsight(model: Any, n_loops: Optional[int] = None, **kwargs: Any) -> Any:
    """`nnsight.NNsight(model)` for a looped model, ready to read and set every iteration.

    nnsight walks the module tree once, when it wraps the model, and reads a module's output
    only if that module runs. loop_lens creates an iteration's hook points only while something
    is hooked there, so this first pins iterations 0..n_loops-1 (`model.pin_loops(n_loops)`,
    default `cfg.default_loops`); a trace may then run up to that many iterations. nnsight serves
    `.iter` on every module itself, so the model's `iter` container is reached as `.loops`
    (nnsight's own fallback name `.E_iter` works too):

        nm = ll.interop.nnsight(model, n_loops=6)
        with nm.trace(tokens, n_loops=6):
            h = nm.loops["3"].blocks[1].hook_resid_post.output.save()

    `kwargs` go to `NNsight` (a `rename=` of your own is merged with ours)."""
    from nnsight import NNsight

    model.pin_loops(n_loops)
    rename = {"E_iter": NNSIGHT_ALIAS, **kwargs.pop("rename", {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Module .* has a submodule named 'iter'")
        return NNsight(model, rename=rename, **kwargs)
