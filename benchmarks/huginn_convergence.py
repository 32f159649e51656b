"""Which condition decides whether random-init Huginn-style blocks with injection converge?

    python benchmarks/huginn_convergence.py          # CPU, one thread: 565 s on a shared 2-core machine

Starts from the sweep's documented settings (`random_init_sweep`: d_model 64, 4 layers, weights
N(0, 0.02), embedding scale 1, adapter near [I | I] / sqrt 2, state starting at zero, T = 128,
tolerance 1e-3, fp32) and changes one condition per row; the last rows combine Huginn's reference
choices (its initialisation, adapter, embedding scale and start state). Prints one line per
condition over seeds 0, 1, 2; the table in docs/random-init-sweep.md is this output.
"""

from __future__ import annotations

import math
import time

import pandas as pd
import torch

from loop_lens.analysis.sweeps import random_init_sweep

D = 64
HUGINN = dict(init="huginn", embed_scale=math.sqrt(D), start="trunc_normal")  # the reference's adapter: "normal"
CONDITIONS: list[tuple[str, dict]] = [
    ("sweep defaults", {}),
    ("T = 512", dict(n_loops=512)),
    ("tolerance 5e-3", dict(tol=5e-3)),
    ("model in float64", dict(dtype=torch.float64)),
    ("start: Huginn truncated normal", dict(start="trunc_normal")),
    ("embed_scale 2", dict(embed_scale=2.0)),
    ("embed_scale 4", dict(embed_scale=4.0)),
    ("embed_scale sqrt(d) = 8 (Huginn)", dict(embed_scale=math.sqrt(D))),
    ("default init at std sqrt(2/(5d))", dict(init_std=math.sqrt(2 / (5 * D)))),
    ("Huginn weights, identity adapter", dict(init="huginn", adapter_init="identity")),
    ("adapter N(0, 0.02) like the weights", dict(adapter_init="normal")),
    ("Huginn weights and adapter", dict(init="huginn")),
    ("Huginn: init, embed_scale, start", HUGINN),
    ("Huginn: init, embed_scale, start, T 512", dict(HUGINN, n_loops=512)),
    ("Huginn but identity adapter", dict(HUGINN, adapter_init="identity")),
]


def measure(overrides: dict, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """One condition over `seeds`: Huginn-style blocks with injection, summarised in one row."""
    frame = random_init_sweep(styles=("huginn",), injections=(True,), seeds=seeds, progress=False, **overrides).frame
    iters = ["-" if pd.isna(v) else str(int(v)) for v in frame["convergence_iter"]]
    return {
        "converged": f"{int(frame['converged'].sum())}/{len(frame)}",
        "conv_iter": " ".join(iters),
        "final_rel_step": f"{frame['final_rel_step'].min():.1e}..{frame['final_rel_step'].max():.1e}",
        "token_max": f"{frame['final_token_rel_step'].max():.1e}",
        "late_rate": f"{frame['late_rate'].median():.3f}",
        "embed/state": f"{frame['embed_to_state'].median():.3f}",
        "min_layer_cos": f"{frame['min_layer_cos'].min():.4f}",
    }


def main() -> None:
    torch.set_num_threads(1)
    start = time.time()
    rows = [{"condition": name, **measure(overrides)} for name, overrides in CONDITIONS]
    pd.set_option("display.width", 200)
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"\n{len(rows) * 3} runs in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
