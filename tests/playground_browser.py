"""Debian's headless Chromium driven by Selenium through the system chromedriver (nothing is downloaded): the
browser of tests/test_playground.py, and the screenshot of the playground in README.md and tutorials/serve.md:

    python tests/playground_browser.py http://127.0.0.1:8000/ tutorials/images/playground.png \
        --prompt "Review: ..." --columns HuggingFaceTB/SmolLM2-135M-Instruct,json

(Chromium and its driver: `apt-get install -y chromium chromium-driver`, as .ci/run does; `pip install selenium`.)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMEDRIVER, CHROMIUM):
        if not Path(path).exists() and not shutil.which(Path(path).name):
            return f"{path} is missing (apt-get install -y chromium chromium-driver)"
    return None


class Browser:
    """One headless Chromium with a fresh profile; `quit()` removes it."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="lora_lab-chromium-")
        options = webdriver.ChromeOptions()
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--window-size={width},{height}")
        options.add_argument(f"--user-data-dir={self.profile}")
        options.binary_location = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for the tests
        service = Service(CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver"))
        self.driver = webdriver.Chrome(service=service, options=options)

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def wait(self, condition, timeout: float = 60.0, what: str = "the page"):
        """Poll `condition(driver)` until it is truthy (returned) or `timeout` seconds pass (AssertionError)."""
        deadline = time.time() + timeout
        while True:
            value = condition(self.driver)
            if value:
                return value
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def text_of(element) -> str:
    """An element's exact text (Selenium's .text trims and folds whitespace)."""
    return element.get_attribute("textContent")


def screenshot(url: str, out: Path, prompt: str, models: list[str], max_tokens: int = 80) -> None:
    """Open the playground, put `prompt` to `models` side by side (greedy), save the page as a PNG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser = Browser(1400, 1250)
    try:
        d = browser.driver
        d.get(url)
        browser.wait(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        while len(d.find_elements(By.CSS_SELECTOR, "#columns .column")) < len(models):
            d.find_element(By.ID, "add-column").click()
        for column, model in zip(d.find_elements(By.CSS_SELECTOR, "#columns .column"), models):
            Select(column.find_element(By.CSS_SELECTOR, "select.model")).select_by_value(model)
        for field, value in (("prompt", prompt), ("max-tokens", str(max_tokens)), ("temperature", "0")):
            element = d.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        d.find_element(By.ID, "send").click()
        browser.wait(lambda d: d.find_element(By.ID, "status").text == "done", timeout=600, what="the answers")
        out.parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(out))
    finally:
        browser.quit()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="screenshot the playground")
    p.add_argument("url")
    p.add_argument("out", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--columns", required=True, help="comma-separated model names, one per column")
    p.add_argument("--max_tokens", type=int, default=80)
    args = p.parse_args()
    screenshot(args.url, args.out, args.prompt, args.columns.split(","), args.max_tokens)
