"""The playground page (lora_lab/serve/playground.py, lora_lab/serve/static/) in a real headless Chromium: it loads
with no console errors, lists the models, streams one prompt to the base and an adapter side by side showing in
each column exactly the text the API returns for the same request (greedy), loads and unloads an adapter, and
shows an API error in its column. The server is the tiny random base of tests/test_serve.py on 127.0.0.1.

Needs Chromium and its driver from Debian (`apt-get install -y chromium chromium-driver`, as .ci/run does) and
the `selenium` package; without them the browser tests skip and say why. The page's files are checked without a
browser too.
"""

import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from playground_browser import Browser, missing, text_of  # noqa: E402
from test_serve import LiveServer  # noqa: E402
from test_use_adapter import make_adapter, make_tokenized_base  # noqa: E402

from lora_lab.serve.server import ModelServer  # noqa: E402

N_NEW = 10


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("playground")
    base = make_tokenized_base(tmp / "base")
    make_adapter(base, tmp / "qv4", ["query", "value"], r=4, prompt_style="chatml")
    # loaded from the page later: run-time loading reads only below --adapters_root (a folder that is not itself
    # an adapter, so /v1/models does not list it before it is loaded)
    make_adapter(base, tmp / "root" / "later" / "mlp2", ["mlp", "lm_head"], r=2, prompt_style="chatml")
    server = ModelServer.load(tmp / "base", {"qv4": tmp / "qv4"}, adapters_root=tmp / "root", device="cpu",
                              max_batch_size=4, allow_runtime_loading=True)
    live = LiveServer(server)
    live.dir = tmp
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser(live):
    reason = missing()
    if reason and os.environ.get("LORA_LAB_REQUIRE_ASSETS") == "1":  # CI (.ci/run) installs the browser
        pytest.fail(f"no headless browser: {reason}")
    if reason:
        pytest.skip(f"no headless browser: {reason}")
    b = Browser()
    yield b
    b.quit()


def api_answer(live, model: str, prompt: str, max_tokens: int = N_NEW) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "top_p": 1, "seed": 1234}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_page_and_its_files_are_served(live):
    page = httpx.get(live.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="static/playground.js">' in page.text and "http" not in page.text.split("<body>")[1]
    for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
        r = httpx.get(f"{live.url}/static/{name}", timeout=30)
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.text) > 500
        assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere: works offline
    assert httpx.get(live.url + "/static/../app.py", timeout=30).status_code == 404
    assert httpx.get(live.url + "/static/index.html", timeout=30).status_code == 404


def test_playground_in_a_headless_browser(live, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d = browser.driver
    d.get(live.url + "/")
    browser.wait(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))

    def listed():  # read in one script: the list is rebuilt when models change (no stale elements)
        return d.execute_script(
            "return Array.from(document.querySelectorAll('#model-list li')).map((li) => li.dataset.model)")

    def columns():
        return d.find_elements(By.CSS_SELECTOR, "#columns .column")

    def set_field(field, value):
        element = d.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)

    def run(keyboard=False):
        if keyboard:  # Ctrl-Enter in the prompt sends
            d.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
        else:
            d.find_element(By.ID, "send").click()
        browser.wait(lambda d: d.find_element(By.ID, "status").text == "done", timeout=120, what="the answers")

    # the models, and two columns to start: the base and the adapter
    assert listed() == ["tiny", "qv4"]
    assert [Select(c.find_element(By.CSS_SELECTOR, "select.model")).first_selected_option.get_attribute("value")
            for c in columns()] == ["tiny", "qv4"]
    assert browser.console_errors() == []

    # one prompt, two columns, each exactly the API's greedy answer for the same request
    prompt = "What is the capital of France?"
    set_field("prompt", prompt)
    set_field("max-tokens", str(N_NEW))
    set_field("temperature", "0")
    run(keyboard=True)
    expected = {m: api_answer(live, m, prompt) for m in ("tiny", "qv4")}
    assert expected["tiny"] != expected["qv4"] and all(expected.values())
    for column, model in zip(columns(), ("tiny", "qv4")):
        assert text_of(column.find_element(By.CSS_SELECTOR, ".output")) == expected[model]
        assert column.find_element(By.CSS_SELECTOR, ".error").get_attribute("hidden")
        stats = column.find_element(By.CSS_SELECTOR, ".stats").text
        assert "tokens/s" in stats and "finish: " in stats and stats.split()[0].isdigit(), stats

    # load an adapter by path from the page, answer with it in a third column, then unload it
    set_field("adapter-name", "mlp2")
    set_field("adapter-path", "later/mlp2")  # relative to the server's --adapters_root
    d.find_element(By.ID, "load-adapter").click()
    browser.wait(lambda d: "mlp2" in listed(), what="the loaded adapter in the list")
    assert "mlp2" in [m["id"] for m in httpx.get(live.url + "/v1/models", timeout=30).json()["data"]]
    d.find_element(By.ID, "add-column").click()
    Select(columns()[2].find_element(By.CSS_SELECTOR, "select.model")).select_by_value("mlp2")
    run()
    assert text_of(columns()[2].find_element(By.CSS_SELECTOR, ".output")) == api_answer(live, "mlp2", prompt)
    assert text_of(columns()[0].find_element(By.CSS_SELECTOR, ".output")) == expected["tiny"]
    assert browser.console_errors() == []
    d.find_element(By.CSS_SELECTOR, '#model-list li[data-model="mlp2"] button.unload').click()
    browser.wait(lambda d: "mlp2" not in listed(), what="the unloaded adapter to leave the list")
    assert "mlp2" not in [m["id"] for m in httpx.get(live.url + "/v1/models", timeout=30).json()["data"]]

    # API errors: in the column (a prompt longer than the context), and for a bad adapter path
    set_field("prompt", "word " * 200)
    run()
    r = httpx.post(live.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "word " * 200}], "max_tokens": N_NEW})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    for column in columns():
        error = column.find_element(By.CSS_SELECTOR, ".error")
        assert error.is_displayed() and text_of(error) == f"400: {message}"
        assert text_of(column.find_element(By.CSS_SELECTOR, ".output")) == ""
    set_field("adapter-name", "nowhere")
    set_field("adapter-path", "later/nowhere")
    d.find_element(By.ID, "load-adapter").click()
    browser.wait(lambda d: "no adapter directory at lora_path" in d.find_element(By.ID, "adapter-message").text,
                 what="the load error")
    # the only console errors are the browser's own notes on those two failed requests
    assert all("status of 400" in e for e in browser.console_errors())


def test_page_with_api_keys(live, browser):
    """A server started with keys (python -m lora_lab.serve --api_key): the page itself loads without one (it holds
    nothing secret), the model list shows the API's 401 until a key is typed, then the key goes out as
    `Authorization: Bearer KEY` with every request and the page works."""
    from selenium.webdriver.common.by import By

    from lora_lab.serve.app import ServeOptions

    key = "sk-playground-0123456789"
    server = ModelServer.load(live.dir / "base", {"qv4": live.dir / "qv4"}, device="cpu", max_batch_size=2)
    keyed = LiveServer(server, ServeOptions(api_keys=(key,)))
    try:
        assert httpx.get(keyed.url + "/v1/models", timeout=30).status_code == 401
        d = browser.driver
        browser.console_errors()  # read (and so clear) what earlier tests left in the console log
        d.get(keyed.url + "/")
        browser.wait(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        assert "401" in d.find_element(By.ID, "adapter-message").text
        assert all("status of 401" in e for e in browser.console_errors())
        d.execute_script("""
            window.__auth = [];
            const original = window.fetch;
            window.fetch = (url, init) => { window.__auth.push((init && init.headers || {})['Authorization'] || null);
                                            return original(url, init); };""")
        field = d.find_element(By.ID, "api-key")
        field.send_keys(key)
        d.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
        browser.wait(lambda d: d.find_elements(By.CSS_SELECTOR, '#model-list li[data-model="qv4"]'),
                     what="the models, with the key")
        prompt = d.find_element(By.ID, "prompt")
        prompt.send_keys("Hello")
        d.find_element(By.ID, "max-tokens").clear()
        d.find_element(By.ID, "max-tokens").send_keys("4")
        d.find_element(By.ID, "send").click()
        browser.wait(lambda d: d.find_element(By.ID, "status").text == "done", timeout=120, what="the answers")
        for column in d.find_elements(By.CSS_SELECTOR, "#columns .column"):
            assert column.find_element(By.CSS_SELECTOR, ".error").get_attribute("hidden")
            assert text_of(column.find_element(By.CSS_SELECTOR, ".output"))
        sent = d.execute_script("return window.__auth")
        assert len(sent) >= 3 and set(sent) == {f"Bearer {key}"}  # /v1/models, then one request per column
        assert browser.console_errors() == []
    finally:
        keyed.stop()
