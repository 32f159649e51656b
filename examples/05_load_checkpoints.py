# %% [markdown]
# # Loading Ouro / Huginn checkpoints from a local directory
#
# `ll.load(dir)` reads `config.json` and the weights (safetensors first, `pytorch_model.bin` with
# `weights_only=True` otherwise) and never runs the checkpoint's code. Here we write a tiny random
# checkpoint in Huginn's key layout ourselves, so the notebook needs no download.

# %%
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import loop_lens as ll
from loop_lens.analysis import coda_lens, logit_lens_of_states

D, H, I, V = 64, 4, 96, 128
g = torch.Generator().manual_seed(0)


def r(*shape: int) -> torch.Tensor:
    """Small random weights."""
    return torch.randn(*shape, generator=g) * 0.05


def block(prefix: str) -> dict[str, torch.Tensor]:
    """One Huginn block: four norms, fused QKV, output projection, gated MLP."""
    norms = {f"{prefix}norm_{i}.weight": torch.ones(D) for i in (1, 2, 3, 4)}
    return norms | {
        prefix + "attn.Wqkv.weight": r(3 * D, D), prefix + "attn.proj.weight": r(D, D),
        prefix + "mlp.fc.weight": r(2 * I, D), prefix + "mlp.proj.weight": r(D, I),
    }


tensors = {"transformer.wte.weight": r(V, D), "transformer.ln_f.weight": torch.ones(D), "transformer.adapter.weight": r(D, 2 * D)}
for name in ["prelude.0.", "core_block.0.", "core_block.1.", "coda.0."]:
    tensors.update(block("transformer." + name))
config = {
    "model_type": "huginn_raven", "n_embd": D, "n_heads": H, "intermediate_size": I, "vocab_size": V, "padded_vocab_size": V,
    "n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 2, "n_layers_in_coda": 1, "mean_recurrence": 8, "norm_eps": 1e-6,
    "rope_base": 50000.0, "qk_bias": False, "tie_embeddings": True, "injection_type": "linear",
    "init_values": {"std": 0.079, "embed_scale": 8.0},
}
workdir = tempfile.TemporaryDirectory()  # deleted when the kernel (or script) exits
ckpt = Path(workdir.name) / "huginn"
ckpt.mkdir()
save_file(tensors, str(ckpt / "model.safetensors"))
(ckpt / "config.json").write_text(json.dumps(config))

# %% [markdown]
# The family is detected from the tensor names (`norm_3`/`norm_4`: Huginn), the layout from the
# config.

# %%
model = ll.load(ckpt)
print(model.cfg.family, model.cfg.layout)
assert model.cfg.family == "huginn"
assert (model.cfg.n_prelude, model.cfg.n_block, model.cfg.n_coda) == (
    config["n_layers_in_prelude"], config["n_layers_in_recurrent_block"], config["n_layers_in_coda"]
)
assert model.cfg.default_loops == config["mean_recurrence"] and model.cfg.d_model == D

# %% [markdown]
# The initial state is random (truncated normal): pass `seed=` or an explicit `initial_state=`; the
# one used is at `iter.0.hook_state_pre`, and giving it back reproduces the run.

# %%
T = 32
tokens = torch.randint(0, V, (1, 10), generator=g)
_, cache = model.run_with_cache(tokens, n_loops=T, seed=7)
s0 = cache["iter.0.hook_state_pre"]
out = model(tokens, n_loops=T, seed=7)
assert ll.testing.close(model(tokens, n_loops=T, initial_state=s0), out)

# %% [markdown]
# Logit lens and coda lens per iteration (Lu et al. 2025). The coda lens runs the rest of the
# network from each iteration's state, so at the last iteration it is the model's output.

# %%
logit_lens, coda = logit_lens_of_states(model, cache), coda_lens(model, cache)
print(logit_lens.logits.shape, coda.logits.shape)  # [n_loops, batch, pos, d_vocab]
assert logit_lens.logits.shape == coda.logits.shape == (T, *out.shape)
assert ll.testing.close(coda.logits[-1], out)
coda.plot()

# %% [markdown]
# Converting to loop_lens's native format (also `loop-lens convert SRC DST`); the converted model
# computes the same.

# %%
native = model.save(Path(workdir.name) / "native")
print(sorted(p.name for p in native.iterdir()))
assert torch.equal(ll.load(native)(tokens, n_loops=T, initial_state=s0), model(tokens, n_loops=T, initial_state=s0))
