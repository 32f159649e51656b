# %% [markdown]
# # Quickstart: every iteration of a looped model, hooked
#
# `zoo:khop-huginn` is a tiny Huginn-style model `(1, 2 x T, 1)` trained in the package on a k-hop
# pointer task (`loop_lens.zoo.task`). Iterations count from 0. Every check below is an `assert`, so
# the notebook stops at the first claim that does not hold.

# %%
import torch

import loop_lens as ll
from loop_lens.zoo.task import ANSWER_FROM, answers_after, follow, sample

model = ll.load("zoo:khop-huginn")
print(model.cfg.layout, "-", ll.zoo.card("khop-huginn")["description"])
assert (model.cfg.n_prelude, model.cfg.n_block, model.cfg.n_coda) == (1, 2, 1)

# %% [markdown]
# A prompt lists ten `source target` pointers, then questions `| x k =`: where do you land after k
# hops from x? The model's character tokenizer reads the text back into the task's own tokens, and
# the answers in the batch are the ones you get by following the pointers by hand.

# %%
batch = sample(4, [2], torch.Generator().manual_seed(0), split="heldout")
text = batch.text(0)
print(text)
print(model.to_str_tokens(batch.tokens[0])[:8])
assert torch.equal(model.to_tokens(text)[0], batch.tokens[0])
words = text.split()
pairs, start, hops, answer = " ".join(words[:20]), words[21], int(words[22]), words[24]
assert follow(pairs, start, hops) == answer

# %% [markdown]
# One run caches every iteration: hook names carry the iteration, and `cache.stack` gathers a kind
# over iterations and block layers. Caching does not change the output.

# %%
n_loops = 8
logits, cache = model.run_with_cache(batch.tokens, n_loops=n_loops, seed=0)
pred = logits[:, ANSWER_FROM].argmax(-1)
print("accuracy on all four questions:", (pred == batch.answers).float().mean().item())
pattern = cache["iter.3.blocks.1.attn.hook_pattern"]  # [batch, head, query, key] at iteration 3
resid = cache.stack("hook_resid_post")  # [n_loops, n_block, batch, pos, d_model]
print(pattern.shape, resid.shape)
n_prompts, pos = batch.tokens.shape
assert pattern.shape == (n_prompts, model.cfg.n_heads, pos, pos)
assert resid.shape == (n_loops, model.cfg.n_block, n_prompts, pos, model.cfg.d_model)
assert torch.equal(resid[3, 1], cache["iter.3.blocks.1.hook_resid_post"])
assert ll.testing.close(logits, model(batch.tokens, n_loops=n_loops, seed=0))

# %% [markdown]
# `ll.hook_name` builds hook names and `ll.parse_hook_name` reads them back.

# %%
name = ll.hook_name("pattern", layer=1, iteration=3)
print(name, ll.parse_hook_name(name))
print(model.loop_hook_names(0)[:6])
assert name in cache and ll.parse_hook_name(name).iteration == 3
assert all(n.startswith("iter.0.") for n in model.loop_hook_names(0))

# %% [markdown]
# Test-time compute: how often the first answer lands on the letter j hops from the start, as the
# number of loops grows, for 2 hops (trained: the model was trained on 1 and 2) and 3 hops (never
# trained on). `answers_after(tokens, j)` reads the letter j hops away from the prompt itself. Two
# hops need a second loop; on 3-hop questions the model stops after two hops and answers the 2-hop
# letter, however many loops it gets.

# %%
landed = {}
for k in (2, 3):
    questions = sample(128, [k], torch.Generator().manual_seed(1), split="heldout")
    for T in (1, 2, 4, 8):
        first = model(questions.tokens, n_loops=T, seed=0)[:, ANSWER_FROM[0]].argmax(-1)
        landed[k, T] = [(first == answers_after(questions.tokens, j)[:, 0]).float().mean().item() for j in (1, 2, 3)]
        print(f"k={k} T={T}  share landing j = 1, 2, 3 hops away:", [round(v, 3) for v in landed[k, T]])
assert landed[2, 1][1] < 0.5 and all(landed[2, T][1] > 0.9 for T in (2, 4, 8))
assert all(landed[3, T][1] > 0.9 for T in (2, 4, 8))

# %% [markdown]
# TransformerLens's own cache helpers work on the loop cache, over the unrolled depth (prelude,
# each iteration's block, coda), exactly as on the plain `ActivationCache` that `cache.unrolled()`
# returns: one entry per unrolled layer, then the final residual.

# %%
accum, labels = cache.accumulated_resid(return_labels=True)
print(accum.shape, labels[:4], labels[-1])
depth = model.cfg.n_prelude + n_loops * model.cfg.n_block + model.cfg.n_coda
assert len(labels) == accum.shape[0] == depth + 1
assert torch.equal(accum, cache.unrolled().accumulated_resid())
assert torch.equal(accum[-1], cache[f"coda.{model.cfg.n_coda - 1}.hook_resid_post"])
