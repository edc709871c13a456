"""The chat page of ``loramix serve`` (``GET /``) in real headless Chromium (Debian's ``chromium`` and its
``chromedriver``, driven by selenium; ``make install`` installs both).

The server is test_serve's: a tiny Llama with LoRA, MixLoRA and MoRE (tasks x, y) adapters, uvicorn on
127.0.0.1 (and, for the API key, a second one with ``api_key`` over the same base). Every answer the page shows is compared with the official openai client's non-streaming
greedy answer for the same adapter, message and max tokens. The pieces of a streamed answer are seen
from outside the page's own code: a MutationObserver records each text node as it is added.
"""

from __future__ import annotations

import re
import shutil

import openai
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from loramix.hub import load_model
from loramix.serve.server.app import build_app, serve_in_thread
from loramix.serve.server.engine import Engine, load_served

MAX_TOKENS = 10
# Records, per pane, every text node added to its answers (one per streamed piece) and whether both
# panes were ever streaming at the same moment.
OBSERVE = """
window.seen = {pieces: [[], []], both: false};
document.querySelectorAll('.pane').forEach((pane, i) => {
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes)
      if (n.nodeType === Node.TEXT_NODE && n.parentElement.closest('.msg.assistant')) window.seen.pieces[i].push(n.data);
    const states = [...document.querySelectorAll('.pane')].map((p) => p.dataset.state);
    if (states.every((s) => s === 'streaming')) window.seen.both = true;
  }).observe(pane, {subtree: true, childList: true, attributes: true, attributeFilter: ['data-state']});
});
"""


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("Debian's chromium and chromium-driver are needed for the page tests: run `make install` "
                    "(apt-get install -y chromium chromium-driver, as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(flag)  # no sandbox: CI runs as root, where Chromium refuses its sandbox
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    yield browser
    browser.quit()


@pytest.fixture
def page(driver, server):
    """The driver on a freshly loaded page (empty localStorage, models listed, console log emptied)."""
    url = server[1]
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/")
    wait(driver, lambda d: len(Select(d.find_elements(By.CSS_SELECTOR, ".pane select")[0]).options) > 0)
    driver.execute_script(OBSERVE)
    return driver


def wait(driver, condition, seconds: float = 30):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.05).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out; console: {driver.get_log('browser')}") from None


def console_errors(driver, allowed: str | None = None) -> list[dict]:
    """The page's console errors (those mentioning ``allowed`` aside)."""
    return [e for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not (allowed and allowed in e["message"])]


def settings(driver, temperature: str, max_tokens: int) -> None:
    for field, value in (("temperature", temperature), ("max-tokens", str(max_tokens))):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)


def choose(driver, pane: int, model: str) -> None:
    Select(driver.find_elements(By.CSS_SELECTOR, ".pane select")[pane]).select_by_value(model)


def answers(driver, pane: int) -> list[str]:
    return [e.get_attribute("textContent") for e in
            driver.find_elements(By.CSS_SELECTOR, f".pane:nth-of-type({pane + 1}) .msg.assistant .text")]


def state(driver, pane: int) -> str:
    return driver.find_elements(By.CSS_SELECTOR, ".pane")[pane].get_attribute("data-state")


def reference(client: openai.OpenAI, model: str, message: str, max_tokens: int = MAX_TOKENS) -> str:
    """The openai client's non-streaming greedy chat answer to one user message."""
    got = client.chat.completions.create(model=model, messages=[{"role": "user", "content": message}],
                                         max_tokens=max_tokens, temperature=0)
    return got.choices[0].message.content


def test_the_page_loads_without_console_errors_and_lists_every_model(page, server):
    client, url, _ = server
    ids = [m.id for m in client.models.list().data]
    for select in page.find_elements(By.CSS_SELECTOR, ".pane select"):
        assert [o.get_attribute("value") for o in Select(select).options] == ids
    assert console_errors(page) == []
    assert page.title == "loramix serve"
    # Every control in view has a label a screen reader can read.
    names = [f.accessible_name for f in page.find_elements(By.CSS_SELECTOR, "input, select, textarea") if f.is_displayed()]
    assert names == ["API key (if the server has one)", "Temperature", "Max tokens", "Compare two side by side",
                     "Model of pane A", "Message — Enter sends, Shift+Enter starts a new line, Esc stops"], names
    # No external assets: the policy allows only the page's own inline code and requests to this server.
    policy = page.execute_script("return fetch('/').then((r) => r.headers.get('content-security-policy'))")
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "http" not in page.execute_script(
        "return [...document.querySelectorAll('[src], [href]')].map((e) => e.src || e.href).join(' ')")


def test_a_message_streams_into_the_pane_in_pieces_and_equals_the_greedy_answer(page, server):
    settings(page, "0", MAX_TOKENS)
    choose(page, 0, "mix")
    box = page.find_element(By.ID, "message")
    box.send_keys("red", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "green")  # Shift+Enter: a new line, nothing sent
    assert box.get_attribute("value") == "red\ngreen" and state(page, 0) == "idle"
    box.send_keys(Keys.ENTER)
    wait(page, lambda d: state(d, 0) == "done")
    expected = reference(server[0], "mix", "red\ngreen")
    assert answers(page, 0) == [expected]
    pieces = page.execute_script("return window.seen.pieces[0]")
    assert len(pieces) >= 2 and "".join(pieces) == expected, pieces
    assert box.get_attribute("value") == "" and page.find_element(By.ID, "send").is_enabled()
    status = page.find_element(By.CSS_SELECTOR, ".pane .status").text
    assert re.fullmatch(r"\d+ tokens in \d+\.\d s( \(max tokens reached\))?", status), status
    # A second turn sends the conversation so far, as a chat client would.
    box.send_keys("blue", Keys.ENTER)
    wait(page, lambda d: state(d, 0) == "done" and len(answers(d, 0)) == 2)
    history = [{"role": "user", "content": "red\ngreen"}, {"role": "assistant", "content": expected},
               {"role": "user", "content": "blue"}]
    second = server[0].chat.completions.create(model="mix", messages=history, max_tokens=MAX_TOKENS, temperature=0)
    assert answers(page, 0)[1] == second.choices[0].message.content
    assert console_errors(page) == []


def test_compare_streams_two_adapters_at_once_each_equal_to_its_own_answer(page, server):
    engine = server[2]
    settings(page, "0", MAX_TOKENS)
    assert not page.find_elements(By.CSS_SELECTOR, ".pane")[1].is_displayed()  # one pane until compare is on
    page.find_element(By.ID, "compare").click()
    assert page.find_elements(By.CSS_SELECTOR, ".pane")[1].is_displayed()
    choose(page, 0, "lora")
    choose(page, 1, "more:x")
    # Hold the engine until both requests wait: the two panes must then stream at the same time.
    engine.pause()
    try:
        page.find_element(By.ID, "message").send_keys("a dog ran in")
        page.find_element(By.ID, "send").click()
        wait(page, lambda d: engine.waiting() == 2)
    finally:
        engine.resume()
    wait(page, lambda d: state(d, 0) == "done" and state(d, 1) == "done")
    assert page.execute_script("return window.seen.both")
    for pane, model in enumerate(["lora", "more:x"]):
        expected = reference(server[0], model, "a dog ran in")
        assert answers(page, pane) == [expected], model
        assert "".join(page.execute_script(f"return window.seen.pieces[{pane}]")) == expected
    assert answers(page, 0) != answers(page, 1)
    assert console_errors(page) == []


def test_stop_aborts_the_stream_and_frees_the_servers_row(page, server):
    engine = server[2]
    settings(page, "0", 40)
    engine.pause()
    try:
        page.find_element(By.ID, "message").send_keys("the cat sat", Keys.ENTER)
        wait(page, lambda d: engine.waiting() == 1 and state(d, 0) == "streaming")
        assert page.find_element(By.ID, "stop").is_enabled() and not page.find_element(By.ID, "send").is_enabled()
        page.find_element(By.ID, "stop").click()
        wait(page, lambda d: state(d, 0) == "stopped")
    finally:
        engine.resume()
    wait(page, lambda d: engine.stats()["running"] == 0 and engine.waiting() == 0)
    assert page.find_element(By.CSS_SELECTOR, ".pane .status").text == "stopped"
    assert page.find_element(By.ID, "send").is_enabled() and console_errors(page) == []


def test_server_errors_are_shown_in_the_pane(page, server):
    settings(page, "0", 10**6)  # more than the model's context: the server answers 400 naming max_tokens
    page.find_element(By.ID, "message").send_keys("hi", Keys.ENTER)
    wait(page, lambda d: state(d, 0) == "error")
    error = page.find_element(By.CSS_SELECTOR, ".pane .msg.error").text
    assert "400" in error and "max_tokens" in error, error
    assert console_errors(page, allowed="status of 400") == []


def test_with_an_api_key_the_page_asks_for_it_keeps_it_and_streams_with_it(driver, folders):
    base, adapters = folders
    model, tok = load_model(str(base))
    served = load_served(model, tok, {"lora": adapters["lora"]}, base_name="base")
    engine = Engine(served, max_batch_size=2)
    engine.start()
    try:
        with serve_in_thread(build_app(served, engine, api_key="sk-page-test")) as url:
            driver.get(url + "/")  # the page itself needs no key
            driver.execute_script("localStorage.clear()")
            driver.refresh()
            notice = driver.find_element(By.ID, "notice")
            wait(driver, lambda d: notice.is_displayed())
            assert "401" in notice.text and "API key" in notice.text, notice.text
            key = driver.find_element(By.ID, "api-key")
            assert key.get_attribute("type") == "password"
            key.send_keys("sk-page-test", Keys.TAB)  # change: stored, and the models are listed with it
            wait(driver, lambda d: not notice.is_displayed())
            driver.refresh()  # kept in localStorage: listed at once after a reload
            select = driver.find_element(By.CSS_SELECTOR, ".pane select")
            wait(driver, lambda d: [o.get_attribute("value") for o in Select(select).options] == ["base", "lora"])
            assert driver.find_element(By.ID, "api-key").get_attribute("value") == "sk-page-test"
            settings(driver, "0", MAX_TOKENS)
            driver.find_element(By.ID, "message").send_keys("a dog", Keys.ENTER)
            wait(driver, lambda d: state(d, 0) == "done")
            client = openai.OpenAI(base_url=url + "/v1", api_key="sk-page-test", max_retries=0, timeout=60)
            assert answers(driver, 0) == [reference(client, "lora", "a dog")]
            assert console_errors(driver, allowed="status of 401") == []
    finally:
        engine.stop()
