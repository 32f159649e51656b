"""The HTML report in real headless Chromium with the network cut off: no console errors, the
circuitsvis attention view renders, the iteration control changes what it shows, and a report built
from hostile tokens, prompts, model name and command runs none of their script.

Chromium and chromedriver come from Debian (`chromium`, `chromium-driver`); without them these tests
skip, except under CI (`CI` set to anything but empty, 0, false or no), where they fail."""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import require, tiny_model, unavailable
from test_report_security import DELIMITER, HOSTILE_COMMAND, HOSTILE_NAME, hostile_model, hostile_prompts, hostile_vocab

from loop_lens import load
from loop_lens.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

# Installed before any page script runs, in every frame: records dialogs instead of opening them.
RECORD_DIALOGS = """
window.__dialogs = [];
for (const name of ["alert", "confirm", "prompt", "print"]) {
  window[name] = function() {
    const entry = name + "(" + Array.from(arguments).map(String).join(", ") + ")";
    window.__dialogs.push(entry);
    try { if (window.top !== window) window.top.__dialogs.push("frame " + entry); } catch (e) { /* opaque frame */ }
  };
}
"""

# Everything an injected script or element would leave behind on the page.
INJECTION_EVIDENCE = """
const evidence = [];
if (typeof window.__pwned !== "undefined") evidence.push("window.__pwned = " + JSON.stringify(window.__pwned));
for (const d of window.__dialogs || []) evidence.push("dialog " + d);
if (document.title !== arguments[0]) evidence.push("title changed to " + JSON.stringify(document.title));
for (const el of document.querySelectorAll("iframe, frame, img, object, embed, base, link, meta[http-equiv]"))
  evidence.push("element " + el.outerHTML.slice(0, 120));
for (const el of document.querySelectorAll("*"))
  for (const a of el.attributes)
    if (a.name.startsWith("on") || /^\\s*javascript:/i.test(a.value)) evidence.push("attribute " + a.name + " on " + el.tagName);
const ours = document.querySelectorAll("script").length;
if (ours !== arguments[1]) evidence.push(ours + " script elements, expected " + arguments[1]);
return evidence;
"""


def make_browser():
    """Headless Chromium with the network cut off, dialogs recorded, and browser logs kept."""
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--window-size=1300,2400"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.set_capability("unhandledPromptBehavior", "ignore")  # a dialog stays open where the test can see it
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_DIALOGS})
    return driver


@pytest.fixture(scope="module")
def browser():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not path]
    if missing:
        unavailable(f"{' and '.join(missing)} (on PATH; the browser tests need Debian's chromium and chromium-driver)",
                    install="to run them: apt-get install chromium chromium-driver (as bash .ci/run does), then "
                            "python -m pytest tests/test_report_browser.py")
    require("selenium")
    driver = make_browser()
    yield driver
    driver.quit()


def attention_div(browser, timeout: float = 20):
    """The circuitsvis view's drawing, once it has content."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        divs = browser.find_elements(By.CSS_SELECTOR, ".ll-attn-container > div")
        if divs and divs[0].get_attribute("innerHTML").strip():
            return divs[0]
        time.sleep(0.2)
    raise AssertionError("the circuitsvis attention view did not render")


def injection_evidence(browser, title: str, n_scripts: int) -> list[str]:
    """What injected script or markup did on the loaded page: an open dialog, recorded dialogs,
    `window.__pwned`, a changed title, foreign elements or handlers, extra scripts. Empty = nothing."""
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return [f"an open dialog: {browser.switch_to.alert.text!r}"]
    except NoAlertPresentException:
        pass
    return browser.execute_script(INJECTION_EVIDENCE, title, n_scripts)


def severe_errors(browser) -> list[dict]:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_report_renders_offline_and_iteration_control_works(browser, tmp_path):
    from selenium.webdriver.common.by import By

    model = load("zoo:tiny-random")
    report = build_report(model, ["jhdeibacgf|a3=", "bcdefghija|c2="], n_loops=6, progress=False)
    page = report.save(tmp_path / "report.html")
    browser.get(page.resolve().as_uri())

    first = attention_div(browser)
    assert first.get_attribute("data-iteration") == "0"
    assert len(first.get_attribute("innerHTML")) > 200  # real circuitsvis content, not an empty container
    time.sleep(1.0)
    box = browser.find_element(By.CSS_SELECTOR, ".ll-attention")
    browser.execute_script("arguments[0].scrollIntoView();", box)
    before = box.screenshot_as_png
    assert browser.find_elements(By.CSS_SELECTOR, ".plotly-graph-div .main-svg"), "plotly figures did not render"
    browser.execute_script(
        "const s = document.querySelector('.ll-iter'); s.value = 5; s.dispatchEvent(new Event('input'));"
    )
    time.sleep(0.5)
    after_div = attention_div(browser)
    assert after_div.get_attribute("data-iteration") == "5"
    assert browser.find_element(By.CSS_SELECTOR, ".ll-iter-label").text == "5"
    time.sleep(1.0)
    (tmp_path / "attention_t0.png").write_bytes(before)
    (tmp_path / "attention_t5.png").write_bytes(box.screenshot_as_png)
    assert box.screenshot_as_png != before  # the drawn patterns changed with the iteration
    header = browser.find_elements(By.CSS_SELECTOR, "#ll-head-table th")[3]
    header.click()  # sorting the head table must not raise
    browser.save_screenshot(str(tmp_path / "report.png"))
    errors = severe_errors(browser)
    assert not errors, errors


def test_report_from_hostile_tokens_prompts_and_names_runs_no_injected_script(browser, tmp_path):
    from selenium.webdriver.common.by import By

    model = hostile_model()
    prompts = hostile_prompts(hostile_vocab(model.cfg.d_vocab))
    report = build_report(model, prompts, n_loops=3, model_name=HOSTILE_NAME, command=HOSTILE_COMMAND, progress=False)
    page = report.save(tmp_path / "hostile.html")
    browser.get(page.resolve().as_uri())
    attention_div(browser)
    assert browser.find_elements(By.CSS_SELECTOR, ".ll-attn-container canvas"), "circuitsvis drew no pattern"
    assert len(browser.find_elements(By.CSS_SELECTOR, ".plotly-graph-div .main-svg")) >= 5
    time.sleep(1.0)  # let any injected handler (onerror, onload) fire
    # our scripts: plotly.js, circuitsvis, 5 figures, the attention view, the table sorter
    evidence = injection_evidence(browser, "loop_lens report: " + HOSTILE_NAME, n_scripts=9)
    assert evidence == [], evidence
    tokens = model.to_str_tokens(model.tokenize(prompts[:1])[0][0])
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('.ll-attention .ll-token'), s => [s.textContent, s.title]);")
    assert shown == [[t, f"position {i}: {t}"] for i, t in enumerate(tokens)]  # the tokens, as text
    meta = browser.execute_script("return document.querySelector('pre.ll-meta').textContent;")
    assert f"model: {HOSTILE_NAME}" in meta and f"command: {HOSTILE_COMMAND}" in meta
    assert f"prompts: {report.meta['prompts']}" in meta
    assert browser.execute_script("return document.querySelectorAll('section').length;") == len(report.sections)
    errors = severe_errors(browser)
    assert not errors, errors


URL_PAYLOADS = [
    '<span style="background-image:url(http://127.0.0.9/bg.png)">s</span>',
    '<img src="http://127.0.0.9/img.png">',
    "<b>bold</b>",
    '<a href="http://127.0.0.9/a">link</a>',
]


def test_generated_token_text_in_figures_fetches_nothing_and_renders_as_text(browser, tmp_path):
    """With --generate, token text reaches plotly legends, ticks and hover text; plotly renders an
    HTML subset there. Every figure string is escaped, so a token that is styled markup pointing at
    a URL loads nothing (no resource but the page itself; the network is cut, so a fetch would also
    log an error) and shows as its own text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_model("pre", d_vocab=24, model_name="url-tokens")
    vocab = [f"{URL_PAYLOADS[i % len(URL_PAYLOADS)]}\u00b7{i}" for i in range(24)]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(DELIMITER, behavior="removed")
    model.tokenizer = tok
    prompts = [DELIMITER.join(vocab[:8])]
    report = build_report(model, prompts, n_loops=3, generate=6, progress=False)
    assert "Compute per generated token" in [title for title, _ in report.sections]
    page = report.save(tmp_path / "urls.html")
    browser.get(page.resolve().as_uri())
    time.sleep(1.5)  # let any background-image or img load start
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert [r for r in resources if not r.startswith(("file:", "data:", "blob:"))] == []
    bold = browser.execute_script("return document.querySelectorAll('.plotly-graph-div b, .plotly-graph-div a').length;")
    assert bold == 0
    legend = browser.execute_script(
        "return Array.from(document.querySelectorAll('.plotly-graph-div .legendtext'), e => e.textContent).join(' ');")
    assert "<b>bold</b>" in legend or "background-image" in legend  # shown as the token's own text
    assert not severe_errors(browser), severe_errors(browser)
