# %% [markdown]
# # Fixed points: does each block layer settle, and where?
#
# 64 iterations of `zoo:khop-huginn` on held-out 1- and 2-hop prompts, caching only the block
# layers' outputs.

# %%
import torch

import loop_lens as ll
from loop_lens import analysis as A
from loop_lens.zoo.task import sample

model = ll.load("zoo:khop-huginn")
batch = sample(8, [1, 2], torch.Generator().manual_seed(0), split="heldout")
T = 64
_, cache = model.run_with_cache(batch.tokens, n_loops=T, seed=0, names_filter=lambda n: n.endswith("hook_resid_post"))

# %% [markdown]
# The relative step `||X_t - X_{t-1}|| / ||X_t||` of each block layer: every layer of every prompt
# falls below 1e-3 and stays there (`convergence_iteration` is -1 where it never does).

# %%
steps = A.step_sizes(cache)
settle = steps.convergence_iteration(1e-3)  # [layer, batch]
print("iteration after which the step stays below 1e-3, per layer (worst prompt):", settle.max(1).values.tolist())
assert (settle >= 0).all()
steps.plot(by="layer")

# %% [markdown]
# The layers settle to distinct points, not one degenerate point: the smallest cosine between two
# layers' fixed points is below 1 - 1e-3.

# %%
fp = A.fixed_points(cache)
print("min cos between layer fixed points:", round(fp.min_layer_cosine, 4), "degenerate:", fp.degenerate())
assert not fp.degenerate()
fp.plot_layer_cosine()

# %% [markdown]
# Cosine similarity between every pair of unrolled depths (iteration, layer). Once the steps have
# settled, the pattern repeats with the period of the block: each layer's state matches its state
# one iteration later, while the two layers' states stay apart.

# %%
cyclic = A.cyclic_similarity(cache)
L, settled = model.cfg.n_block, int(settle.max())
assert cyclic.matrix.shape == (T * L, T * L) and len(cyclic.labels) == T * L
same_layer = torch.stack([cyclic.matrix[t * L + l, (t + 1) * L + l] for t in range(settled, T - 1) for l in range(L)])
other_layer = torch.stack([cyclic.matrix[t * L, t * L + 1] for t in range(settled, T)])  # layer 0 against layer 1
print(f"after iteration {settled}: same layer one iteration apart >= {same_layer.min():.4f}, layer 0 vs 1 <= {other_layer.max():.4f}")
assert same_layer.min() > 0.999 and other_layer.max() < 0.99
cyclic.plot()

# %% [markdown]
# Each token's trajectory classified as fixed point, orbit or slider (Geiping et al. 2025). Every
# layer converged above, so every token should be a fixed point.

# %%
classes = A.classify_tokens(cache)
counts = classes.counts()
print(counts.to_dict())
assert counts["fixed_point"] == batch.tokens.numel() == counts.sum()
counts  # noqa: B018 - the cell's last value is what the notebook shows

# %% [markdown]
# The path of one token's state on its top principal components.

# %%
trajectory = A.pca_trajectory(cache, position=-2)
ratio = trajectory.explained_variance_ratio
print("explained variance ratio:", ratio.tolist())
assert (ratio[:-1] >= ratio[1:]).all() and ratio.sum() <= 1 + 1e-6
trajectory.plot(dims=2)

# %% [markdown]
# The paper's random-init experiment (section 4.2) in small: three norm styles, with and without
# input injection, one seed (`docs/random-init-sweep.md` has the full run). Pre-norm blocks with
# injection converge; Ouro-style blocks (sandwich norms, a norm after every iteration) never do.

# %%
sweep = A.random_init_sweep(seeds=(0,), n_loops=64, progress=False)
summary = sweep.summary().set_index(["style", "injection"])
print(summary.to_string())
assert summary.loc[("pre-norm", True), "converged"] == summary.loc[("pre-norm", True), "runs"]
assert (summary.xs("ouro", level="style")["converged"] == 0).all()
sweep.plot()
