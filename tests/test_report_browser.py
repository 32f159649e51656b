"""The HTML report in real headless Chromium with the network cut off: no console errors, the
circuitsvis attention view renders, and the iteration control changes what it shows."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from loop_lens import load
from loop_lens.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium / chromedriver missing in CI: .ci/run must install Debian's chromium and chromium-driver")
        pytest.skip("Debian's chromium and chromium-driver are not installed here (bash .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test dependency")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--window-size=1300,2400"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def test_report_renders_offline_and_iteration_control_works(browser, tmp_path):
    from selenium.webdriver.common.by import By

    model = load("zoo:tiny-random")
    report = build_report(model, ["jhdeibacgf|a3=", "bcdefghija|c2="], n_loops=6, progress=False)
    page = report.save(tmp_path / "report.html")
    browser.get(page.resolve().as_uri())

    def attention_div():
        deadline = time.time() + 20
        while time.time() < deadline:
            divs = browser.find_elements(By.CSS_SELECTOR, ".ll-attn-container > div")
            if divs and divs[0].get_attribute("innerHTML").strip():
                return divs[0]
            time.sleep(0.2)
        raise AssertionError("the circuitsvis attention view did not render")

    first = attention_div()
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
    after_div = attention_div()
    assert after_div.get_attribute("data-iteration") == "5"
    assert browser.find_element(By.CSS_SELECTOR, ".ll-iter-label").text == "5"
    time.sleep(1.0)
    (tmp_path / "attention_t0.png").write_bytes(before)
    (tmp_path / "attention_t5.png").write_bytes(box.screenshot_as_png)
    assert box.screenshot_as_png != before  # the drawn patterns changed with the iteration
    header = browser.find_elements(By.CSS_SELECTOR, "#ll-head-table th")[3]
    header.click()  # sorting the head table must not raise
    browser.save_screenshot(str(tmp_path / "report.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
