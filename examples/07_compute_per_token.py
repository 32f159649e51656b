# %% [markdown]
# # How much recurrence does each generated token get? `zoo:khop-huginn`
#
# `model.generate` runs the loop for every new token with a KV cache per (iteration, layer). With
# `adaptive=` each token stops iterating once an exit criterion holds (here: the KL divergence
# between successive iterations' next-token distributions drops below a threshold, as Huginn's
# reference sampler does). The result records the iterations each token used. Every claim is an
# `assert` on numbers computed here.

# %%
import torch

import loop_lens as ll
from loop_lens.zoo.task import follow

model = ll.load("zoo:khop-huginn")
pairs = "b f e j i c f a j i h d a e c g d b g h"
prompt = f"{pairs} | f 2 ="
T, SEED = 8, 0
assert follow(pairs, "f", 2) == "e"

# %% [markdown]
# Greedy generation at a fixed T: the KV-cached run gives exactly the tokens of recomputing the
# whole sequence at every step, and its first token is the forward pass's answer.

# %%
fixed = model.generate(prompt, max_new_tokens=4, n_loops=T, seed=SEED, return_type="result", verbose=False,
                       stop_at_eos=False)
again = model.generate(prompt, max_new_tokens=4, n_loops=T, seed=SEED, return_type="result", verbose=False,
                       stop_at_eos=False, use_past_kv_cache=False)
assert torch.equal(fixed.tokens, again.tokens)
assert int(fixed.generated[0, 0]) == int(model(prompt, n_loops=T, seed=SEED)[0, -1].argmax())
assert model.to_str_tokens(fixed.generated[0, :1]) == ["e"]
assert (fixed.iterations == T).all()  # no exit criterion: every token gets all T iterations

# %% [markdown]
# Adaptive compute: the same answer with fewer iterations for most tokens.

# %%
adaptive = model.generate(prompt, max_new_tokens=4, n_loops=T, seed=SEED, adaptive="kl", threshold=1e-2,
                          return_type="result", verbose=False, stop_at_eos=False)
print(adaptive.to_frame())
assert int(adaptive.generated[0, 0]) == int(fixed.generated[0, 0])  # the answer survives early exit
assert ((adaptive.iterations >= 1) & (adaptive.iterations <= T)).all()
assert adaptive.mean_iterations < T
adaptive.plot()
