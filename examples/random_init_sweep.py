"""The paper's section 4.2 experiment: do randomly initialised looped blocks reach fixed points?

    python examples/random_init_sweep.py                   # 3 norm styles x injection on/off x 3 seeds, T = 128
    python examples/random_init_sweep.py --embed-scale 8   # embeddings times sqrt(d_model), as Huginn scales them
    python examples/random_init_sweep.py --seeds 0 --loops 32      # a quick look

Prints one row per run and a summary per (style, injection); see docs/random-init-sweep.md.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from loop_lens.analysis.sweeps import ADAPTER_INITS, INITS, STARTS, random_init_sweep


def main() -> None:
    """Run the sweep under the conditions given on the command line; print its table and summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embed-scale", type=float, default=1.0, help="factor on the embeddings (Huginn: sqrt(d_model) = 8)")
    parser.add_argument("--init", choices=INITS, default="default", help="weight initialisation")
    parser.add_argument("--adapter-init", choices=ADAPTER_INITS, default=None, help="override the adapter's init")
    parser.add_argument("--start", choices=STARTS, default="zeros", help="state entering iteration 0 with injection")
    parser.add_argument("--loops", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    start = time.time()
    result = random_init_sweep(n_loops=args.loops, seeds=tuple(args.seeds), tol=1e-3, embed_scale=args.embed_scale, init=args.init,
                               adapter_init=args.adapter_init, start=args.start)
    pd.set_option("display.width", 220)
    pd.set_option("display.float_format", lambda v: f"{v:.3g}")
    print(result.frame.to_string(index=False))
    print()
    print(result.summary().to_string(index=False))
    print(f"\n{len(result.frame)} runs in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
