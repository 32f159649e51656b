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
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts-file", str(tmp_path / "none.txt"), "--out", out)
    assert code == 1 and "prompts file" in err and "does not exist" in err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts", str(bad), "--out", out)
    assert code == 1 and "not valid JSON" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts-file", str(empty), "--out", out)
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


def test_an_inline_prompt_with_a_slash_is_a_prompt_not_a_path(capsys, tmp_path):
    code, out, err = run(capsys, "report", "zoo:tiny-random", "--prompts", "what is 3/4 ?", "--n-loops", "2",
                         "--out", str(tmp_path / "r.html"), "--quiet")
    assert code == 1 and "does not exist" not in err and "not in the tokenizer's vocabulary: ['/', '?'" in err
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").write_text("ab|a1=\n")  # a/b exists as a file here: then it is a file
    code, out, err = run(capsys, "report", "zoo:tiny-random", "--prompts", str(tmp_path / "a" / "b"), "--n-loops", "2",
                         "--out", str(tmp_path / "r.html"), "--quiet")
    assert code == 0, err
    code, out, err = run(capsys, "report", "zoo:tiny-random", "--prompts", str(tmp_path / "a"), "--out", str(tmp_path / "r.html"))
    assert code == 1 and "is a directory" in err


def test_a_prompt_longer_than_a_file_name_can_be_is_a_prompt(capsys, tmp_path):
    """A 256-token prompt is longer than the system's 255-byte name limit: asking whether it names
    a file must not fail with ENAMETOOLONG (it did: `Path.is_file` raises there)."""
    prompt = "ab" + " " * 300 + "a1="  # 305 bytes, 6 tokens (whitespace is no token here)
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts", prompt, "--n-loops", "2",
                       "--out", str(tmp_path / "r.html"), "--quiet")
    assert code == 0, err
    assert (tmp_path / "r.html").is_file()


def _hashes(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_report_outputs_that_would_destroy_an_input_are_refused_before_any_compute(capsys, tmp_path, monkeypatch):
    import loop_lens.report

    def never(*args, **kwargs):
        raise AssertionError("the report was computed")

    monkeypatch.setattr(loop_lens.report, "build_report", never)
    ckpt = tmp_path / "ckpt"
    assert run(capsys, "convert", "zoo:tiny-random", str(ckpt))[0] == 0
    before = _hashes(ckpt)
    for name in before:
        code, _, err = run(capsys, "report", str(ckpt), "--prompts", "ab", "--out", str(ckpt / name))
        assert code == 1 and "overwrite its input" in err and name in err
    assert _hashes(ckpt) == before
    same = str(tmp_path / "x")
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts", "ab", "--out", same, "--json", same)
    assert code == 1 and "both name" in err and not (tmp_path / "x").exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("ab\n")
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts-file", str(prompts), "--out", str(prompts))
    assert code == 1 and "prompts file" in err and prompts.read_text() == "ab\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--position", "999"], "--position 999 is outside"),
        (["--position", "-999"], "is outside"),
        (["--n-loops", "0"], "n_loops must be a positive integer"),
        (["--n-loops", "-3"], "n_loops must be a positive integer"),
    ],
)
def test_report_argument_mistakes_get_one_line_and_no_traceback(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts", "ab|a1=", "--out", str(tmp_path / "r.html"),
                       "--quiet", *argv)
    assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_a_binary_prompts_file_is_named(capsys, tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    code, _, err = run(capsys, "report", "zoo:tiny-random", "--prompts-file", str(blob), "--out", str(tmp_path / "r.html"))
    assert code == 1 and str(blob) in err and ("not UTF-8" in err or "binary" in err)


def test_a_bug_prints_one_line_and_exit_code_3(capsys, monkeypatch):
    import loop_lens.cli as cli

    def broken(args):
        return 1 // 0

    monkeypatch.setattr(cli, "_inspect", broken)
    code, _, err = run(capsys, "inspect")
    assert code == 3 and "internal error: ZeroDivisionError" in err and "Traceback" not in err


def test_convert_refuses_to_write_over_its_own_source(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run(capsys, "convert", "zoo:tiny-random", str(ckpt))[0] == 0
    before = _hashes(ckpt)
    code, _, err = run(capsys, "convert", str(ckpt), str(ckpt), "--force")
    assert code == 1 and "is the checkpoint being converted" in err and _hashes(ckpt) == before


def test_report_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from loop_lens.files import write_text_atomic

    fresh = write_text_atomic(tmp_path / "new.html", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    kept = tmp_path / "kept.html"
    kept.write_text("old")
    kept.chmod(0o640)
    write_text_atomic(kept, "new")
    assert kept.read_text() == "new" and stat.S_IMODE(kept.stat().st_mode) == 0o640


def test_report_states_the_prediction_and_reads_states_through_the_coda(capsys, tmp_path):
    prompt = "b f e j i c f a j i h d a e c g d b g h | f 2 ="
    code, _, err = run(capsys, "report", "zoo:khop-huginn", "--prompts", prompt, "--n-loops", "4",
                       "--out", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json"), "--quiet")
    assert code == 0, err
    numbers = json.loads((tmp_path / "r.json").read_text())
    model = ll.load("zoo:khop-huginn")
    expected = int(model(prompt, n_loops=4, seed=0)[0, -1].argmax())
    assert numbers["prediction"]["token_id"] == expected and numbers["prediction"]["token"] == "e"
    # the coda lens of the last iteration's last layer is the model's own output
    assert numbers["lens"] == "coda" and numbers["lens_top1"][-1][-1] == expected
    assert "The model predicts &#39;e&#39;" in (tmp_path / "r.html").read_text()


def test_report_with_patching_and_compute_per_generated_token(capsys, tmp_path):
    clean, corrupt = "b f e j i c f a j i h d a e c g d b g h | f 2 =", "b f e j i c f a j i h d a e c g d b g h | f 1 ="
    code, _, err = run(capsys, "report", "zoo:khop-huginn", "--prompts", clean, "--corrupt", corrupt, "--generate", "3",
                       "--adaptive", "kl", "--threshold", "0.01", "--n-loops", "4", "--out", str(tmp_path / "r.html"),
                       "--json", str(tmp_path / "r.json"), "--quiet")
    assert code == 0, err
    numbers = json.loads((tmp_path / "r.json").read_text())
    model = ll.load("zoo:khop-huginn")
    gen = model.generate(clean, max_new_tokens=3, n_loops=4, seed=0, adaptive="kl", threshold=0.01, return_type="result",
                         verbose=False, stop_at_eos=False)
    assert numbers["generation"]["tokens"] == gen.generated[0].tolist()
    assert numbers["generation"]["iterations"] == gen.iterations[0].tolist()
    assert all(1 <= i <= 4 for i in numbers["generation"]["iterations"])
    a, b = int(model(clean, n_loops=4, seed=0)[0, -1].argmax()), int(model(corrupt, n_loops=4, seed=0)[0, -1].argmax())

    def metric(logits):
        return (logits[..., -1, a] - logits[..., -1, b]).mean()

    expected = ll.patching.activation_patch(model, model.to_tokens(clean), model.to_tokens(corrupt), metric, n_loops=4, seed=0)
    torch.testing.assert_close(torch.tensor(numbers["patching"]["normalized"]), expected.normalized().values.float(),
                               rtol=1e-4, atol=1e-4)
    page = (tmp_path / "r.html").read_text()
    assert "Activation patching" in page and "Compute per generated token" in page
    code, _, err = run(capsys, "report", "zoo:khop-huginn", "--prompts", clean, "--corrupt", "b f e", "--out",
                       str(tmp_path / "x.html"), "--quiet")
    assert code == 1 and "same length" in err
