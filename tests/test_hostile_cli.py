"""Issue 25, the command line and the files it writes (each test failed before its fix)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil

import pytest
from conftest import golden
from hostile import hashes

import loop_lens as ll
from loop_lens.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def no_compute(monkeypatch):
    import loop_lens.report

    def never(*args, **kwargs):
        raise AssertionError("the report was computed")

    monkeypatch.setattr(loop_lens.report, "build_report", never)


def _hub_snapshot(tmp_path):
    """A hub-cache repo: snapshots/<rev>/<name> -> ../../blobs/<sha>."""
    repo = tmp_path / "models--x--y"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in golden("huginn-tiny").iterdir():
        if f.name.startswith("expected"):
            continue
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snap / f.name).symlink_to(f"../../blobs/{sha}")
    return repo, snap


def _all_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_outputs_into_a_hub_cache_snapshot_are_refused(capsys, tmp_path, no_compute):  # defect 2
    repo, snap = _hub_snapshot(tmp_path)
    before = _all_bytes(repo)
    for flag, name in (("--out", "config.json"), ("--json", "model.safetensors"), ("--out", "new.html")):
        args = ["report", str(snap), "--prompts", "ab", "--out", str(tmp_path / "r.html")]
        args[args.index("--out") if flag == "--out" else len(args):] = [flag, str(snap / name)] if flag == "--out" else []
        if flag == "--json":
            args += ["--json", str(snap / name)]
        code, _, err = run(capsys, *args)
        assert code == 1 and "inside the checkpoint" in err, err
    assert _all_bytes(repo) == before


def test_a_new_file_inside_a_checkpoint_is_refused(capsys, tmp_path, no_compute):  # defect 3
    hf = tmp_path / "hf"
    shutil.copytree(golden("huginn-tiny"), hf)
    before = hashes(hf)
    for flag, name in (("--json", "loop_config.json"), ("--out", "pytorch_model.bin"), ("--out", "sub.html")):
        extra = ["--out", str(tmp_path / "r.html")] if flag == "--json" else []
        code, _, err = run(capsys, "report", str(hf), "--prompts", "ab", *extra, flag, str(hf / name))
        assert code == 1 and "inside the checkpoint" in err, err
    assert hashes(hf) == before
    code, _, err = run(capsys, "convert", "zoo:tiny-random", str(tmp_path / "n"))
    assert code == 0
    code, _, err = run(capsys, "convert", str(tmp_path / "n"), str(tmp_path / "n" / "inner"))
    assert code == 1 and "inside the checkpoint" in err


@pytest.mark.parametrize("kind", ["fifo", "device", "link-to-fd", "link-to-file"])
def test_special_output_paths_are_never_replaced(capsys, tmp_path, no_compute, kind):  # defect 4
    target = tmp_path / "out.html"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        target = "/dev/null"
    elif kind == "link-to-fd":
        target.symlink_to("/proc/self/fd/1")
    else:
        (tmp_path / "real.html").write_text("mine")
        target.symlink_to(tmp_path / "real.html")
    for flag in ("--out", "--json"):
        extra = ["--out", str(tmp_path / "r.html")] if flag == "--json" else []
        code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts", "ab", *extra, flag, str(target))
        assert code == 1 and ("FIFO" in err or "device" in err or "symbolic link" in err), err
    if kind != "device":
        assert os.path.islink(target) or not os.path.isfile(target) or kind == "fifo"
    with pytest.raises(ll.SaveError):
        from loop_lens.report import Report
        Report({"model": "m"}).save(target)


def _sweep(capsys, out, *extra, prompts=None):
    return run(capsys, "sweep", "zoo:tiny-random", "--prompts", str(prompts), "--out", str(out), "--n-loops", "2",
               "--quiet", *extra)


def test_sweep_never_replaces_files_it_did_not_write(capsys, tmp_path):  # defect 5 + summary.json message
    prompts = tmp_path / "p.txt"
    prompts.write_text("a b\nc d\n")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("sweep.parquet", "heads.parquet"):
        (out / name).write_text("my own table")
        code, _, err = _sweep(capsys, out, prompts=prompts)
        assert code == 1 and name in err and "not a sweep" in err, err
        assert (out / name).read_text() == "my own table"
        (out / name).unlink()
    (out / "summary.json").write_text('{"mine": true}')
    code, _, err = _sweep(capsys, out, prompts=prompts)
    assert code == 1 and "not the summary of a loop_lens sweep" in err and "other settings" not in err
    assert (out / "summary.json").read_text() == '{"mine": true}'
    (out / "summary.json").unlink()
    assert _sweep(capsys, out, prompts=prompts)[0] == 0
    shutil.copy(prompts, out / "sweep.parquet")
    table = (out / "sweep.parquet").read_bytes()
    code, _, err = _sweep(capsys, out, "--force", prompts=out / "sweep.parquet")
    assert code == 1 and "destroy its input" in err and (out / "sweep.parquet").read_bytes() == table


def test_a_second_sweep_into_a_held_folder_says_another_sweep_holds_it(capsys, tmp_path):  # unclear error
    prompts = tmp_path / "p.txt"
    prompts.write_text("a b\n")
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _sweep(capsys, out, prompts=prompts)
    finally:
        os.close(fd)
    assert code == 1 and "another sweep" in err
    assert _sweep(capsys, out, prompts=prompts)[0] == 0


@pytest.mark.parametrize("command", ["generate", "report"])
def test_nan_thresholds_and_negative_seeds_are_refused_on_the_command_line(capsys, tmp_path, command, no_compute):  # 9, 10
    base = ["generate", "zoo:tiny-random", "--prompt", "ab"] if command == "generate" else \
        ["report", "zoo:tiny-random", "--prompts", "ab", "--out", str(tmp_path / "r.html"), "--generate", "2"]
    code, _, err = run(capsys, *base, "--adaptive", "kl", "--threshold", "nan")
    assert code == 1 and "--threshold" in err and "finite" in err
    code, _, err = run(capsys, *base, "--seed", "-1")
    assert code == 1 and "--seed" in err


def test_generate_never_prints_raw_terminal_escapes(capsys, tmp_path):  # unclear error
    from hostile import word_tokenizer

    model = ll.load("zoo:tiny-random")
    model.tokenizer = word_tokenizer([f"\x1b]0;pwn{i}\x07\x1b[2J" for i in range(64)])
    model.save(tmp_path / "m")
    code, out, err = run(capsys, "generate", str(tmp_path / "m"), "--prompt", "\x1b]0;pwn1\x07\x1b[2J", "--max-new-tokens",
                         "3", "--quiet")
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out
    code, out, err = run(capsys, "generate", "zoo:tiny-random", "--prompt", "zz\x1b[2J", "--quiet")
    assert code == 1 and "\x1b" not in err


def test_deeply_nested_or_huge_number_prompt_files_are_input_errors(capsys, tmp_path, no_compute):  # unclear error
    for text in ("[" * 5000 + "]" * 5000, "[" + "1" * 5000 + "]"):
        path = tmp_path / "p.json"
        path.write_text(text)
        code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts-file", str(path), "--out", str(tmp_path / "r.html"))
        assert code == 1 and "p.json" in err and "internal error" not in err, err
