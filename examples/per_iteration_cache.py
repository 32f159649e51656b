"""Cache every iteration of a looped model and look at how the state settles.

    python examples/per_iteration_cache.py [MODEL]      (default: zoo:tiny-random)
"""

from __future__ import annotations

import sys

import torch

import loop_lens as ll

N_LOOPS = 16


def main(model_name: str = "zoo:tiny-random") -> None:
    """Print the relative step of the state between consecutive iterations."""
    model = ll.load(model_name)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, n_loops=N_LOOPS, seed=0, names_filter=lambda n: n.endswith(("hook_state_pre", "hook_state_post")))
    states = cache.stack("hook_state_post")  # [n_loops, batch, pos, d_model]
    assert states.shape == (N_LOOPS, *tokens.shape, model.cfg.d_model)
    for t in range(N_LOOPS - 1):  # the state leaving iteration t is the state entering t + 1
        assert torch.equal(cache[f"iter.{t}.hook_state_post"], cache[f"iter.{t + 1}.hook_state_pre"])
    steps = (states[1:] - states[:-1]).flatten(1).norm(dim=-1) / states[1:].flatten(1).norm(dim=-1)
    print(f"{model_name}: layout {model.cfg.layout}, run with {N_LOOPS} iterations")
    for t, step in enumerate(steps.tolist(), start=1):
        print(f"  iteration {t:2d}: relative step size {step:.3e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
