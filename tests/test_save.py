"""save_checkpoint: atomic, exact round trips, and never overwriting data that is not our own save."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loop_lens as ll
from loop_lens import zoo
from loop_lens.errors import LoadError, SaveError
from loop_lens.saving import FILES_KEY, check_save_target, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ["loop_config.json", "model.safetensors", "tokenizer.json"]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (relative name -> sha256), to prove nothing changed."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def tokenizer_text(model) -> str | None:
    return None if model.tokenizer is None else model.tokenizer.to_str()


def differences(a, b) -> list[str]:
    """How two models differ in what a checkpoint holds: config, every tensor, tokenizer."""
    found = []
    if a.cfg != b.cfg:
        found.append("config")
    sa, sb = a.state_dict(), b.state_dict()
    if set(sa) != set(sb):
        found.append(f"tensor names {sorted(set(sa) ^ set(sb))}")
    found += [
        f"tensor {k}" for k in sorted(set(sa) & set(sb)) if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])
    ]
    if tokenizer_text(a) != tokenizer_text(b):
        found.append("tokenizer")
    return found


def load_strict(directory: Path):
    """ll.load, with any warning (a stray tensor, say) an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ll.load(directory)


def version_b():
    """tiny-random with other weights, another name and another tokenizer, so a mix of it and A shows."""
    model = ll.load("zoo:tiny-random")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    model.cfg = model.cfg.replace(model_name="tiny-random-B")
    model.tokenizer.enable_truncation(max_length=100)
    return model


def hf_folder(path: Path) -> Path:
    """A folder that looks like a transformers checkpoint, with its own weights and tokenizer."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}))
    save_file(
        {"model.embed_tokens.weight": torch.ones(4, 8), "lm_head.weight": torch.zeros(4, 8)},
        str(path / "model.safetensors"),
    )
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}')
    (path / "tokenizer_config.json").write_text("{}")
    (path / "generation_config.json").write_text("{}")
    (path / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return path


@pytest.mark.parametrize("name", ["tiny-random", "khop-huginn"])
def test_round_trip_loads_exactly_what_was_saved(name, tmp_path):
    model = ll.load(f"zoo:{name}")
    out = save_checkpoint(model, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    assert listing(out) == PLAIN
    assert (out / "loop_config.json").read_text() == model.cfg.to_json() + "\n"  # the plain layout older loaders read
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "loop_lens"}
    assert differences(load_strict(out), model) == []


def test_new_and_empty_folders_are_fine(tmp_path):
    model = version_b()
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new" / "nested" / "dir"):
        save_checkpoint(model, target)
        assert listing(target) == PLAIN and differences(load_strict(target), model) == []


def test_saving_without_tokenizer_over_a_save_with_one_leaves_no_tokenizer(tmp_path):
    save_checkpoint(ll.load("zoo:tiny-random"), tmp_path)
    model = version_b()
    model.tokenizer = None
    save_checkpoint(model, tmp_path)
    assert listing(tmp_path) == ["loop_config.json", "model.safetensors"]
    loaded = load_strict(tmp_path)
    assert loaded.tokenizer is None and differences(loaded, model) == []


def test_saving_over_an_older_layout_save_needs_no_overwrite(tmp_path):
    for name in PLAIN:  # the zoo's layout, written before saves were atomic
        shutil.copy(zoo.zoo_path("tiny-random") / name, tmp_path / name)
    model = version_b()
    save_checkpoint(model, tmp_path)
    assert listing(tmp_path) == PLAIN and differences(load_strict(tmp_path), model) == []


def foreign_hf(path: Path) -> tuple[Path, list[str]]:
    return hf_folder(path), ["config.json", "generation_config.json", "tokenizer_config.json"]


def foreign_notes(path: Path) -> tuple[Path, list[str]]:
    path.mkdir()
    (path / "notes.txt").write_text("my thesis, chapter 3")
    return path, ["notes.txt"]


def foreign_card_next_to_save(path: Path) -> tuple[Path, list[str]]:
    save_checkpoint(ll.load("zoo:tiny-random"), path)
    (path / "card.json").write_text("{}")
    return path, ["card.json"]


def foreign_config(path: Path) -> tuple[Path, list[str]]:
    path.mkdir()
    (path / "loop_config.json").write_text('{"colour": "blue"}')
    (path / "model.safetensors").write_bytes(b"not ours")
    return path, ["loop_config.json", "model.safetensors", "unknown LoopConfig fields"]


@pytest.mark.parametrize("make", [foreign_hf, foreign_notes, foreign_card_next_to_save, foreign_config])
def test_a_foreign_folder_is_refused_and_left_untouched(make, tmp_path):
    path, named = make(tmp_path / "target")
    before = snapshot(path)
    with pytest.raises(SaveError, match="overwrite=True") as err:
        save_checkpoint(version_b(), path)
    assert str(path) in str(err.value) and all(name in str(err.value) for name in named)
    with pytest.raises(SaveError) as checked:  # the check the CLI runs before loading anything
        check_save_target(path)
    assert str(checked.value) == str(err.value)
    assert snapshot(path) == before


def test_the_check_before_a_save_names_what_an_overwrite_would_delete(tmp_path):
    path, _ = foreign_hf(tmp_path / "hf")
    before = snapshot(path)
    assert check_save_target(path, overwrite=True) == sorted(before)
    assert check_save_target(tmp_path / "missing") == [] and snapshot(path) == before


def test_a_file_is_refused_as_a_folder(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"precious")
    for target in (path, path / "sub"):
        with pytest.raises(SaveError, match=f"{re.escape(str(path))} is a file, not a folder"):
            save_checkpoint(version_b(), target, overwrite=True)
        with pytest.raises(SaveError, match=f"{re.escape(str(path))} is a file, not a folder"):
            check_save_target(target, overwrite=True)
    assert snapshot(tmp_path) == {"weights.bin": hashlib.sha256(b"precious").hexdigest()}


def test_a_folder_with_subfolders_is_refused_even_with_overwrite(tmp_path):
    path = hf_folder(tmp_path / "clone")
    (path / ".git").mkdir()
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    before = snapshot(path)
    with pytest.raises(SaveError, match=r"holds folders \['.git'\]"):
        save_checkpoint(version_b(), path, overwrite=True)
    assert snapshot(path) == before


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_overwrite_turns_a_transformers_folder_into_one_whole_checkpoint(with_tokenizer, tmp_path):
    path = hf_folder(tmp_path / "hf")
    model = version_b()
    if not with_tokenizer:
        model.tokenizer = None
    save_checkpoint(model, path, overwrite=True)
    assert listing(path) == (PLAIN if with_tokenizer else PLAIN[:2])  # no config.json, no foreign tokenizer
    assert differences(load_strict(path), model) == []


def test_overwrite_removes_foreign_files_next_to_an_earlier_save(tmp_path):
    path, _ = foreign_card_next_to_save(tmp_path / "ckpt")
    model = version_b()
    save_checkpoint(model, path, overwrite=True)
    assert listing(path) == PLAIN and differences(load_strict(path), model) == []


def failing_at(monkeypatch, name: str, n: int) -> None:
    """Make the n-th call of os.<name> fail as a full disk does."""
    real, calls = getattr(os, name), []

    def fail(*args, **kwargs):
        calls.append(args)
        if len(calls) == n + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, fail)


# Before the commit a save syncs the new weights, the new tokenizer, the folder and the new config,
# then renames that config into place.
@pytest.mark.parametrize(
    "name,n", [("fsync", 0), ("fsync", 1), ("fsync", 2), ("fsync", 3), ("replace", 0), ("write", 0)]
)
def test_a_failure_before_the_switch_leaves_the_folder_as_it_was(name, n, tmp_path, monkeypatch):
    old = ll.load("zoo:tiny-random")
    save_checkpoint(old, tmp_path / "ckpt")
    before = snapshot(tmp_path)
    for target in (tmp_path / "ckpt", tmp_path / "new" / "nested"):
        failing_at(monkeypatch, name, n)
        with pytest.raises(SaveError, match=f"could not save to {re.escape(str(target))}: .*No space left on device"):
            save_checkpoint(version_b(), target)
        monkeypatch.undo()
    assert snapshot(tmp_path) == before and listing(tmp_path) == [
        "ckpt"
    ]  # no 0-byte config, no half files, no new folder
    assert differences(load_strict(tmp_path / "ckpt"), old) == []


def test_without_hard_links_the_checkpoint_keeps_its_fresh_names_and_loads_the_same(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    model = version_b()
    save_checkpoint(ll.load("zoo:tiny-random"), tmp_path)
    save_checkpoint(model, tmp_path)
    names = listing(tmp_path)
    files = json.loads((tmp_path / "loop_config.json").read_text())[FILES_KEY]
    assert names == sorted(["loop_config.json", files["weights"], files["tokenizer"]])
    assert re.fullmatch(r"model\.[0-9a-f]{16}\.safetensors", files["weights"])
    assert differences(load_strict(tmp_path), model) == []
    monkeypatch.undo()
    save_checkpoint(model, tmp_path)  # a save in that layout is our own: no overwrite needed
    assert listing(tmp_path) == PLAIN and differences(load_strict(tmp_path), model) == []


def test_leftovers_of_an_interrupted_save_are_ignored_then_removed(tmp_path):
    model = version_b()
    save_checkpoint(model, tmp_path)
    (tmp_path / "model.0123456789abcdef.safetensors").write_bytes(b"\x08\x00\x00")  # cut off mid-write
    (tmp_path / ".loop_config.0123456789abcdef.tmp").write_text("")
    assert differences(load_strict(tmp_path), model) == []
    save_checkpoint(model, tmp_path)
    assert listing(tmp_path) == PLAIN


@pytest.mark.parametrize(
    "files,message",
    [
        (
            {"weights": "../outside.safetensors", "tokenizer": None},
            r"__files__\.weights must be a file name inside the checkpoint folder, got '\.\./outside\.safetensors'",
        ),
        (
            {"weights": "model.safetensors", "tokenizer": "/etc/passwd"},
            r"__files__\.tokenizer must be a file name .* got '/etc/passwd'",
        ),
        (
            {"weights": "gone.safetensors", "tokenizer": None},
            r"names weights file 'gone\.safetensors', which is not a file",
        ),
        ({"weights": "model.safetensors"}, r"must be an object with keys 'weights' and 'tokenizer'"),
    ],
)
def test_a_config_naming_files_outside_the_checkpoint_is_refused(files, message, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ll.load("zoo:tiny-random"), ckpt)
    shutil.copy(ckpt / "model.safetensors", tmp_path / "outside.safetensors")
    config = json.loads((ckpt / "loop_config.json").read_text())
    (ckpt / "loop_config.json").write_text(json.dumps({**config, FILES_KEY: files}))
    with pytest.raises(LoadError, match=message):
        ll.load(ckpt)


def test_a_transformers_fast_tokenizer_is_saved_as_its_backend(tmp_path):
    from transformers import PreTrainedTokenizerFast

    model = version_b()
    backend = model.tokenizer
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    save_checkpoint(model, tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == model.tokenizer.backend_tokenizer.to_str()
    assert load_strict(tmp_path).tokenizer.to_str() == model.tokenizer.backend_tokenizer.to_str()


def test_a_tokenizer_that_cannot_be_written_is_named_in_a_warning(tmp_path):
    class SlowTokenizer:
        pass

    model = version_b()
    model.tokenizer = SlowTokenizer()
    with pytest.warns(UserWarning, match="SlowTokenizer cannot be written as tokenizer.json"):
        save_checkpoint(model, tmp_path)
    assert listing(tmp_path) == PLAIN[:2] and load_strict(tmp_path).tokenizer is None


# The crash test. A helper process loads the versions once, then forks one child per save; the child
# prints a line before each file-system step of the save and sleeps a little there, and the test
# kills it with SIGKILL after a chosen step plus a random delay. Forking keeps each try cheap.
SAVER = r"""
import os, re, sys, time, traceback
import torch
torch.set_num_threads(1)
import loop_lens as ll
from loop_lens.saving import save_checkpoint

target, pause = sys.argv[1], float(sys.argv[2])
models = {name: ll.load(path) for name, path in zip(("a", "btok", "bnotok"), sys.argv[3:6])}
print("ready", flush=True)


def marked(name, real, label):
    def step(*args, **kwargs):
        print(f"step {name} {re.sub('[0-9a-f]{16}', '*', label(args))}", flush=True)
        time.sleep(pause)
        return real(*args, **kwargs)
    return step


def instrument():
    opened = {}
    real_open = os.open

    def open_(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        opened[fd] = os.path.basename(os.fspath(path)) or "."
        return fd

    os.open = open_
    os.fsync = marked("fsync", os.fsync, lambda a: opened.get(a[0], "?"))
    for name in ("replace", "link"):
        setattr(os, name, marked(name, getattr(os, name), lambda a: os.path.basename(os.fspath(a[1]))))
    os.unlink = marked("unlink", os.unlink, lambda a: os.path.basename(os.fspath(a[0])))


for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            print(f"child {os.getpid()}", flush=True)
            instrument()
            save_checkpoint(models[line.split()[1]], target)
            print("done", flush=True)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
    print(f"exit {os.waitpid(pid, 0)[1]}", flush=True)
"""


class Lines:
    """Lines from a pipe, with a timeout so a stuck helper fails the test instead of hanging it."""

    def __init__(self, stream):
        self.fd, self.buffer = stream.fileno(), b""

    def next(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no output from the saving process for {timeout}s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"the saving process ended; last output {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def run_save(proc, lines: Lines, which: str, kill_after: int | None, delay: float) -> tuple[list[str], bool]:
    """Save version `which` in a fresh child; SIGKILL it `delay` s after its `kill_after`-th step.
    Returns the steps it announced and whether the save finished."""
    proc.stdin.write(f"go {which}\n".encode())
    proc.stdin.flush()
    steps, finished, pid, other = [], False, None, []
    while True:
        line = lines.next()
        if line.startswith("exit "):
            break
        if line.startswith("child "):
            pid = int(line.split()[1])
        elif line.startswith("step "):
            steps.append(line[5:])
        elif line == "done":
            finished = True
        else:
            other.append(line)
        if kill_after is not None and len(steps) == kill_after and line.startswith("step "):
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            kill_after = None
    assert not other, "\n".join(other)
    status = int(line.split()[1])
    assert finished == (status == 0) and (
        finished or os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    ), status
    return steps, finished


def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_checkpoint(tmp_path):
    versions = {"a": ll.load("zoo:tiny-random"), "btok": version_b(), "bnotok": version_b()}
    versions["bnotok"].tokenizer = None
    sources = [
        zoo.zoo_path("tiny-random"),
        save_checkpoint(versions["btok"], tmp_path / "btok"),
        save_checkpoint(versions["bnotok"], tmp_path / "bnotok"),
    ]
    target = tmp_path / "target"
    target.mkdir()
    for name in PLAIN:  # version A in the older layout the zoo ships
        shutil.copy(zoo.zoo_path("tiny-random") / name, target / name)
    pause = 0.006
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(target), str(pause), *map(str, sources)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        lines = Lines(proc.stdout)
        assert lines.next(timeout=120) == "ready"
        rng = random.Random(17)
        current, outcomes, last_steps, mid_save, manifest_states = "a", {"old": 0, "new": 0}, set(), 0, 0
        phases = [0, 0, 0]  # kills by how many config renames the child had announced: 0, 1 or 2
        # Finished saves first: they show how many steps a save takes besides one deletion per old file.
        fixed_steps = {}
        for which in ("btok", "bnotok", "a"):
            n_old = len(listing(target)) - 1
            steps, finished = run_save(proc, lines, which, None, 0)
            assert finished and differences(load_strict(target), versions[which]) == []
            fixed_steps[which], current = len(steps) - n_old, which
        tries = 32
        for i in range(tries):  # kills spread evenly over the steps of a save, each after a random delay
            which = rng.choice([v for v in versions if v != current])
            n_steps = fixed_steps[which] + len(listing(target)) - 1
            steps, finished = run_save(
                proc, lines, which, math.ceil((i + 0.5) / tries * n_steps), rng.uniform(0, 1.5 * pause)
            )
            mid_save += not finished
            if not finished:
                last_steps.add(steps[-1])
                phases[min(steps.count("replace loop_config.json"), 2)] += 1
            manifest_states += FILES_KEY in json.loads((target / "loop_config.json").read_text())
            loaded = load_strict(target)  # never an error, never a stray tensor
            match = [v for v in (current, which) if not differences(loaded, versions[v])]
            assert match, (
                f"after a kill at {steps[-1:]} the folder {listing(target)} loads as neither {current} nor {which}"
            )
            outcomes["new" if match[0] == which else "old"] += 1
            current = match[0]
        steps, finished = run_save(proc, lines, "btok", None, 0)  # leftovers of the kills are our own: no overwrite
        assert finished and listing(target) == PLAIN and differences(load_strict(target), versions["btok"]) == []
    finally:
        proc.kill()
        proc.wait()
    # The kills landed inside the save, on both sides of the switch, at many different steps.
    assert mid_save >= 0.8 * tries, mid_save
    assert min(outcomes.values()) >= 4, outcomes
    assert manifest_states >= 3, manifest_states
    assert min(phases) >= 3 and len(last_steps) >= 6, (phases, sorted(last_steps))
