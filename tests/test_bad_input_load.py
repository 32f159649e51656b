"""Bad input on the load and config surfaces: each case is refused with the right error type, the
message names the culprit (config key and our field, tensor, file or index entry), and nothing in
the checkpoint folder changes (every file hashed before and after).

Surfaces: checkpoint folders (weights, shards and their index, the Hugging Face cache's symlinks),
config.json as the family adapters read it, native loop_config.json, LoopConfig itself, and
tokenizer.json. Property-based cases (Hypothesis) throw junk at every LoopConfig field and at the
config.json keys behind them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, golden, require
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

import loop_lens as ll
from loop_lens.adapters import families
from loop_lens.adapters.io import TensorSource
from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, LoadError, UnexpectedTensorsWarning

transformers = require("transformers")

ZOO_MODEL = ROOT / "loop_lens" / "zoo" / "models" / "tiny-random"
FEW = settings(max_examples=80, deadline=None)


# ---------------------------------------------------------------------- helpers
def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (read through symlinks) and the target of every symlink."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel + " ->"] = os.readlink(path)
            if path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def unchanged(root: Path):
    """Assert that nothing under `root` is created, deleted or modified inside the block."""
    before = tree_hashes(root)
    assert before, f"nothing to watch under {root}"
    yield
    assert tree_hashes(root) == before


def checkpoint(tmp_path: Path, name: str = "huginn-tiny") -> Path:
    """A writable copy of a golden checkpoint (config.json and model.safetensors)."""
    dst = tmp_path / name
    dst.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(golden(name) / file, dst)
    return dst


def native_checkpoint(tmp_path: Path) -> Path:
    """A writable copy of the zoo's tiny-random model in the plain native layout."""
    dst = tmp_path / "native"
    dst.mkdir()
    for file in ("loop_config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(ZOO_MODEL / file, dst)
    return dst


DELETE = object()


def edit_json(path: Path, changes: dict) -> None:
    """Set (or with DELETE remove) keys of a JSON file; 'a.b' sets key b of object a."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        if value is DELETE:
            target.pop(leaf)
        else:
            target[leaf] = value
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, fn) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def hub_cache(cache: Path, repo: str, files: dict[str, bytes], revision: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Write `files` in the Hugging Face cache layout; returns the snapshot folder.

    models--org--name/blobs/<sha256> holds the bytes, snapshots/<revision>/<file> is a symlink to
    ../../blobs/<sha256>, refs/main names the revision.
    """
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    for folder in (repo_dir / "blobs", snapshot, repo_dir / "refs"):
        folder.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / sha).write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{sha}")
    return snapshot


def three_shards(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """The tensors split over three safetensors shards, with their index, as file bytes."""
    names = sorted(tensors)
    files, weight_map = {}, {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = names[i::3]
        files[shard] = save({k: tensors[k].contiguous() for k in part})
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}).encode()
    return files


@pytest.fixture(scope="module")
def huginn_inputs():
    e = load_file(str(golden("huginn-tiny") / "expected.safetensors"))
    return e["input_ids"], e["initial_state"]


# ---------------------------------------------------------------------- the Hugging Face cache layout
def test_sharded_checkpoint_in_the_hub_cache_layout_equals_its_unsharded_twin(tmp_path, huginn_inputs, monkeypatch):
    import huggingface_hub

    src = golden("huginn-tiny")
    tensors = load_file(str(src / "model.safetensors"))
    common = {"config.json": (src / "config.json").read_bytes(), "tokenizer.json": (ZOO_MODEL / "tokenizer.json").read_bytes()}
    cache = tmp_path / "hub"
    sharded = hub_cache(cache, "org/huginn-tiny", {**common, **three_shards(tensors)})
    single = hub_cache(cache, "org/huginn-tiny-single", {**common, "model.safetensors": (src / "model.safetensors").read_bytes()})
    pickled = io.BytesIO()
    torch.save(tensors, pickled)
    binary = hub_cache(cache, "org/huginn-tiny-bin", {**common, "pytorch_model.bin": pickled.getvalue()})
    snapshots = (sharded, single, binary)
    assert all(p.is_symlink() for snapshot in snapshots for p in snapshot.iterdir())
    ids, s0 = huginn_inputs
    with torch.no_grad():
        want = ll.load(src)(ids, initial_state=s0)
        with unchanged(cache):
            for path in snapshots:
                model = ll.load(path)
                assert model.tokenizer is not None and model.cfg.family == "huginn"
                assert torch.equal(model(ids, initial_state=s0), want)
            # ll.load("org/name") goes through huggingface_hub's own cache lookup (offline here)
            monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
            monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
            assert torch.equal(ll.load("org/huginn-tiny")(ids, initial_state=s0), want)


HOSTILE_SHARDS = ["../outside.safetensors", "/etc/passwd", "OUTSIDE_ABSOLUTE", "sub/inner.safetensors",
                  "./model-00001-of-00003.safetensors", "", ".", "..", "sub\\inner.safetensors", 7, None]


@pytest.mark.parametrize("entry", HOSTILE_SHARDS, ids=repr)
def test_index_entry_that_names_a_path_is_refused_naming_it(tmp_path, entry):
    tensors = load_file(str(golden("huginn-tiny") / "model.safetensors"))
    files = three_shards(tensors)
    path = tmp_path / "ckpt"
    (path / "sub").mkdir(parents=True)
    shutil.copy(golden("huginn-tiny") / "config.json", path)
    for name, data in files.items():
        (path / name).write_bytes(data)
    # every path the entry could reach holds a real shard: only the guard stops it
    (tmp_path / "outside.safetensors").write_bytes(files["model-00001-of-00003.safetensors"])
    (path / "sub" / "inner.safetensors").write_bytes(files["model-00001-of-00003.safetensors"])
    if entry == "OUTSIDE_ABSOLUTE":
        entry = str(tmp_path / "outside.safetensors")
    index = json.loads(files["model.safetensors.index.json"])
    index["weight_map"]["transformer.wte.weight"] = entry
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with unchanged(tmp_path), pytest.raises(LoadError) as info:
        ll.load(path)
    message = str(info.value)
    assert repr(entry) in message and "transformer.wte.weight" in message and "not a plain file name" in message


def test_index_entry_naming_a_missing_or_folder_shard_is_refused(tmp_path):
    tensors = load_file(str(golden("huginn-tiny") / "model.safetensors"))
    files = three_shards(tensors)
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(golden("huginn-tiny") / "config.json", path)
    for name, data in files.items():
        if name != "model-00002-of-00003.safetensors":
            (path / name).write_bytes(data)
    (path / "model-00002-of-00003.safetensors").mkdir()
    with unchanged(tmp_path), pytest.raises(LoadError, match=r"names shard 'model-00002-of-00003.safetensors', which is not a file"):
        ll.load(path)


# ---------------------------------------------------------------------- weight dtypes
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("tensor", ["transformer.wte.weight", "transformer.core_block.0.attn.Wqkv.weight", "transformer.ln_f.weight"])
def test_integer_bool_or_fp8_weights_are_refused_naming_tensor_and_dtype(tmp_path, dtype, tensor):
    path = checkpoint(tmp_path)
    edit_tensors(path, lambda t: t.update({tensor: (t[tensor] > 0) if dtype == torch.bool else (t[tensor] * 100).to(dtype)}))
    with unchanged(path), pytest.raises(LoadError) as info:
        ll.load(path)
    assert f"tensor {tensor!r}" in str(info.value) and str(dtype) in str(info.value)


def test_non_float_dtype_argument_is_refused():
    with pytest.raises(LoadError, match=r"dtype=torch.int64"):
        ll.load(golden("huginn-tiny"), dtype=torch.int64)


def test_pytorch_bin_with_entries_that_are_not_tensors_is_refused_naming_them(tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(golden("huginn-tiny") / "config.json", path)
    tensors = load_file(str(golden("huginn-tiny") / "model.safetensors"))
    torch.save({**tensors, "transformer.wte.weight": 5}, path / "pytorch_model.bin")
    with unchanged(path), pytest.raises(LoadError, match=r"not named tensors: \['transformer.wte.weight'\]"):
        ll.load(path)


def test_sizes_too_large_to_build_are_a_load_error(tmp_path):
    path = checkpoint(tmp_path, "ouro-tiny")
    edit_json(path / "config.json", {"hidden_size": 10**30})
    with unchanged(path), pytest.raises(LoadError, match=r"cannot build a model of this config \(d_model=10+"):
        ll.load(path)


# ---------------------------------------------------------------------- config.json values, named by both names
CONFIG_CASES = [
    # (golden checkpoint, changes to config.json, fragments the message must hold)
    ("ouro-tiny", {"hidden_size": "abc"}, ["config.json field 'hidden_size' (d_model): expected a positive integer, got 'abc'"]),
    ("ouro-tiny", {"hidden_size": 0}, ["'hidden_size' (d_model)"]),
    ("ouro-tiny", {"num_attention_heads": 0}, ["'num_attention_heads' (n_heads)"]),
    ("ouro-tiny", {"num_attention_heads": True}, ["'num_attention_heads' (n_heads)", "got True"]),
    ("ouro-tiny", {"num_attention_heads": 3}, ["'num_attention_heads' (n_heads)", "'hidden_size' (d_model)", "does not divide"]),
    ("ouro-tiny", {"num_key_value_heads": 3}, ["'num_key_value_heads' (n_key_value_heads)", "'num_attention_heads' (n_heads)"]),
    ("ouro-tiny", {"num_hidden_layers": 2.5}, ["'num_hidden_layers' (n_block)", "got 2.5"]),
    ("ouro-tiny", {"num_hidden_layers": True}, ["'num_hidden_layers' (n_block)"]),
    ("ouro-tiny", {"head_dim": 0}, ["'head_dim' (d_head)"]),
    ("ouro-tiny", {"head_dim": 15}, ["'head_dim' (d_head)", "even d_head"]),
    ("ouro-tiny", {"intermediate_size": "128"}, ["'intermediate_size' (d_mlp)"]),
    ("ouro-tiny", {"intermediate_size": DELETE}, ["config.json lacks 'intermediate_size' (d_mlp)"]),
    ("ouro-tiny", {"total_ut_steps": 0}, ["'total_ut_steps' (default_loops)"]),
    ("ouro-tiny", {"max_position_embeddings": -1}, ["'max_position_embeddings' (n_ctx)"]),
    ("ouro-tiny", {"rms_norm_eps": "1e-6"}, ["'rms_norm_eps' (norm_eps)"]),
    ("ouro-tiny", {"rms_norm_eps": -1e-6}, ["'rms_norm_eps' (norm_eps)"]),
    ("ouro-tiny", {"rms_norm_eps": float("nan")}, ["'rms_norm_eps' (norm_eps)", "got nan"]),
    ("ouro-tiny", {"rope_theta": "10000"}, ["'rope_theta' (rope_theta)"]),
    ("ouro-tiny", {"rope_theta": 0}, ["'rope_theta' (rope_theta)"]),
    ("ouro-tiny", {"rope_theta": DELETE, "rope_parameters": {"rope_theta": -1}}, ["'rope_parameters.rope_theta' (rope_theta)"]),
    ("ouro-tiny", {"rope_scaling": [1, 2]}, ["'rope_scaling' (rope_scaling)", "got [1, 2]"]),
    ("ouro-tiny", {"rope_scaling": "llama3"}, ["'rope_scaling' (rope_scaling)"]),
    ("ouro-tiny", {"rope_scaling": {"rope_type": "llama3", "original_max_position_embeddings": 8}}, ["'rope_scaling' (rope_scaling)", "lacks 'factor'"]),
    ("ouro-tiny", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, ["'rope_scaling' (rope_scaling)", "'yarn'"]),
    ("ouro-tiny", {"early_exit_threshold": 1.5}, ["'early_exit_threshold' (early_exit_threshold)"]),
    ("ouro-tiny", {"early_exit_threshold": -0.1}, ["'early_exit_threshold' (early_exit_threshold)"]),
    ("ouro-tiny", {"early_exit_threshold": float("nan")}, ["'early_exit_threshold' (early_exit_threshold)"]),
    ("ouro-tiny", {"early_exit_threshold": "1.0"}, ["'early_exit_threshold' (early_exit_threshold)"]),
    ("ouro-tiny", {"early_exit_step": -1}, ["'early_exit_step' (default_exit)"]),
    ("ouro-tiny", {"early_exit_step": "weighted"}, ["'early_exit_step' (default_exit)"]),
    ("ouro-tiny", {"tie_word_embeddings": "false"}, ["'tie_word_embeddings' (tie_embeddings)", "true or false"]),
    ("ouro-tiny", {"use_sliding_window": "no"}, ["config.json field 'use_sliding_window': expected true or false"]),
    ("ouro-tiny", {"vocab_size": "97"}, ["config.json field 'vocab_size': expected a positive integer"]),
    ("ouro-tiny", {"_name_or_path": 5}, ["'_name_or_path' (model_name)"]),
    ("huginn-tiny", {"n_embd": "abc"}, ["'n_embd' (d_model)"]),
    ("huginn-tiny", {"n_heads": 0}, ["'n_heads' (n_heads)"]),
    ("huginn-tiny", {"n_layers_in_recurrent_block": 2.5}, ["'n_layers_in_recurrent_block' (n_block)"]),
    ("huginn-tiny", {"n_layers_in_prelude": -1}, ["'n_layers_in_prelude' (n_prelude)"]),
    ("huginn-tiny", {"n_layers_in_coda": True}, ["'n_layers_in_coda' (n_coda)"]),
    ("huginn-tiny", {"num_key_value_heads": 3}, ["'num_key_value_heads' (n_key_value_heads)", "'n_heads' (n_heads)"]),
    ("huginn-tiny", {"norm_eps": float("nan")}, ["'norm_eps' (norm_eps)"]),
    ("huginn-tiny", {"rope_base": "fast"}, ["'rope_base' (rope_theta)"]),
    ("huginn-tiny", {"rope_base": -5}, ["'rope_base' (rope_theta)"]),
    ("huginn-tiny", {"init_values.std": float("nan")}, ["'init_values.std' (init_std)", "got nan"]),
    ("huginn-tiny", {"init_values.std": -0.1}, ["'init_values.std' (init_std)"]),
    ("huginn-tiny", {"init_values.embed_scale": "8"}, ["'init_values.embed_scale' (embed_scale)"]),
    ("huginn-tiny", {"init_values": [1, 2]}, ["config.json field 'init_values': expected an object"]),
    ("huginn-tiny", {"mean_recurrence": 0}, ["'mean_recurrence' (default_loops)"]),
    ("huginn-tiny", {"qk_bias": "true"}, ["'qk_bias' (qk_bias)"]),
    ("huginn-tiny", {"tie_embeddings": 1}, ["'tie_embeddings' (tie_embeddings)"]),
    ("huginn-tiny", {"block_size": "64"}, ["'block_size' (n_ctx)"]),
    ("huginn-tiny", {"padded_vocab_size": [128]}, ["config.json field 'padded_vocab_size'"]),
    ("huginn-tiny", {"injection_type": "additive"}, ["'injection_type'", "'additive'"]),
    ("retro-llama-tiny", {"rope_theta": "x"}, ["'rope_theta' (rope_theta)"]),
    ("retro-llama-tiny", {"rope_scaling": {"rope_type": "llama3", "factor": "8", "original_max_position_embeddings": 8}}, ["'rope_scaling' (rope_scaling)", "'factor'"]),
    ("retro-llama-tiny", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8}},
     ["'rope_scaling' (rope_scaling)", "high_freq_factor > low_freq_factor"]),
    ("retro-llama-tiny", {"rope_scaling": DELETE, "rope_parameters": [1]}, ["'rope_parameters' (rope_scaling)"]),
]


@pytest.mark.parametrize("name, changes, fragments", CONFIG_CASES, ids=[f"{n}-{next(iter(c))}={list(c.values())[-1]!r}" for n, c, _ in CONFIG_CASES])
def test_bad_config_value_is_refused_at_load_naming_its_key_and_our_field(tmp_path, name, changes, fragments):
    path = checkpoint(tmp_path, name)
    edit_json(path / "config.json", changes)
    with unchanged(path), pytest.raises(LoadError) as info:
        ll.load(path)
    for fragment in fragments:
        assert fragment in str(info.value)


# ---------------------------------------------------------------------- native loop_config.json
NATIVE_CASES = [
    ({"d_model": "abc"}, "d_model: expected a positive integer, got 'abc'"),
    ({"n_heads": 0}, "n_heads: expected a positive integer"),
    ({"n_block": 1.5}, "n_block: expected a positive integer"),
    ({"norm_eps": float("nan")}, "norm_eps: expected a finite number > 0"),
    ({"rope_scaling": "llama3"}, "rope_scaling: expected null or a JSON object"),
    ({"default_exit": "sometimes"}, "unknown default_exit 'sometimes'; expected one of ['last', 'threshold', 'weighted']"),
    ({"default_exit": 2}, "default_exit=2 needs exit_gate=True"),
    ({"early_exit_threshold": 2}, "early_exit_threshold: expected a number between 0 and 1"),
    ({"tie_embeddings": "yes"}, "tie_embeddings: expected true or false"),
    ({"extra": [1]}, "extra: expected a JSON object"),
    ({"d_model": DELETE}, "LoopConfig lacks required fields: ['d_model']"),
    ({"colour": "red"}, "unknown LoopConfig fields: ['colour']"),
]


@pytest.mark.parametrize("changes, fragment", NATIVE_CASES, ids=[next(iter(c)) + "=" + repr(list(c.values())[0]) for c, _ in NATIVE_CASES])
def test_bad_native_loop_config_is_refused_naming_the_field(tmp_path, changes, fragment):
    path = native_checkpoint(tmp_path)
    edit_json(path / "loop_config.json", changes)
    with unchanged(path), pytest.raises(LoadError) as info:
        ll.load(path)
    assert "loop_config.json" in str(info.value) and fragment in str(info.value)


def test_stray_tensors_in_a_native_checkpoint_warn_and_are_ignored(tmp_path):
    path = native_checkpoint(tmp_path)
    reference = ll.load(path)
    assert reference.cfg.tie_embeddings  # so a saved unembed.weight is unused
    strays = {"blocks.0.mystery": torch.zeros(3, dtype=torch.bool), "unembed.weight": torch.ones(64, 64)}
    edit_tensors(path, lambda t: t.update(strays))
    with unchanged(path), pytest.warns(UnexpectedTensorsWarning) as record:
        model = ll.load(path)
    message = " ".join(str(w.message) for w in record if issubclass(w.category, UnexpectedTensorsWarning))
    assert "'blocks.0.mystery'" in message and "'unembed.weight'" in message
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(tokens, seed=0), reference(tokens, seed=0))


def test_a_clean_native_checkpoint_loads_without_warnings(tmp_path):
    path = native_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnexpectedTensorsWarning)
        ll.load(path)


# ---------------------------------------------------------------------- vocabulary rows
@pytest.mark.parametrize("name, key, rows", [("ouro-tiny", "vocab_size", 97), ("huginn-tiny", "padded_vocab_size", 128)])
def test_embedding_with_fewer_rows_than_the_config_vocab_warns_naming_both(tmp_path, name, key, rows):
    path = checkpoint(tmp_path, name)
    with warnings.catch_warnings(record=True) as clean:
        warnings.simplefilter("always")
        ll.load(path)
    assert not [w for w in clean if "cannot be embedded" in str(w.message)]
    edit_json(path / "config.json", {key: rows + 50})
    with unchanged(path), pytest.warns(UserWarning, match=rf"'{key}' is {rows + 50}, but .* has only {rows} rows"):
        model = ll.load(path)
    assert model.cfg.d_vocab == rows


# ---------------------------------------------------------------------- tokenizers are untrusted data
@pytest.mark.parametrize("content", [b"{ not json", b"", bytes(range(256)), b"[1, 2]", b'{"model": 5}'], ids=["not-json", "empty", "binary", "list", "bad-model"])
def test_corrupt_tokenizer_json_is_a_load_error_naming_the_file(tmp_path, content):
    path = checkpoint(tmp_path)
    (path / "tokenizer.json").write_bytes(content)
    with unchanged(path), pytest.raises(LoadError) as info:
        ll.load(path)
    assert str(path / "tokenizer.json") in str(info.value)


def test_tokenizer_code_in_the_checkpoint_is_never_run(tmp_path):
    path = checkpoint(tmp_path)
    shutil.copy(ZOO_MODEL / "tokenizer.json", path)
    marker = tmp_path / "ran"
    (path / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nraise RuntimeError('tokenizer code ran')\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
    }))
    with unchanged(path):
        model = ll.load(path)
    assert not marker.exists() and "tokenization_evil" not in sys.modules
    assert type(model.tokenizer).__module__.startswith("tokenizers")


# ---------------------------------------------------------------------- ll.loop arguments and GPT-2 activations
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                      max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(block=(0.5, 2)), "block=(0.5, 2) must be two integers"),
    (dict(block=(1,)), "block=(1,) must be two integers"),
    (dict(block=(0, 2), n_loops=0), "argument n_loops (default_loops): expected a positive integer, got 0"),
    (dict(block=(0, 2), n_loops=2.5), "argument n_loops (default_loops)"),
])
def test_bad_loop_arguments_are_named(llama_dir, kwargs, fragment):
    with unchanged(llama_dir), pytest.raises(LoadError) as info:
        ll.loop(llama_dir, **kwargs)
    assert fragment in str(info.value)


def test_loop_accepts_numpy_integers(llama_dir):
    model = ll.loop(llama_dir, block=(np.int64(1), np.int64(2)), n_loops=np.int64(3))
    assert model.cfg.layout == "(1, 1 x 3, 1)" and type(model.cfg.default_loops) is int


def test_gpt2_activation_is_honoured_or_refused(tmp_path):
    def gpt2(act: str):
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                                     activation_function=act)).eval()

    unsupported = tmp_path / "silu"
    gpt2("silu").save_pretrained(unsupported)
    with unchanged(unsupported), pytest.raises(LoadError, match=r"'activation_function' \(mlp_type\): 'silu' is not supported"):
        ll.loop(unsupported, block=(0, 2))
    hf = gpt2("gelu_pytorch_tanh")
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ll.loop(hf, block=(0, 2))(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- LoopConfig: property-based
BASE = dict(d_model=32, n_heads=4, d_vocab=40, n_block=2, exit_gate=True)

# What each field must be, written here independently of loop_lens.config's own rule table.
POSITIVE_INTS = {"d_model", "n_heads", "d_vocab", "n_block", "default_loops", "d_head", "n_key_value_heads", "d_mlp", "n_ctx"}
COUNTS = {"n_prelude", "n_coda", "l_cycles"}
POSITIVE_NUMBERS = {"norm_eps", "rope_theta"}
NUMBERS = {"embed_scale", "init_scale"}
NON_NEGATIVE_NUMBERS = {"init_std"}
FRACTIONS = {"early_exit_threshold"}
FLAGS = {"attn_bias", "mlp_bias", "qk_bias", "iter_norm", "norm_after_loop", "final_norm", "exit_gate", "tie_embeddings", "attn_gate", "norm_weight"}
CHOICES = {
    "normalization_type": {"RMS", "LN"}, "norm_placement": {"pre", "sandwich", "sandwich_resid", "post"},
    "mlp_type": {"swiglu", "gelu", "gelu_new", "relu", "relu2"}, "positional_embedding_type": {"rotary", "learned", "none"},
    "rope_style": {"rotate_half", "adjacent"}, "qk_norm": {"none", "full", "head"}, "injection": {"none", "linear", "additive", "diagonal"},
    "initial_state": {"embed", "zeros", "trunc_normal"},
}
OTHERS = {"rope_scaling", "default_exit", "family", "model_name", "extra"}
DERIVED = {"d_head", "n_key_value_heads", "d_mlp"}  # None means "derive it"


def test_every_loop_config_field_is_covered_by_these_tests():
    kinds = [POSITIVE_INTS, COUNTS, POSITIVE_NUMBERS, NUMBERS, NON_NEGATIVE_NUMBERS, FRACTIONS, FLAGS, CHOICES, OTHERS]
    assert sum(len(k) for k in kinds) == len(set().union(*kinds))
    assert set().union(*kinds) == {f.name for f in dataclasses.fields(LoopConfig)}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)) and math.isfinite(v)


def _valid(name: str, v) -> bool:
    """The test's own account of a valid value for field `name` (fields on their own)."""
    if name in POSITIVE_INTS:
        return _is_int(v) and v > 0
    if name in COUNTS:
        return _is_int(v) and v >= 0
    if name in POSITIVE_NUMBERS:
        return _is_finite(v) and v > 0
    if name in NUMBERS:
        return _is_finite(v)
    if name in NON_NEGATIVE_NUMBERS:
        return _is_finite(v) and v >= 0
    if name in FRACTIONS:
        return _is_finite(v) and 0 <= v <= 1
    if name in FLAGS:
        return isinstance(v, bool)
    if name == "default_exit":
        return v in ("last", "threshold", "weighted") if isinstance(v, str) else (_is_int(v) and v >= 0)
    if name in ("family", "model_name"):
        return isinstance(v, str) and (v != "" or name == "model_name")
    if name == "extra":  # written back to loop_config.json: plain JSON only
        try:
            return isinstance(v, dict) and all(isinstance(k, str) for k in v) and bool(json.dumps(v, allow_nan=False))
        except ValueError:
            return False
    if name == "rope_scaling":
        return v is None or (isinstance(v, dict) and v.get("rope_type") is None)
    return isinstance(v, str) and v in CHOICES[name]


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 2.5, -1e-9, 0.0, 1.0000001, -1, 0]),
    st.text(max_size=6), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just({"rope_type": "llama3"}), st.just({"rope_type": "yarn", "factor": 2.0}), st.just({"x": float("nan")}),
    st.builds(np.int64, st.integers(-5, 5)), st.builds(np.float32, st.floats(-2, 2, width=32)),
)
FIELD_NAMES = sorted(f.name for f in dataclasses.fields(LoopConfig))


@FEW
@given(data=st.data())
def test_any_junk_value_of_any_field_is_a_config_error_naming_the_field(data):
    name = data.draw(st.sampled_from(FIELD_NAMES), label="field")
    value = data.draw(JUNK.filter(lambda v: not _valid(name, v) and not (v is None and name in DERIVED)), label="value")
    with pytest.raises(ConfigError) as info:
        LoopConfig(**{**BASE, name: value})
    assert name in info.value.fields and name in str(info.value)


@FEW
@given(data=st.data())
def test_validate_refuses_a_field_broken_after_construction(data):
    cfg = LoopConfig(**BASE)
    name = data.draw(st.sampled_from(FIELD_NAMES), label="field")
    value = data.draw(JUNK.filter(lambda v: not _valid(name, v)), label="value")
    setattr(cfg, name, value)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert name in info.value.fields


@FEW
@given(
    n_heads=st.integers(1, 8), kv_divisor=st.sampled_from([1, 2, 4, 8]), half_head=st.integers(1, 8), layers=st.tuples(*[st.integers(0, 3)] * 3),
    loops=st.integers(1, 64), eps=st.floats(1e-12, 1.0), theta=st.floats(1.0, 1e7), threshold=st.floats(0.0, 1.0),
    std=st.floats(0.0, 1.0), scale=st.floats(-10, 10), placement=st.sampled_from(["pre", "sandwich", "sandwich_resid", "post"]),
    injection=st.sampled_from(["none", "linear", "additive", "diagonal"]), exit=st.sampled_from(["last", "threshold", "weighted", 0, 5]),
    as_numpy=st.booleans(), flags=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_valid_configs_always_construct_and_round_trip_through_json(
    n_heads, kv_divisor, half_head, layers, loops, eps, theta, threshold, std, scale, placement, injection, exit, as_numpy, flags
):
    kv = n_heads // math.gcd(n_heads, kv_divisor)
    integer = np.int64 if as_numpy else int
    cfg = LoopConfig(
        d_model=integer(n_heads * 2 * half_head), n_heads=integer(n_heads), n_key_value_heads=integer(kv), d_vocab=integer(50),
        n_prelude=integer(layers[0]), n_block=integer(layers[1] + 1), n_coda=integer(layers[2]), default_loops=integer(loops),
        norm_eps=eps, rope_theta=theta, early_exit_threshold=threshold, init_std=std, embed_scale=scale, init_scale=scale,
        norm_placement=placement, injection=injection, exit_gate=True, default_exit=exit, attn_bias=flags[0], qk_bias=flags[1],
        tie_embeddings=flags[2], iter_norm=flags[3],
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16} if flags[0] else None,
    )
    assert cfg.d_head == 2 * half_head and type(cfg.d_model) is int and type(cfg.norm_eps) is float
    assert LoopConfig.from_json(cfg.to_json()) == cfg


# ---------------------------------------------------------------------- config.json keys, property-based
OURO_KEYS = {
    "hidden_size": "d_model", "num_attention_heads": "n_heads", "num_key_value_heads": "n_key_value_heads", "head_dim": "d_head",
    "intermediate_size": "d_mlp", "num_hidden_layers": "n_block", "total_ut_steps": "default_loops", "max_position_embeddings": "n_ctx",
    "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta", "early_exit_threshold": "early_exit_threshold",
    "tie_word_embeddings": "tie_embeddings", "_name_or_path": "model_name",
}


@pytest.fixture(scope="module")
def ouro_parts():
    path = golden("ouro-tiny")
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


@FEW
@given(data=st.data())
def test_any_junk_config_json_value_names_the_key_and_our_field(ouro_parts, data):
    config, tensors = ouro_parts
    key = data.draw(st.sampled_from(sorted(OURO_KEYS)), label="key")
    ours = OURO_KEYS[key]
    value = data.draw(JUNK.filter(lambda v: v is not None and not _valid(ours, v)), label="value")
    with pytest.raises(LoadError) as info:
        families.ouro({**config, key: value}, TensorSource(tensors, "memory"))
    assert f"config.json field {key!r} ({ours})" in str(info.value)


class _Payload:
    """Unpickling this object would write a marker file: a pickle that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_payload_in_pytorch_model_bin_never_runs(tmp_path):
    import shutil

    from conftest import golden

    path = tmp_path / "ckpt"
    shutil.copytree(golden("huginn-tiny"), path)
    (path / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"transformer.wte.weight": _Payload(marker)}, path / "pytorch_model.bin")
    with pytest.raises(ll.LoadError, match="weights_only"):
        ll.load(path)
    assert not marker.exists()
