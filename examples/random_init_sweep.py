"""The paper's section 4.2 experiment: do randomly initialised looped blocks reach fixed points?

    python examples/random_init_sweep.py            # 3 norm styles x injection on/off x 3 seeds, T = 128

Prints one row per run and a summary per (style, injection); see docs/random-init-sweep.md.
"""

from __future__ import annotations

import time

import pandas as pd

from loop_lens.analysis.sweeps import random_init_sweep


def main() -> None:
    start = time.time()
    result = random_init_sweep(n_loops=128, seeds=(0, 1, 2), tol=1e-3)
    pd.set_option("display.width", 200)
    pd.set_option("display.float_format", lambda v: f"{v:.3g}")
    print(result.frame.to_string(index=False))
    print()
    print(result.summary().to_string(index=False))
    print(f"\n{len(result.frame)} runs in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
