"""The report and the attention view never turn text from a checkpoint, tokenizer, prompt or the
command line into markup or script: every such string is escaped for where it lands (HTML text,
attribute, JSON inside a script) and still reads back as the same text."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from conftest import tiny_model
from hypothesis import given
from hypothesis import strategies as st
from markupsafe import Markup

from loop_lens.report import Report, build_report
from loop_lens.viz import AttentionView, circuitsvis_bundle, figure_html, plotly_bundle, script_json, templates

# What an injected script would do: mark the window, retitle the page, open an alert.
JS = "window.__pwned=(window.__pwned||[]).concat(1);document.title='pwned';alert(1)"
PAYLOADS = [
    f"</script><script>{JS}</script>",
    f"</SCRIPT ><script>{JS}</script>",
    f'<img src=x onerror="{JS}">',
    f"<svg/onload={JS}>",
    f"\"'><img src=x onerror={JS}>",
    f"<iframe srcdoc='<script>{JS}</script>'></iframe>",
    "<!--<script>",
    f'\u2028\u2029";{JS};//',
    f'\\"}}];{JS};//',
    "{{ 7*7 }}{% raw %}${7*7}",
    f"&lt;script&gt;{JS}&lt;/script&gt;",
    "<style>*{display:none}</style>",
    "<b>bold</b>",
    f'<a href="javascript:{JS}">link</a>',
]
DELIMITER = "\u00a6"  # the hostile tokenizer's word separator; no payload contains it
HOSTILE_NAME = f"model\"'><img src=x onerror={JS}></title><script>{JS}</script>"
HOSTILE_COMMAND = f"loop-lens report '</pre><svg/onload={JS}>' --prompts '</script><script>{JS}</script>'"


def hostile_vocab(size: int) -> list[str]:
    """`size` distinct token strings, each one of the payloads with its id appended."""
    return [f"{PAYLOADS[i % len(PAYLOADS)]} \u00b7{i}" for i in range(size)]


def hostile_model(d_vocab: int = 40):
    """A tiny random model whose tokenizer's every token string is a payload (words split at DELIMITER)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_model("pre", d_vocab=d_vocab, model_name=HOSTILE_NAME)
    vocab = hostile_vocab(d_vocab)
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(DELIMITER, behavior="removed")
    model.tokenizer = tok
    return model


def hostile_prompts(vocab: list[str]) -> list[str]:
    """Two prompts made of hostile tokens; every payload occurs in the first."""
    first = DELIMITER.join(vocab[: len(PAYLOADS)] + vocab[len(PAYLOADS): len(PAYLOADS) + 3])
    return [first, DELIMITER.join(reversed(vocab[5:12]))]


class Page(HTMLParser):
    """Every element, attribute and script body of a page, and its visible text (entities decoded)."""

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in: list[str] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, name, value or "") for name, value in attrs]
        self._in.append(tag)
        if tag == "script":
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag in self._in:
            del self._in[len(self._in) - 1 - self._in[::-1].index(tag):]

    def handle_data(self, data):
        if self._in and self._in[-1] == "script":
            self.scripts[-1] += data
        elif not (self._in and self._in[-1] in ("style", "title")):
            self.text.append(data)

    @property
    def visible(self) -> str:
        return "".join(self.text)


PAGE_TAGS = {"html", "head", "meta", "title", "style", "script", "body", "h1", "h2", "h3", "pre", "section", "div",
             "p", "code", "table", "thead", "tbody", "tr", "th", "td", "label", "input", "span", "select", "option"}


def assert_no_markup_from_data(page: Page, scripts: dict[str, int]) -> None:
    """Only the templates' own elements and attributes; each script is a bundle or one of ours, in the
    expected numbers (`scripts`: kind -> count); our own scripts carry data with no `<` in it."""
    assert set(page.tags) <= PAGE_TAGS, set(page.tags) - PAGE_TAGS
    assert page.tags.count("style") <= 1
    handlers = [(tag, name) for tag, name, _ in page.attrs if name.startswith("on") or name in ("src", "href", "srcdoc")]
    assert not handlers, handlers
    assert not [v for _, _, v in page.attrs if v.strip().lower().startswith("javascript:")]
    sort_js = templates().loader.get_source(templates(), "sort_table.js")[0]
    kinds: dict[str, int] = {}
    for body in page.scripts:
        if body == plotly_bundle():
            kind = "plotly.js"
        elif body == circuitsvis_bundle():
            kind = "circuitsvis"
        elif body.strip() == sort_js.strip():
            kind = "sort"
        elif body.startswith("Plotly.newPlot(document.getElementById("):
            kind = "figure"
        elif body.strip().startswith("(function() {\n  const viewId = "):
            kind = "attention"
        else:
            raise AssertionError(f"a script that no template writes: {body[:200]!r}")
        if kind in ("figure", "attention"):
            assert not re.search("[<>&'\u2028\u2029]", body), body[:300]
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == scripts, kinds


def token_titles(page: Page) -> list[str]:
    """The attention view's token strip: each token's `title` attribute, in order."""
    return [value for tag, name, value in page.attrs if tag == "span" and name == "title"]


def view_data(page: Page) -> dict:
    """The attention view's data, read back from its script."""
    (body,) = [s for s in page.scripts if "const viewId = " in s]
    return json.loads(re.search(r"const data = (.*);\n", body).group(1))


@pytest.fixture(scope="module")
def hostile_report():
    model = hostile_model()
    vocab = hostile_vocab(model.cfg.d_vocab)
    prompts = hostile_prompts(vocab)
    report = build_report(model, prompts, n_loops=3, model_name=HOSTILE_NAME, command=HOSTILE_COMMAND, progress=False)
    return report, model, prompts


def test_report_with_hostile_tokens_prompts_and_names_has_no_markup_from_data(hostile_report):
    report, model, prompts = hostile_report
    page = Page(report.html())
    n_figures = sum(1 for _, body in report.sections if "Plotly.newPlot(" in body)
    assert n_figures == 5
    assert_no_markup_from_data(page, {"plotly.js": 1, "circuitsvis": 1, "figure": n_figures, "attention": 1, "sort": 1})
    tokens = model.to_str_tokens(model.tokenize(prompts[:1])[0][0])
    assert view_data(page)["tokens"] == tokens  # the token strings reach circuitsvis unchanged
    assert token_titles(page) == [f"position {i}: {t}" for i, t in enumerate(tokens)]  # and the token strip
    for payload in PAYLOADS:  # ... and each payload is among them
        assert any(t.startswith(payload) for t in tokens), payload
    visible = page.visible
    assert HOSTILE_NAME in visible and HOSTILE_COMMAND in visible
    assert report.meta["prompts"] in visible  # the prompts meta line, as text
    cells = sum(visible.count(f"{token} (") for token in hostile_vocab(model.cfg.d_vocab))
    assert cells == 3 * model.cfg.n_block  # every logit-lens grid cell shows its top token as text
    assert "{{ 7*7 }}{% raw %}${7*7}" in visible  # not evaluated as a template
    assert "&lt;script&gt;" in visible  # already-escaped text stays as typed, escaped once more
    assert "&amp;lt;script&amp;gt;" in report.html()
    title = re.search(r"<title>(.*?)</title>", report.html(), re.S).group(1)
    assert "<" not in title and ">" not in title and html.unescape(title) == "loop_lens report: " + HOSTILE_NAME


def test_report_json_keeps_the_hostile_strings(hostile_report, tmp_path):
    report, _, prompts = hostile_report
    report.save(tmp_path / "r.html", json_path=tmp_path / "r.json")
    meta = json.loads((tmp_path / "r.json").read_text())["meta"]
    assert meta["model"] == HOSTILE_NAME and meta["command"] == HOSTILE_COMMAND
    assert meta["prompts"] == " | ".join(prompts)[:2000]


def test_config_model_name_is_escaped_when_no_name_is_given():
    model = hostile_model()
    report = build_report(model, torch.tensor([[1, 2, 3, 4]]), n_loops=2, progress=False)
    page = Page(report.html())
    assert report.meta["model"] == HOSTILE_NAME and HOSTILE_NAME in page.visible
    assert_no_markup_from_data(page, {"plotly.js": 1, "circuitsvis": 1, "figure": 5, "attention": 1, "sort": 1})


@pytest.mark.parametrize("bundle", [True, False])
def test_attention_view_escapes_tokens_and_title(bundle):
    tokens = PAYLOADS[:]
    S = len(tokens)
    patterns = torch.softmax(torch.randn(2, 1, 2, S, S), -1)
    view = AttentionView(patterns, tokens, title=HOSTILE_NAME)
    markup = view.html(include_bundle=bundle)
    page = Page(markup)
    assert_no_markup_from_data(page, {"attention": 1, **({"circuitsvis": 1} if bundle else {})})
    data = view_data(page)
    assert data["tokens"] == tokens and data["heads"] == ["L0H0", "L0H1"] and data["n_loops"] == 2
    assert page.visible.count(HOSTILE_NAME) == 1  # the title, as text
    assert token_titles(page) == [f"position {i}: {t}" for i, t in enumerate(tokens)]  # attribute context
    assert "tokens: " + " ".join(tokens) in page.visible  # the strip shows them as text, in order
    assert view._repr_html_().count("const viewId = ") == 1


def test_attention_view_refuses_mismatched_input():
    with pytest.raises(ValueError, match="3 positions, got 2 tokens"):
        AttentionView(torch.zeros(1, 1, 1, 3, 3), ["a", "b"])
    with pytest.raises(ValueError, match=r"\[n_loops, n_layers, n_heads, pos, pos\], got \(1, 3, 3\)"):
        AttentionView(torch.zeros(1, 3, 3), ["a", "b", "c"])
    with pytest.raises(ValueError, match="one string per position"):
        AttentionView(torch.zeros(1, 1, 1, 3, 3), "abc")


def test_attention_view_writes_nonfinite_weights_as_null():
    patterns = torch.tensor([[[[[1.0, float("nan")], [float("inf"), 0.5]]]]])
    data = view_data(Page(AttentionView(patterns, ["a", "b"]).html(include_bundle=False)))
    assert data["attention"] == [[[[[1.0, None], [None, 0.5]]]]]


def test_report_attention_view_stays_within_its_budget_and_labels_the_iterations_it_keeps(monkeypatch):
    """A 1B-class model's patterns do not fit a page: past the budget the view keeps evenly spaced
    iterations (first and last always) and the first positions, labels them, and says so."""
    import loop_lens.report as report_module

    model = tiny_model()
    L, H = model.cfg.n_block, model.cfg.n_heads
    tokens = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(report_module, "ATTENTION_POSITIONS", 6)
    monkeypatch.setattr(report_module, "ATTENTION_WEIGHTS", 3 * L * H * 6 * 6 + 5)  # room for 3 iterations
    report = build_report(model, tokens, n_loops=7, progress=False)
    page = Page(report.html())
    data = view_data(page)
    assert data["iterations"] == [0, 3, 6] and data["n_loops"] == 3 and len(data["tokens"]) == 6
    _, cache = model.run_with_cache(tokens, n_loops=7)
    for shown, t in enumerate([0, 3, 6]):
        for layer in range(L):
            want = cache[f"iter.{t}.blocks.{layer}.attn.hook_pattern"][0, :, :6, :6]
            assert torch.allclose(torch.tensor(data["attention"][shown][layer]), want, atol=6e-5)
    assert "positions 0..5 of 9 and iterations 0, 3, 6 of 0..6" in page.visible
    assert "/ 6" in page.visible  # the slider counts in the run's iterations

    monkeypatch.setattr(report_module, "ATTENTION_WEIGHTS", 10**9)  # everything fits: no note
    page = Page(build_report(model, tokens[:, :5], n_loops=4, progress=False).html())
    assert view_data(page)["iterations"] == [0, 1, 2, 3] and "This view shows" not in page.visible


def test_plotly_figures_cannot_break_out_of_their_script():
    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]], text=[PAYLOADS[:2], PAYLOADS[2:4]], texttemplate="%{text}",
                               x=PAYLOADS[4:6], y=PAYLOADS[6:8], hovertext=[PAYLOADS[8:10], PAYLOADS[10:12]]))
    fig.update_layout(title=HOSTILE_NAME, xaxis_title=PAYLOADS[0], yaxis_title="\u2028\u2029")
    page = Page(figure_html(fig))
    assert_no_markup_from_data(page, {"figure": 1})
    spec = json.loads(re.search(r"Plotly.newPlot\(document.getElementById\((\"[^\"]+\")\), (.*)\);$",
                                page.scripts[0]).group(2))
    # every string is also escaped for plotly's own HTML subset (issue 25): plotly shows it as typed
    shown = html.escape(HOSTILE_NAME, quote=False)
    assert spec["layout"]["title"]["text"] == shown and spec["data"][0]["x"] == [html.escape(p, quote=False) for p in PAYLOADS[4:6]]
    assert spec["layout"]["yaxis"]["title"]["text"] == "\u2028\u2029"
    assert spec["config"] == {"displaylogo": False, "responsive": True}


def test_a_plain_string_section_body_is_text_not_markup():
    report = Report({"model": HOSTILE_NAME}, sections=[(PAYLOADS[0], PAYLOADS[2]), ("ok", Markup("<p>ours</p>"))])
    page = Page(report.html())
    assert_no_markup_from_data(page, {"plotly.js": 1, "circuitsvis": 1, "sort": 1})
    assert PAYLOADS[0] in page.visible and PAYLOADS[2] in page.visible and "p" in page.tags


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=12))
def test_script_json_has_no_html_special_characters_and_round_trips(value):
    text = script_json(value)
    assert not re.search("[<>&'\u2028\u2029]", text) and text.isascii()
    assert json.loads(text) == value


def test_script_json_escapes_line_separators_and_refuses_nan():
    assert script_json(["\u2028\u2029</"]) == '["\\u2028\\u2029\\u003c/"]'
    with pytest.raises(ValueError, match="non-finite"):
        script_json([float("nan")])


def test_inlined_bundles_cannot_end_their_script_element():
    for bundle in (plotly_bundle(), circuitsvis_bundle()):
        assert not re.search(r"</script|<!--", bundle, re.IGNORECASE)
    assert "CircuitsVis" in circuitsvis_bundle() and "<\\/script>" in circuitsvis_bundle()  # neutralised, not dropped


@pytest.mark.parametrize("n_loops", [0, -3, 2.5, 3.0, True, "4"])
def test_report_refuses_a_loop_count_that_is_not_a_positive_integer(n_loops):
    with pytest.raises(ValueError, match="n_loops must be a positive integer, got "):
        build_report(tiny_model(), torch.tensor([[1, 2, 3]]), n_loops=n_loops, progress=False)


def test_report_accepts_numpy_and_tensor_integers():
    model = tiny_model()
    report = build_report(model, torch.tensor([[1, 2, 3]]), n_loops=np.int64(2), seed=np.int32(3), progress=False)
    assert report.meta["layout"].endswith("(run with n_loops = 2)") and report.meta["seed"] == 3
    assert len(report.numbers["step_sizes"]["relative"]) == 2
    report = build_report(model, torch.tensor([[1, 2, 3]]), n_loops=torch.tensor(4), progress=False)
    assert len(report.numbers["step_sizes"]["relative"]) == 4


@pytest.mark.parametrize("position, message", [(3, "position 3 is outside prompt 0, which has 3 tokens"),
                                                (-4, "position -4 is outside"), (1.0, "position must be an integer")])
def test_report_refuses_a_position_outside_the_prompt(position, message):
    with pytest.raises(ValueError, match=message):
        build_report(tiny_model(), torch.tensor([[1, 2, 3]]), n_loops=2, position=position, progress=False)


@pytest.mark.parametrize("prompts, message", [
    (torch.tensor([[0.5, 1.0]]), "integer ids"), (torch.zeros(1, 0, dtype=torch.long), "empty"),
    ([], "no prompts"), (["ab", 3], "prompt 1 is int"),
])
def test_report_refuses_bad_prompts(prompts, message):
    with pytest.raises(ValueError, match=message):
        build_report(tiny_model(), prompts, n_loops=2, progress=False)
