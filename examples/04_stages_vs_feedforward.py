# %% [markdown]
# # Stages of inference against a feedforward baseline
#
# `zoo:khop-ouro` `(0, 2 x 4, 0)` and `zoo:khop-ff` (8 layers, the same depth unrolled) were trained
# on the same task.

# %%
import torch

import loop_lens as ll
from loop_lens import analysis as A
from loop_lens.zoo.task import ANSWER_FROM, sample

looped, ff = ll.load("zoo:khop-ouro"), ll.load("zoo:khop-ff")
batch = sample(16, [2], torch.Generator().manual_seed(0), split="heldout")
T = looped.cfg.default_loops
_, c_loop = looped.run_with_cache(batch.tokens, n_loops=T)
_, c_ff = ff.run_with_cache(batch.tokens)

# %% [markdown]
# ColSum concentration and residual norm by depth, the looped model's iterations against the
# feedforward model's layers.

# %%
profile = A.depth_profile(c_loop, baseline_cache=c_ff)
depths = profile.to_frame().groupby("model").size()
assert depths["looped"] == depths["feedforward"] == T * looped.cfg.n_block
profile.plot("concentration")

# %%
profile.plot("resid_norm")

# %% [markdown]
# Logit lens at the first answer position: where does the answer appear? The lens at the last
# (iteration, layer) is the model's own last-iteration output, and the model answers every
# prompt right, so the lens's target there is the answer.

# %%
lens = A.logit_lens(looped, c_loop)
pos = ANSWER_FROM[0]
last_step = looped(batch.tokens, n_loops=T, exit=T - 1)
assert torch.equal(lens.top_ids[-1, -1, :, :, 0], last_step.argmax(-1))
assert torch.equal(lens.targets[:, pos], batch.answers[:, 0])
print("(iteration, layer) where the answer enters the top 1:", lens.entry_point(k=1)[:4, pos].tolist())
lens.grid(position=pos)

# %%
ll.viz.logit_lens_grid(lens, position=pos)

# %% [markdown]
# Ouro's exit gate: the exit distribution over iterations (it sums to 1 at every position),
# averaged over the answer positions.

# %%
gates = c_loop.stack("hook_exit_logit")  # [n_loops, batch, pos]
exit_p = looped.exit_distribution(gates)
assert ll.testing.close(exit_p.sum(0), torch.ones_like(exit_p[0]))
exit_p[:, :, ANSWER_FROM].mean((1, 2))
