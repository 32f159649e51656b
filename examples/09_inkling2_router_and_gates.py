# %% [markdown]
# # Inkling 2: do later passes route like the first? How open are the message gates?
#
# Inkling 2 runs its loop layers several times; passes after the first restart from the prelude's
# output and hear the previous pass only through gated *messages*. Every loop layer has a
# sigmoid-routed mixture of experts, so each pass picks experts per token. Here, on a random tiny
# Inkling built with transformers (its zero-initialised queries and gates randomised, so nothing is
# uniform), we hook every pass, measure how much the routing of passes 1, 2, ... overlaps with
# pass 0, and how open the message gates are. Every claim is an `assert` on numbers computed here.

# %%
import torch
from transformers import Inkling2LoopForCausalLM, Inkling2LoopTextConfig

import loop_lens as ll
from loop_lens.families import inkling2 as ink

torch.manual_seed(0)
config = Inkling2LoopTextConfig(
    vocab_size=64, unpadded_vocab_size=60, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
    sliding_window_size=4, d_rel=4, rel_extent=8, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
    n_layers_per_attn_res_block=2, loop_layer_index_start=2, loop_layer_index_end=4, loop_num_passes=4,
    loop_gate_rank=8, conv_kernel_size=3, layer_types=["hybrid_sliding", "hybrid"] * 3, eos_token_id=None,
)
config._attn_implementation, config._experts_implementation = "eager", "eager"
reference = Inkling2LoopForCausalLM(config).eval()
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in reference.named_parameters():
        if name.endswith("query") or "gate_proj" in name:  # zero-initialised queries, and the message gates
            p.copy_(torch.randn(p.shape, generator=g) / (1 if name.endswith("query") else p.shape[-1] ** 0.5))
model = ll.from_hf(reference)
tokens = torch.randint(0, 60, (2, 12), generator=g)

# %% [markdown]
# The hooked model computes what transformers computes, at the default 4 passes and at any other.

# %%
with torch.no_grad():
    want = reference(tokens, use_cache=False).logits
got = model(tokens)
assert ll.testing.close(got, want, rtol=1e-4, atol=1e-4)
print(model.cfg.layout, "passes:", model.cfg.default_loops)

# %% [markdown]
# ## Router stabilisation
#
# `router_stability` reads `iter.{t}.blocks.{l}.mlp.hook_experts` and `mlp.hook_router_logits`:
# per pass, loop layer and token, the share of pass 0's experts chosen again, and the entropy of
# the router's normalised sigmoid scores.

# %%
_, cache = model.run_with_cache(tokens, n_loops=4, names_filter=lambda n: ".mlp.hook_" in n or ".gate_" in n)
stability = ink.router_stability(cache)
print(stability.mean_overlap())
assert torch.equal(stability.overlap[0], torch.ones_like(stability.overlap[0]))  # pass 0 against itself
assert bool((stability.overlap >= 0).all() and (stability.overlap <= 1).all())
assert float(stability.entropy.max()) <= torch.log(torch.tensor(8.0)) + 1e-5
stability.to_frame().head()

# %%
stability.plot()

# %% [markdown]
# ## Message gates
#
# In pass t >= 1 each loop layer mixes a message into its q, k, v and MLP inputs as
# `(1 - tanh(W_f z)) x + tanh(W_m z) m`. `message_gates` averages `|tanh(W_m z)|` (how much
# message enters) and `1 - tanh(W_f z)` (how much of the pass's own input stays).

# %%
gates = ink.message_gates(cache)
print(gates.to_frame())
assert gates.gate.shape == (3, model.cfg.n_block, 4)
assert bool((gates.gate > 0).all()), "randomised gates are open"
gates.plot()

# %% [markdown]
# Close every gate (both tanh outputs set to 0 by hooks): then each later pass receives exactly
# pass 0's inputs, computes pass 0 again, and routes exactly like it.

# %%
def closed(activation, hook):
    return torch.zeros_like(activation)


gate_names = lambda n: ".gate_" in n  # noqa: E731
model.add_hook(gate_names, closed)
_, shut = model.run_with_cache(tokens, n_loops=4, names_filter=lambda n: ".mlp.hook_" in n or n.endswith("hook_resid_post"))
model.reset_hooks()
assert torch.equal(ink.router_stability(shut).overlap, torch.ones_like(stability.overlap))
for t in range(1, 4):
    assert ll.testing.close(shut[f"iter.{t}.blocks.1.hook_resid_post"], shut["iter.0.blocks.1.hook_resid_post"])
print("closed gates: every pass routes like pass 0")
