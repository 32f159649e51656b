"""Write `zoo:tiny-random`: a randomly initialised Huginn-style (1, 2 x 4, 1) model (seed 0).

The shipped copy is rewritten from the repository root with the card's `COMMAND`; the output
directory is always given, so nothing is written into the installed package by default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from loop_lens.config import LoopConfig
from loop_lens.model.init import init_weights
from loop_lens.model.looped import HookedLoopedTransformer
from loop_lens.zoo.task import make_tokenizer

CONFIG = LoopConfig(
    family="native", model_name="tiny-random", d_model=64, n_heads=4, d_mlp=128, d_vocab=64,
    n_prelude=1, n_block=2, n_coda=1, default_loops=4, n_ctx=128, norm_placement="sandwich_resid",
    rope_style="adjacent", injection="linear", initial_state="trunc_normal", init_std=0.079,
    norm_after_loop=True, tie_embeddings=True,
)
COMMAND = "python -m loop_lens.zoo.make_random --out loop_lens/zoo/models/tiny-random --overwrite"


def write(out: Path, overwrite: bool = False) -> Path:
    """Build the seeded model and save it with its card into `out` (`overwrite`: replace what is there)."""
    torch.manual_seed(0)
    model = HookedLoopedTransformer(CONFIG, tokenizer=make_tokenizer())
    init_weights(model, seed=0)
    path = model.save(out, overwrite=overwrite)
    card = {
        "name": "tiny-random", "layout": CONFIG.layout, "trained": False,
        "description": "random Huginn-style weights (seed 0), the k-hop task's character tokenizer; for smoke tests and demos",
        "command": COMMAND,
    }
    (path / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return path


def main(argv: Optional[list[str]] = None) -> Path:
    """Command line: `--out DIR` (required), `--overwrite`."""
    parser = argparse.ArgumentParser(description="Write the zoo's tiny-random model and its card.")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (the shipped copy: loop_lens/zoo/models/tiny-random)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier copy in DIR, its card included")
    args = parser.parse_args(argv)
    path = write(args.out, overwrite=args.overwrite)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
