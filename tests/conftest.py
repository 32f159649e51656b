"""Shared fixtures: the golden checkpoints, small model factories and the test-dependency rule."""

from __future__ import annotations

import importlib
import os
import zlib
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest
import torch

from loop_lens import HookedLoopedTransformer, LoopConfig
from loop_lens.model.init import init_weights

# Tiny models on a busy machine: one torch thread each (LOOP_LENS_TEST_THREADS to change; docs/performance.md)
torch.set_num_threads(int(os.environ.get("LOOP_LENS_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"

# Every block style, as the families use them.
STYLES = {
    "pre": dict(norm_placement="pre"),
    "ouro": dict(norm_placement="sandwich", iter_norm=True, final_norm=False, exit_gate=True),
    "huginn": dict(
        norm_placement="sandwich_resid", rope_style="adjacent", injection="linear", initial_state="trunc_normal",
        init_std=0.1, norm_after_loop=True, qk_bias=True, tie_embeddings=True,
    ),
    "olmo2": dict(norm_placement="post", qk_norm="full", injection="additive", initial_state="zeros"),
    "gpt2": dict(normalization_type="LN", mlp_type="gelu_new", attn_bias=True, mlp_bias=True, positional_embedding_type="learned"),
}


def tiny_config(style: str = "pre", **overrides) -> LoopConfig:
    """A small config in one of the block `STYLES`, with any field overridden."""
    fields = dict(d_model=32, n_heads=4, n_key_value_heads=2, d_mlp=48, d_vocab=40, n_prelude=1, n_block=2, n_coda=1, default_loops=3, n_ctx=64)
    fields.update(STYLES[style])
    fields.update(overrides)
    return LoopConfig(**fields)


def tiny_model(style: str = "pre", seed: int = 0, **overrides) -> HookedLoopedTransformer:
    """A seeded model of `tiny_config`, with non-trivial norm weights and biases."""
    torch.manual_seed(seed)
    model = HookedLoopedTransformer(tiny_config(style, **overrides))
    init_weights(model, seed=seed)
    for name, p in model.named_parameters():  # make norms and biases non-trivial so mistakes show
        if p.ndim == 1 or name.endswith(("q_bias", "k_bias")):
            with torch.no_grad():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))))
    return model.eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    """Two random prompts of 7 tokens."""
    return torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))


def golden(name: str) -> Path:
    """The directory of a golden fixture in ../shared/golden; fails (never skips) when it is missing."""
    path = GOLDEN / name
    if not path.is_dir():
        pytest.fail(f"golden fixture {path} is missing: ../shared must sit beside the project")
    return path


def under_ci() -> bool:
    """Whether the suite runs in CI (`CI` set and not "0"/"false"), where nothing may be skipped for a missing dependency."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def unavailable(what: str, install: str = "pip install -e '.[test]'") -> NoReturn:
    """A test dependency is missing: an error in CI, a skip giving the reason elsewhere."""
    if under_ci():
        pytest.fail(f"{what} is missing in CI, where nothing is skipped for a missing dependency ({install})", pytrace=False)
    pytest.skip(f"{what} is not installed ({install}; in CI this is a failure)", allow_module_level=True)


def require(module: str) -> ModuleType:
    """Import a test dependency, or call `unavailable` (works at module level and inside tests)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            raise  # installed but broken (one of its own imports is missing): not a missing dependency
        unavailable(f"the test dependency {module!r}")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests: tiny models run many small ops, which one
    thread does faster and more steadily on a shared machine (and as each torchrun rank does)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
