"""SAELens end to end: its own training runner trains an SAE on one iteration of a zoo model through
`model.unrolled(...)`, and the SAE splices back into the looped model.

sae-lens 6.x requires transformer-lens < 4, so this runs in the TransformerLens 3.9 environment
(`.ci/run` builds it and runs the suite there too). Under transformer-lens 4.x no release of
sae-lens installs beside us, and the test skips saying so; with transformer-lens 3.x a missing
sae-lens is a missing test dependency (a failure in CI).
"""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch

import loop_lens as ll
from tests.conftest import require

TL_MAJOR = int(version("transformer-lens").split(".")[0])
if TL_MAJOR >= 4:
    pytest.skip(f"sae-lens requires transformer-lens<4 and this environment has {version('transformer-lens')}: "
                "run it in the TransformerLens 3.9 environment that .ci/run builds (.venv-tl39)", allow_module_level=True)
sae_lens = require("sae_lens")
datasets = require("datasets")

T, ITER, LAYER = 6, 3, 1


def _train(tmp_path):
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
    )

    from loop_lens.zoo.task import SEQ_LEN, sample

    torch.manual_seed(0)
    model = ll.load("zoo:khop-huginn")
    view = model.unrolled(n_loops=T)
    hook = f"blocks.{view.depth_index(ITER, LAYER)}.hook_resid_post"
    assert view.loop_name(hook) == f"iter.{ITER}.blocks.{LAYER}.hook_resid_post"
    prompts = sample(256, range(1, 5), torch.Generator().manual_seed(0)).tokens
    dataset = datasets.Dataset.from_dict({"input_ids": prompts.tolist()})
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model, l1_coefficient=1e-3),
        model_name="zoo:khop-huginn", hook_name=hook, dataset_path="", is_dataset_tokenized=True, streaming=False,
        context_size=SEQ_LEN, training_tokens=256 * SEQ_LEN * 3, train_batch_size_tokens=128, store_batch_size_prompts=32,
        n_batches_in_buffer=16, lr=3e-3, device="cpu", prepend_bos=False, logger=LoggingConfig(log_to_wandb=False),
        n_eval_batches=1, output_path=None, checkpoint_path=str(tmp_path / "ckpt"), n_batches_for_norm_estimate=2,
        verbose=False, seed=0,
    )
    sae = LanguageModelSAETrainingRunner(cfg, override_model=view, override_dataset=dataset).run()
    return model, view, hook, sae, prompts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("sae"))


def test_saelens_runner_trains_on_an_iteration_and_splices_back(trained):
    model, view, hook, sae, prompts = trained
    tokens = prompts[:16]
    name = f"iter.{ITER}.blocks.{LAYER}.hook_resid_post"
    _, cache = model.run_with_cache(tokens, n_loops=T, seed=0, names_filter=[name])
    x = cache[name]
    with torch.no_grad():
        recon = sae(x)
    explained = 1 - (recon - x).pow(2).sum() / (x - x.mean((0, 1))).pow(2).sum()
    assert explained > 0.95, float(explained)  # the SAE reconstructs the activation it was trained on

    def splice(act, hook):
        return sae(act).to(act.dtype)

    with torch.no_grad():
        clean = model(tokens, n_loops=T, seed=0)
        via_view = view.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
        via_model = model.run_with_hooks(tokens, n_loops=T, seed=0, fwd_hooks=[(name, splice)])
        zeroed = model.run_with_hooks(tokens, n_loops=T, seed=0, fwd_hooks=[(name, lambda a, hook: torch.zeros_like(a))])
    assert torch.equal(via_view, via_model)  # the view's hook is the model's hook point at that depth

    def kl(logits):
        return torch.nn.functional.kl_div(logits.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="batchmean")

    assert kl(via_model) < 0.05 * kl(zeroed)  # splicing the SAE in keeps most of what ablating loses
