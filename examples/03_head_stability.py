# %% [markdown]
# # Which attention heads stop changing, and when?

# %%
import torch

import loop_lens as ll
from loop_lens import analysis as A
from loop_lens.zoo.task import sample

model = ll.load("zoo:khop-huginn")
batch = sample(8, [2], torch.Generator().manual_seed(0), split="heldout")
T = 16
_, cache = model.run_with_cache(batch.tokens, n_loops=T, seed=0)

# %% [markdown]
# One row per head: the iteration after which its pattern stops changing (Frobenius change below
# the tolerance), its type, ColSum concentration and sink score at the last iteration.

# %%
stab = A.attention_stability(model, cache, batch.tokens)
table = stab.table(tol=1e-2).sort_values("stabilisation_iteration")
assert len(table) == model.cfg.n_block * model.cfg.n_heads
table  # noqa: B018 - the cell's last value is what the notebook shows

# %%
stab.plot("change_frobenius")

# %% [markdown]
# The share of heads (and prompts) whose queries put, on average, at least 30% of their attention
# on the first token, per (iteration, layer); recomputed here from the cached patterns.

# %%
sinks = stab.sink_rate(threshold=0.3)
patterns = cache.stack("attn.hook_pattern")  # [n_loops, n_block, batch, head, query, key]
assert torch.equal(sinks, (patterns[..., 0].mean(-1) >= 0.3).float().mean((-2, -1)))
sinks[:6]

# %% [markdown]
# Attention of every head, with a slider over iterations. It renders offline: circuitsvis's
# bundle is inlined, no script is fetched.

# %%
view = ll.viz.attention(cache, model.to_str_tokens(batch.tokens[0]))
assert "<script src" not in view._repr_html_()
view  # noqa: B018 - the cell's last value is what the notebook shows

# %% [markdown]
# The same numbers without a cache: the streaming analyses reduce each iteration inside the hooks
# and keep only the previous one, so their memory does not grow with T.

# %%
streamed = A.streaming.stream_analyses(model, batch.tokens, n_loops=T, seed=0)
assert ll.testing.close(streamed.attention.concentration, stab.concentration)
assert ll.testing.close(streamed.attention.change_frobenius, stab.change_frobenius, equal_nan=True)  # NaN at iteration 0
assert ll.testing.close(streamed.steps.relative, A.step_sizes(cache).relative, equal_nan=True)
