# %% [markdown]
# # A sparse autoencoder on one iteration, trained by SAELens, spliced back into the loop
#
# SAELens trains SAEs on TransformerLens models. `model.unrolled(n_loops=T)` is one: a
# `HookedRootModule` sharing the looped model's weights whose hook names are TransformerLens's
# over the unrolled depth (`blocks.{k}.*`). Here SAELens's own training runner trains a small SAE
# on `iter.3.blocks.1.hook_resid_post` of `zoo:khop-huginn` (the residual after block layer 1 at
# iteration 3), and we splice it back into the looped model.
#
# sae-lens requires transformer-lens < 4: run this notebook in an environment with
# transformer-lens 3.9 (`pip install "transformer-lens==3.9.0" sae-lens`; `.ci/run` builds one).

# %%
import datasets
import torch
from sae_lens import (
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    StandardTrainingSAEConfig,
)

import loop_lens as ll
from loop_lens.zoo.task import SEQ_LEN, sample

torch.manual_seed(0)
model = ll.load("zoo:khop-huginn")
T = 6
view = model.unrolled(n_loops=T)  # Huginn starts from a random state: the view runs with seed=0
hook = f"blocks.{view.depth_index(3, 1)}.hook_resid_post"
print(hook, "=", view.loop_name(hook), "| depth", view.cfg.n_layers)
assert view.loop_name(hook) == "iter.3.blocks.1.hook_resid_post"
assert view.loop_index(view.depth_index(3, 1)) == ("loop", 3, 1)

# %% [markdown]
# The training data: 256 k-hop prompts, already tokenized (SAELens reads an `input_ids` column).

# %%
prompts = sample(256, range(1, 5), torch.Generator().manual_seed(0)).tokens
dataset = datasets.Dataset.from_dict({"input_ids": prompts.tolist()})
cfg = LanguageModelSAERunnerConfig(
    sae=StandardTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model, l1_coefficient=1e-3),
    model_name="zoo:khop-huginn", hook_name=hook, dataset_path="", is_dataset_tokenized=True, streaming=False,
    context_size=SEQ_LEN, training_tokens=256 * SEQ_LEN * 3, train_batch_size_tokens=128, store_batch_size_prompts=32,
    n_batches_in_buffer=16, lr=3e-3, device="cpu", prepend_bos=False, logger=LoggingConfig(log_to_wandb=False),
    n_eval_batches=1, output_path=None, checkpoint_path="sae_checkpoints", n_batches_for_norm_estimate=2,
    verbose=False, seed=0,
)
sae = LanguageModelSAETrainingRunner(cfg, override_model=view, override_dataset=dataset).run()

# %% [markdown]
# How well does it reconstruct the activation, read with loop_lens's own cache?

# %%
tokens = prompts[:16]
name = "iter.3.blocks.1.hook_resid_post"
_, cache = model.run_with_cache(tokens, n_loops=T, seed=0, names_filter=[name])
x = cache[name]
with torch.no_grad():
    recon = sae(x)
    features = sae.encode(x)
explained = float(1 - (recon - x).pow(2).sum() / (x - x.mean((0, 1))).pow(2).sum())
l0 = float((features > 0).float().sum(-1).mean())
print(f"variance explained {explained:.3f}, mean active features {l0:.1f} of {features.shape[-1]}")
assert explained > 0.95

# %% [markdown]
# Splice it back: replace the activation by the SAE's reconstruction, once through the view's
# TransformerLens name and once through the looped model's own name. The two are the same hook
# point, so the logits are identical; and the model's answers barely move, while zeroing the
# activation changes them a lot.

# %%
def splice(act, hook):
    return sae(act).to(act.dtype)


with torch.no_grad():
    clean = model(tokens, n_loops=T, seed=0)
    via_view = view.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
    via_model = model.run_with_hooks(tokens, n_loops=T, seed=0, fwd_hooks=[(name, splice)])
    zeroed = model.run_with_hooks(tokens, n_loops=T, seed=0, fwd_hooks=[(name, lambda a, hook: torch.zeros_like(a))])
assert torch.equal(via_view, via_model)


def kl(logits):
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), clean.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


print(f"KL to the clean output: spliced {kl(via_model):.4f}, zeroed {kl(zeroed):.3f}")
assert kl(via_model) < 0.05 * kl(zeroed)
