"""Write `zoo:tiny-random`: a randomly initialised Huginn-style (1, 2 x 4, 1) model (seed 0).

It is the embedded default until trained zoo models ship: `python -m loop_lens.zoo.make_random`.
"""

from __future__ import annotations

import json

import torch

from loop_lens.config import LoopConfig
from loop_lens.model.init import init_weights
from loop_lens.model.looped import HookedLoopedTransformer
from loop_lens.zoo import MODELS_DIR
from loop_lens.zoo.task import make_tokenizer

CONFIG = LoopConfig(
    family="native", model_name="tiny-random", d_model=64, n_heads=4, d_mlp=128, d_vocab=64,
    n_prelude=1, n_block=2, n_coda=1, default_loops=4, n_ctx=128, norm_placement="sandwich_resid",
    rope_style="adjacent", injection="linear", initial_state="trunc_normal", init_std=0.079,
    norm_after_loop=True, tie_embeddings=True,
)


def main() -> None:
    torch.manual_seed(0)
    model = HookedLoopedTransformer(CONFIG, tokenizer=make_tokenizer())
    init_weights(model, seed=0)
    out = model.save(MODELS_DIR / "tiny-random")
    card = {
        "name": "tiny-random", "layout": CONFIG.layout, "trained": False,
        "description": "random Huginn-style weights (seed 0), the k-hop task's character tokenizer; for smoke tests and demos",
        "command": "python -m loop_lens.zoo.make_random",
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
