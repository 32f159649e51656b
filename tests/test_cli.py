"""`loop-lens` commands: each success path and the errors a shell user meets."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import golden

import loop_lens as ll
from loop_lens.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_prints_layout_and_hook_names(capsys):
    code, out, _ = run(capsys, "inspect", str(golden("huginn-tiny")))
    assert code == 0
    assert "(1, 2 x 4, 1)" in out and "huginn" in out and "iter.0.blocks.1.attn.hook_pattern" in out
    code, out, _ = run(capsys, "inspect", "zoo:tiny-random", "--json")
    info = json.loads(out)
    assert code == 0 and info["layout"] == "(1, 2 x 4, 1)" and "iter.0.hook_state_post" in info["hook_names_iter0"]


def test_inspect_missing_model_fails_with_a_message(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing"))
    assert code == 1 and "does not exist" in err
    code, _, err = run(capsys, "inspect", "zoo:nope")
    assert code == 1 and "no zoo model 'nope'" in err and "tiny-random" in err


def test_convert_writes_native_format_that_loads_identically(capsys, tmp_path):
    code, out, _ = run(capsys, "convert", str(golden("ouro-tiny")), str(tmp_path / "native"))
    assert code == 0 and "wrote ouro" in out
    tokens = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ll.load(tmp_path / "native")(tokens), ll.load(golden("ouro-tiny"))(tokens))
    code, _, err = run(capsys, "convert", str(golden("ouro-tiny")), str(tmp_path / "native"))
    assert code == 1 and "not empty" in err


def test_zoo_list(capsys):
    code, out, _ = run(capsys, "zoo", "list")
    assert code == 0 and "zoo:tiny-random" in out
    card = ll.zoo.card("khop-ouro")
    line = next(ln for ln in out.splitlines() if "held-out accuracy at T=4" in ln)  # the line under khop-ouro
    assert f"3 hops {card['heldout_accuracy']['k=3,T=4']:.3f}" in line


def test_help_and_bad_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "report" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_report_writes_html_and_json(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("jhdeibacgf|a3=\nbcdefghija|c2=\n")
    code, out, _ = run(capsys, "report", "zoo:tiny-random", "--prompts", str(prompts), "--n-loops", "6",
                       "--out", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json"), "--quiet")
    assert code == 0 and "wrote" in out
    numbers = json.loads((tmp_path / "r.json").read_text())
    assert numbers["meta"]["layout"].startswith("(1, 2 x 4, 1)") and len(numbers["head_stability"]) == 8
    assert "--n-loops 6" in numbers["meta"]["command"] and numbers["meta"]["loop_lens"] == ll.__version__
    page = (tmp_path / "r.html").read_text()
    assert "Head stability" in page and "CircuitsVis" in page
    markup = re.sub(r"<script>.*?</script>", "", page, flags=re.S)  # the inlined bundles' own strings aside
    assert "<script>" in page and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", markup)
    assert 'from "https://unpkg.com' not in page  # circuitsvis inlined, not imported from its CDN


def test_report_errors(capsys, tmp_path):
    out = str(tmp_path / "r.html")
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts", str(tmp_path / "none.txt"), "--out", out)
    assert code == 1 and "prompts file" in err and "does not exist" in err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts", str(bad), "--out", out)
    assert code == 1 and "not valid JSON" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts", str(empty), "--out", out)
    assert code == 1 and "holds no prompts" in err
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts", "ab|a1=", "--out", str(tmp_path / "no" / "r.html"))
    assert code == 1 and "does not exist" in err and not (tmp_path / "no").exists()
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts", "ab|a1=", "--out", str(tmp_path))
    assert code == 1 and "is a directory" in err
    code, _, err = run(capsys, "report", str(tmp_path / "missing"), "--prompts", "ab", "--out", out)
    assert code == 1 and "does not exist" in err
    code, _, err = run(capsys, "report", str(golden("huginn-tiny")), "--prompts", "ab", "--out", out)
    assert code == 1 and "carries no tokenizer" in err
    assert not (tmp_path / "r.html").exists()
