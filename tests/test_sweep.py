"""`run_sweep` / `loop-lens sweep`: the table's content, resuming, refusals, and the torchrun runs
(2 CPU ranks on gloo equal to one process; a killed rank fails the run and the rerun resumes)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import loop_lens as ll
from loop_lens.analysis.streaming import stream_analyses
from loop_lens.errors import SaveError
from loop_lens.sweep import HEADS, PARTS, SUMMARY, TABLE, load_sweep, run_sweep

MODEL = "zoo:khop-huginn"
T, BATCH = 48, 2  # long enough that a rank can be killed between its parts


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghij"
    return [" ".join(rng.choice(letters) for _ in range(rng.randint(5, 18))) + f" | {rng.choice(letters)} 2 ="
            for _ in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return ll.load(MODEL)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(_prompts(16)) + "\n")
    return path


def _cli(*args: str, torchrun: int = 0, **popen) -> subprocess.Popen:
    """`loop-lens sweep ...` in a fresh process, under torchrun with `torchrun` CPU ranks when > 0."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun),
                "-m", "loop_lens.cli"] if torchrun else [sys.executable, "-m", "loop_lens.cli"]
    return subprocess.Popen([*launcher, "sweep", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Exit code and output of a process; it is stopped (with its ranks) when it overruns."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its ranks
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"timed out after {timeout} s:\n{(out + err)[-2000:]}") from None
    return proc.returncode, out + err


@pytest.fixture(scope="module")
def single(prompt_file, tmp_path_factory) -> Path:
    """The single-process sweep (plain `loop-lens sweep`, no torchrun)."""
    out = tmp_path_factory.mktemp("single") / "sweep"
    code, log = _finish(_cli(MODEL, "--prompts", str(prompt_file), "--n-loops", str(T), "--out", str(out),
                             "--batch-size", str(BATCH), "--quiet"))
    assert code == 0, log
    return out


def assert_same_sweep(a: Path, b: Path) -> None:
    """Both tables equal to 1e-6 (NaN where the other has NaN), the summaries' results equal."""
    for name in (TABLE, HEADS):
        x, y = pd.read_parquet(a / name), pd.read_parquet(b / name)
        assert list(x.columns) == list(y.columns) and len(x) == len(y)
        for column in x.columns:
            if x[column].dtype.kind == "f":
                np.testing.assert_allclose(x[column].to_numpy(), y[column].to_numpy(), rtol=1e-6, atol=1e-6, equal_nan=True)
            else:
                assert x[column].tolist() == y[column].tolist(), column
    sa, sb = (json.loads((p / SUMMARY).read_text()) for p in (a, b))
    assert sa["results"] == sb["results"]
    assert sa["run"]["fingerprint"] == sb["run"]["fingerprint"]


def test_table_matches_stream_analyses_per_prompt(model, single, prompt_file):
    """Each prompt's rows are `stream_analyses` of that prompt alone (its last token for the lens)."""
    result = load_sweep(single)
    table = result.table
    prompts = prompt_file.read_text().splitlines()
    assert len(table) == 16 * T * model.cfg.n_block
    assert len(result.heads) == 16 * model.cfg.n_block * model.cfg.n_heads
    assert table.groupby("prompt").size().eq(T * model.cfg.n_block).all()
    for i in (0, 5, 11):
        tokens, mask = model.tokenize([prompts[i]])
        r = stream_analyses(model, tokens, n_loops=T, attention_mask=mask, lens_positions=(-1,), seed=0)
        rows = table[table["prompt"] == i].sort_values(["iteration", "layer"])
        assert rows["n_tokens"].iloc[0] == tokens.shape[1]
        np.testing.assert_allclose(rows["relative_step"], r.steps.relative[:, :, 0].reshape(-1), rtol=1e-4, atol=1e-5, equal_nan=True)
        np.testing.assert_allclose(rows["change_js"], r.attention.change_js[:, :, 0].mean(-1).reshape(-1), rtol=1e-4, atol=1e-5, equal_nan=True)
        assert rows["lens_top1"].tolist() == r.lens_top1[:, :, 0, 0].reshape(-1).tolist()
        assert rows["converged_at"].iloc[0] == int(r.steps.convergence_iteration(1e-3)[0, 0])
        assert rows["lens_token"].iloc[-1] == model.to_str_tokens([int(r.lens_top1[-1, -1, 0, 0])])[0]
    summary = result.summary
    assert summary["run"]["n_prompts"] == 16 and summary["run"]["world_size"] == 1
    assert summary["results"]["lens_agrees_with_final_answer"][-1] == 1.0
    assert len(summary["results"]["per_head"]) == model.cfg.n_block * model.cfg.n_heads
    assert not (single / PARTS).exists()  # parts are gone once merged


def test_torchrun_two_ranks_equals_single_process(single, prompt_file, tmp_path):
    out = tmp_path / "sweep"
    code, log = _finish(_cli(MODEL, "--prompts", str(prompt_file), "--n-loops", str(T), "--out", str(out),
                             "--batch-size", str(BATCH), "--quiet", torchrun=2))
    assert code == 0, log
    assert json.loads((out / SUMMARY).read_text())["run"]["world_size"] == 2
    assert_same_sweep(single, out)


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of a torchrun worker of this launcher with RANK=`rank`, if it has started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, seen = [launcher], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(children.get(pid, []))
    for pid in seen[1:]:
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"".join(env):
            return pid
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process through /proc")
def test_killed_rank_fails_the_run_and_the_rerun_resumes(single, prompt_file, tmp_path):
    out = tmp_path / "sweep"
    args = (MODEL, "--prompts", str(prompt_file), "--n-loops", str(T), "--out", str(out), "--batch-size", str(BATCH), "--quiet")
    proc = _cli(*args, torchrun=2)
    deadline = time.time() + 90
    parts: list[Path] = []
    while time.time() < deadline and proc.poll() is None and not parts:
        parts = list((out / PARTS).glob("*/*[0-9].parquet")) if (out / PARTS).is_dir() else []
        time.sleep(0.01)
    victim = _rank_pid(proc.pid, 1)
    assert parts and victim is not None, "the run ended before a part was written; nothing to kill"
    os.kill(victim, signal.SIGKILL)
    code, log = _finish(proc)
    assert code != 0
    assert "FAILED" in log or "failed" in log.lower(), log[-2000:]
    assert not (out / SUMMARY).exists() and not (out / TABLE).exists() and not (out / HEADS).exists()
    left = sorted(p.name for p in (out / PARTS).glob("*/*[0-9].parquet"))
    assert 1 <= len(left) < 8  # some chunks were done, not all
    code, log = _finish(_cli(*args, torchrun=2))
    assert code == 0, log
    assert json.loads((out / SUMMARY).read_text())["run"]["resumed_chunks"] == len(left)
    assert_same_sweep(single, out)


def test_rerun_of_a_finished_sweep_returns_it_and_other_settings_are_refused(model, tmp_path):
    prompts = _prompts(4, seed=1)
    first = run_sweep(model, prompts, 3, tmp_path, batch_size=3, progress=False)
    assert first.summary["run"]["n_chunks"] == 2 and first.summary["run"]["resumed_chunks"] == 0
    stamp = (tmp_path / TABLE).stat().st_mtime_ns
    again = run_sweep(model, prompts, 3, tmp_path, batch_size=3, progress=False)
    assert (tmp_path / TABLE).stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(first.table, again.table)
    with pytest.raises(SaveError, match="other settings"):
        run_sweep(model, prompts, 4, tmp_path, batch_size=3, progress=False)
    replaced = run_sweep(model, prompts, 4, tmp_path, batch_size=3, progress=False, overwrite=True)
    assert replaced.table["iteration"].max() == 3
    figure = replaced.plot("relative_step")
    assert len(figure.data) == model.cfg.n_block  # one line per layer
    with pytest.raises(ValueError, match="value must be one of"):
        replaced.plot("prompt")


def test_parts_on_disk_are_reused_and_a_table_without_summary_is_removed(model, tmp_path):
    prompts = _prompts(4, seed=2)
    reference = run_sweep(model, prompts, 3, tmp_path / "ref", batch_size=2, progress=False)
    out = tmp_path / "out"
    run_sweep(model, prompts, 3, out, batch_size=2, progress=False)
    # a crashed run: one part written, and a stale table without a summary
    fingerprint = json.loads((out / SUMMARY).read_text())["run"]["fingerprint"]
    part_dir = out / PARTS / fingerprint[:16]
    part_dir.mkdir(parents=True)
    first = reference.table[reference.table["prompt"] < 2]
    marked = first.copy()
    marked.loc[:, "step"] = -1.0  # marked: must be read back, not recomputed
    marked.to_parquet(part_dir / "prompts-00000000-00000002.parquet", index=False)
    reference.heads[reference.heads["prompt"] < 2].to_parquet(part_dir / "prompts-00000000-00000002.heads.parquet", index=False)
    (out / SUMMARY).unlink()
    resumed = run_sweep(model, prompts, 3, out, batch_size=2, progress=False)
    assert resumed.summary["run"]["resumed_chunks"] == 1
    assert (resumed.table[resumed.table["prompt"] < 2]["step"] == -1.0).all()  # read back, not recomputed
    pd.testing.assert_frame_equal(resumed.table[resumed.table["prompt"] >= 2].reset_index(drop=True),
                                  reference.table[reference.table["prompt"] >= 2].reset_index(drop=True))


def test_token_id_prompts_and_a_model_without_tokenizer(model, tmp_path):
    ids = [[1, 5, 7, 3], [2, 2, 9], [4, 8, 1, 6, 0]]
    result = run_sweep(model, ids, 2, tmp_path, batch_size=2, progress=False)
    assert result.table["n_tokens"].drop_duplicates().tolist() == [4, 3, 5]
    r = stream_analyses(model, torch.tensor([ids[1]]), n_loops=2, lens_positions=(-1,), seed=0)
    assert result.table[result.table["prompt"] == 1]["lens_top1"].tolist() == r.lens_top1[..., 0, 0].reshape(-1).tolist()
    tokenizer, model.tokenizer = model.tokenizer, None
    try:
        with pytest.raises(ll.LoadError, match="no tokenizer"):
            run_sweep(model, ["a b"], 2, tmp_path / "x", progress=False)
        assert run_sweep(model, ids, 2, tmp_path / "y", batch_size=2, progress=False).table["lens_token"].isna().all()
    finally:
        model.tokenizer = tokenizer


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_loops=0), "n_loops must be a positive integer"),
    (dict(n_loops=2.5), "n_loops must be a positive integer, got 2.5"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(seed="x"), "seed must be an integer"),
    (dict(tol=0.0), "tol must be a positive finite number"),
    (dict(lens="tuned"), "lens must be 'logit' or 'coda'"),
    (dict(prompts=[]), "prompts is empty"),
])
def test_bad_arguments_are_refused_before_any_compute(model, tmp_path, kwargs, match):
    call = dict(model_or_path=model, prompts=["a b"], n_loops=2, out_dir=tmp_path / "o", progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        run_sweep(**call)
    assert not (tmp_path / "o").exists()


def test_out_dir_that_is_a_file_is_refused(model, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SaveError, match="is a file"):
        run_sweep(model, ["a b"], 2, target, progress=False)


def test_cli_reports_a_missing_prompts_file(tmp_path):
    code, log = _finish(_cli(MODEL, "--prompts", str(tmp_path / "none.txt"), "--n-loops", "2", "--out", str(tmp_path / "o")))
    assert code == 1 and "does not exist" in log
