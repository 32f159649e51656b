"""What a new user meets in the first hour: tolerances, skip messages, the docs' claims, generate's
text and warnings, and torch threads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import torch
from conftest import ROOT

import loop_lens as ll
from loop_lens import analysis as A


def test_close_scales_with_the_magnitude():
    torch.manual_seed(0)
    logits = 14 * torch.randn(4, 23)
    logits[0, 0] = 0.01  # an element near 0 in a tensor of magnitude 14
    other = logits.clone()
    other[0, 0] += 1.6e-5  # what another CPU's SDPA path gave
    assert not torch.allclose(other, logits, atol=1e-5)  # the old check fails on it
    assert ll.testing.close(other, logits)
    other[0, 0] += 1e-2
    assert not ll.testing.close(other, logits)


def test_examples_compare_floats_with_a_scaled_tolerance():
    bare = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.allclose(" in line and "rtol" not in line:
                bare.append(f"{path.name}:{i}")
    assert not bare, f"use ll.testing.close (tolerance scaled with magnitude): {bare}"


def test_browser_tests_skip_saying_how_to_run_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # no chromium here
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_report_browser.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "skipped" in run.stdout, run.stdout[-2000:]
    assert "apt-get install chromium chromium-driver" in run.stdout
    assert "python -m pytest tests/test_report_browser.py" in run.stdout


def test_every_notebook_is_listed():
    notebooks = sorted(p.name for p in (ROOT / "examples").glob("[0-9][0-9]_*.py"))
    for doc in ("examples/README.md", "docs/getting-started.md"):
        text = (ROOT / doc).read_text()
        missing = [n for n in notebooks if n not in text]
        assert not missing, f"{doc} does not list {missing}"


def test_getting_started_reads_the_coda_lens_where_the_model_answers():
    text = (ROOT / "docs/getting-started.md").read_text()
    block = text[text.index("## In Python"):text.index("## Notebooks")]
    assert "A.coda_lens(model, cache)" in block
    model = ll.load("zoo:khop-huginn")
    tokens, mask = model.tokenize(["b f e j i c f a j i h d a e c g d b g h | f 2 ="])
    logits, cache = model.run_with_cache(tokens, n_loops=16, attention_mask=mask, seed=0)
    answer = model.to_str_tokens([int(logits[0, -1].argmax())])[0]
    coda = A.coda_lens(model, cache)
    logit = A.logit_lens(model, cache)
    assert answer == "e" == coda.token(int(coda.log_probs[-1, 0, -1].argmax()))  # what the doc says
    assert logit.token(int(logit.top_ids[-1, -1, 0, -1, 0])) == "f"  # and why it does not show the logit lens


def test_generate_decodes_with_spaces_and_warns_about_eos_once():
    model = ll.load("zoo:khop-huginn")
    prompt = "b f e j i c f a j i h d a e c g d b g h | f 2 ="
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = model.generate(prompt, max_new_tokens=2, return_type="str", seed=0, verbose=False)
        model.generate(prompt, max_new_tokens=2, return_type="str", seed=0, verbose=False)
    assert first.startswith(prompt + " ")
    assert re.fullmatch(re.escape(prompt) + r"( \S)+", first)
    eos = [w for w in caught if "end-of-sequence" in str(w.message)]
    assert len(eos) == 1


def test_cli_and_test_suite_use_a_sane_thread_count(tmp_path):
    assert torch.get_num_threads() == int(os.environ.get("LOOP_LENS_TEST_THREADS", "1"))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOOP_LENS_THREADS")}
    code = ("import sys, torch; from loop_lens.cli import main; main(['zoo', 'list']); "
            "print('threads', torch.get_num_threads())")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    n = int(run.stdout.rsplit("threads", 1)[1])
    cores = len(os.sched_getaffinity(0))
    assert n == max(1, cores // 2) and (cores < 2 or n < cores), run.stdout[-500:]
    env["LOOP_LENS_THREADS"] = "3"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert int(run.stdout.rsplit("threads", 1)[1]) == 3
