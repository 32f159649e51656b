"""Issue 25, loading: hostile checkpoint files (each test failed before its fix)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import golden
from hostile import copy_golden, hashes
from safetensors.torch import load_file, save_file

import loop_lens as ll
from loop_lens.adapters import io


def _huginn(tmp_path):
    return copy_golden(golden("huginn-tiny"), tmp_path / "ckpt")


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field", ["mean_recurrence", "n_block_hack"])
def test_a_huge_default_loop_count_is_refused_at_load_naming_the_key(tmp_path, field):  # defect 13
    path = _huginn(tmp_path)
    if field == "mean_recurrence":
        _edit(path / "config.json", mean_recurrence=10**12)
        with pytest.raises(ll.LoadError, match="mean_recurrence.*default_loops"):
            ll.load(path)
    else:  # a native checkpoint's own field
        native = tmp_path / "native"
        ll.load("zoo:tiny-random").save(native)
        _edit(native / "loop_config.json", default_loops=10**9)
        with pytest.raises(ll.LoadError, match="default_loops"):
            ll.load(native)


def _alarm(seconds):
    def fail(*_):
        raise AssertionError(f"took more than {seconds} s")
    signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)


@pytest.mark.parametrize("field,value", [("n_block", 10**8), ("d_mlp", 10**9), ("n_prelude", 10**7)])
def test_absurd_sizes_are_refused_before_any_module_is_built(tmp_path, field, value):  # defect 14
    native = tmp_path / "native"
    ll.load("zoo:tiny-random").save(native)
    _edit(native / "loop_config.json", **{field: value})
    before = hashes(native)
    _alarm(30)
    try:
        with pytest.raises(ll.LoadError, match=f"{field}={value}.*holds"):
            ll.load(native)
    finally:
        signal.alarm(0)
    assert hashes(native) == before


def test_reading_safetensors_opens_the_file_a_fixed_number_of_times(tmp_path, monkeypatch):  # defect 15
    import safetensors

    path = tmp_path / "many.safetensors"
    save_file({f"t{i}": torch.full((2,), float(i)) for i in range(2000)}, str(path))
    calls = []
    real = safetensors.safe_open

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    tensors = io.read_safetensors(path)
    assert len(tensors) == 2000 and len(calls) <= 2
    assert all(torch.equal(tensors[f"t{i}"], torch.full((2,), float(i))) for i in (0, 999, 1999))
    assert tensors == {} or all(t.dtype == torch.float32 for t in tensors.values())


def test_weights_are_owned_memory_so_truncating_the_file_after_load_cannot_crash(tmp_path):  # defect 16
    ckpt = tmp_path / "ckpt"
    script = f"""
import os, torch, loop_lens as ll
ll.load("zoo:tiny-random").save({str(ckpt)!r})
m = ll.load({str(ckpt)!r})
before = m(torch.arange(1, 6)[None], seed=0)
for name in os.listdir({str(ckpt)!r}):
    if name.endswith(".safetensors"):
        os.truncate(os.path.join({str(ckpt)!r}, name), 0)
after = m(torch.arange(1, 6)[None], seed=0)
assert torch.equal(before, after)
print("ok")
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=os.getcwd(), env=env)
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_the_index_decides_which_shard_copy_of_a_tensor_is_read(tmp_path):  # defect 17
    src = _huginn(tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    victim = first[0]
    save_file({n: tensors[n] for n in first}, str(src / "model-00001-of-00002.safetensors"))
    impostor = {n: tensors[n] for n in second} | {victim: torch.zeros_like(tensors[victim])}
    save_file(impostor, str(src / "model-00002-of-00002.safetensors"))
    index = {n: "model-00001-of-00002.safetensors" for n in first} | {n: "model-00002-of-00002.safetensors" for n in second}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    twin = ll.load(golden("huginn-tiny"))
    (src / "model.safetensors").unlink()
    with pytest.warns(ll.UnexpectedTensorsWarning, match=victim):
        model = ll.load(src)
    x = torch.arange(1, 7)[None]
    assert torch.equal(model(x, seed=0), twin(x, seed=0))


def test_hrm_text_flags_are_type_checked_like_every_other_field(tmp_path):  # defect 20
    from hrm_models import random_hrm

    random_hrm().save_pretrained(tmp_path)
    for value in ("false", 0, [], "true"):
        _edit(tmp_path / "config.json", prefix_lm=value)
        with pytest.raises(ll.LoadError, match="prefix_lm.*true or false"):
            ll.load(tmp_path)


def _deep(n=5000):
    return "[" * n + "]" * n


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json", "loop_config.json"])
@pytest.mark.parametrize("junk", ["deep", "digits"])
def test_deep_json_and_huge_integers_name_the_file(tmp_path, file, junk):  # unclear errors
    if file == "loop_config.json":
        path = tmp_path / "native"
        ll.load("zoo:tiny-random").save(path)
    else:
        path = _huginn(tmp_path)
        if file.endswith("index.json"):
            (path / "model.safetensors").unlink()
    text = _deep() if junk == "deep" else '{"weight_map": {"a": 1' + "0" * 5000 + '}, "hidden_size": 1' + "0" * 5000 + "}"
    (path / file).write_text(text)
    with pytest.raises(ll.LoadError) as err:
        ll.load(path)
    assert file in str(err.value) and ("deep" in str(err.value) or "5001 digits" in str(err.value))


def test_the_pickle_refusal_never_advises_the_unsafe_load(tmp_path):  # unclear error
    path = _huginn(tmp_path)
    (path / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"transformer.wte.weight": Payload()}, path / "pytorch_model.bin")
    with pytest.raises(ll.LoadError) as err:
        ll.load(path)
    text = str(err.value)
    assert "pytorch_model.bin" in text and "system" in text
    for advice in ("weights_only=False", "`weights_only` set to `False`", "safe_globals", "if you trust"):
        assert advice not in text


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_or_meta_tensors_in_a_bin_are_refused_naming_them(tmp_path, kind):  # unclear error
    path = _huginn(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    name = "transformer.wte.weight"
    state[name] = state[name].to_sparse() if kind == "sparse" else torch.empty(state[name].shape, device="meta")
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ll.LoadError, match=f"{name}.*{'sparse' if kind == 'sparse' else 'meta'}"):
        ll.load(path)


def test_nan_weights_warn_at_load_naming_the_tensor(tmp_path):  # unclear error
    path = _huginn(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    name = sorted(n for n in state if "core_block" in n)[0]
    state[name][0] = float("nan")
    save_file(state, str(path / "model.safetensors"))
    with pytest.warns(ll.NonFiniteWeightsWarning, match=name.replace(".", r"\.")):
        ll.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll.load(golden("huginn-tiny"))  # finite weights: no warning


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_finiteness_check_reads_every_slice(dtype):
    """`io.all_finite` (the load's NaN check, by slices): a NaN or infinity in any slice, the last
    one included, is found; finite values whose sum overflows the slice's fp32 sum are not flagged."""
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert io.all_finite(values, chunk=64) and io.all_finite(values.view(100, 100), chunk=64)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 5_000, 9_999):
            broken = values.clone()
            broken[where] = bad
            assert not io.all_finite(broken, chunk=64), (bad, where)
    big = torch.full((256,), torch.finfo(dtype).max, dtype=dtype)  # finite; the fp32 sum of a slice overflows (bf16, fp32)
    assert io.all_finite(big, chunk=64) and io.all_finite(torch.arange(5)) and io.all_finite(torch.empty(0, dtype=dtype))


@pytest.mark.parametrize("file", ["model.safetensors", "tokenizer.json", "config.json"])
def test_symlinks_leading_outside_the_checkpoint_are_refused(tmp_path, file):  # unclear error / docs
    path = copy_golden(golden("huginn-tiny"), tmp_path / "ckpt")
    ll.load("zoo:tiny-random").save(tmp_path / "donor")
    outside = tmp_path / "outside"
    outside.mkdir()
    source = (tmp_path / "donor" / "tokenizer.json") if file == "tokenizer.json" else path / file
    (outside / file).write_bytes(source.read_bytes())
    (path / file).unlink(missing_ok=True)
    (path / file).symlink_to(outside / file)
    with pytest.raises(ll.LoadError, match="outside the checkpoint"):
        ll.load(path)
    # a link to a file inside the folder is fine
    (path / file).unlink()
    (path / f"real-{file}").write_bytes((outside / file).read_bytes())
    (path / file).symlink_to(f"real-{file}")
    ll.load(path)
