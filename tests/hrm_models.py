"""Random tiny HRM-Text checkpoints built with transformers' own model, for the HRM tests."""

from __future__ import annotations

import torch
from conftest import require

import loop_lens as ll

transformers = require("transformers")
from transformers import HrmTextConfig, HrmTextForCausalLM  # noqa: E402

VOCAB = 61


def random_hrm(seed: int = 0, **fields) -> HrmTextForCausalLM:
    """A random tiny HRM-Text with non-trivial weights everywhere (z_L_init included). Weights
    are kept moderate: much larger ones make the recurrence chaotic, so that transformers' own
    fp32 and fp64 runs already differ by more than 1e-4."""
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                head_dim=8, H_cycles=2, L_cycles=3, max_position_embeddings=64, initializer_range=0.1)
    base.update(fields)
    model = HrmTextForCausalLM(HrmTextConfig(**base)).eval()
    with torch.no_grad():
        model.model.z_L_init.normal_()
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def saved(hf: HrmTextForCausalLM, tmp_path) -> ll.HookedLoopedTransformer:
    """`hf` written with save_pretrained and loaded back with ll.load."""
    hf.save_pretrained(tmp_path)
    return ll.load(tmp_path)
