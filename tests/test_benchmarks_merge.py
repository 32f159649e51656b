"""benchmarks/results_file.py: every benchmark merges into results.json and never deletes another
benchmark's keys; the write is atomic; a bad file is refused and left as it was."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _helper():
    spec = importlib.util.spec_from_file_location("results_file", BENCH / "results_file.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_keeps_other_benchmarks_keys(tmp_path):
    """What benchmarks/run.py writes after generation.py and patching.py wrote theirs: run.py's
    ratios and figures are added, none of the others' is lost, and a key both name takes the
    newer value."""
    rf = _helper()
    path = tmp_path / "results.json"
    rf.merge_results(path, {"ratios": {"generate_speedup": 2.11, "shared": 1.0},
                            "figures": {"generation": {"speed": {"speedup": 2.11}, "model": "zoo"}}})
    rf.merge_results(path, {"patching": {"ratios": {"activation_over_attribution": 18.4}}})
    rf.merge_results(path, {"machine": "x86", "ratios": {"forward_vs_hf_llama_T1": 0.88, "shared": 2.0},
                            "figures": {"forward_T1_s": 0.1, "generation": {"speed": {"recompute_s": 3.0}}}})
    got = json.loads(path.read_text())
    assert got == {
        "ratios": {"generate_speedup": 2.11, "shared": 2.0, "forward_vs_hf_llama_T1": 0.88},
        "figures": {"generation": {"speed": {"speedup": 2.11, "recompute_s": 3.0}, "model": "zoo"}, "forward_T1_s": 0.1},
        "patching": {"ratios": {"activation_over_attribution": 18.4}},
        "machine": "x86",
    }


def test_deep_merge_changes_neither_argument_and_replaces_non_dicts():
    rf = _helper()
    old = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    new = {"a": {"c": [3]}, "d": {"e": 2}}
    out = rf.deep_merge(old, new)
    assert out == {"a": {"b": 1, "c": [3]}, "d": {"e": 2}}
    assert old == {"a": {"b": 1, "c": [1, 2]}, "d": 1} and new == {"a": {"c": [3]}, "d": {"e": 2}}


def test_bad_file_is_refused_and_left_unchanged(tmp_path):
    rf = _helper()
    path = tmp_path / "results.json"
    for text, what in (("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list")):
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + what):
            rf.merge_results(path, {"ratios": {"x": 1}})
        assert path.read_text() == text
    with pytest.raises(ValueError, match="update must be a dict"):
        rf.merge_results(tmp_path / "other.json", [("x", 1)])
    assert not (tmp_path / "other.json").exists()


def test_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """If the rename never happens (a crash after the temporary file was written), the old file is
    whole and no temporary file is left behind."""
    rf = _helper()
    path = tmp_path / "results.json"
    rf.merge_results(path, {"ratios": {"kept": 1.0}})
    before = path.read_text()

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(rf.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        rf.merge_results(path, {"ratios": {"new": 2.0}})
    assert path.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_every_benchmark_writes_through_the_helper():
    """No benchmark script writes results.json itself (the bug: run.py rewrote the whole file)."""
    scripts = sorted(p for p in BENCH.glob("*.py") if p.name != "results_file.py")
    assert scripts
    for script in scripts:
        text = script.read_text()
        if "results.json" not in text:
            continue
        assert "merge_results(" in text, f"{script.name} names results.json but does not call merge_results"
        assert not re.search(r"\.out\.write_text|open\([^)]*results\.json[^)]*['\"]w", text), \
            f"{script.name} writes results.json directly"
