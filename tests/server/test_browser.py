"""The web UI at /web in a real browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.servers import running_server

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
TOKEN = "browser-token"


def _chromium() -> str:
    """Path of Debian's chromium; skip without it, except in CI where it is required."""
    path = shutil.which("chromium")
    missing = None
    if path is None:
        missing = "chromium is not installed (apt-get install -y chromium)"
    else:
        try:
            import playwright  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[browser]')"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests are required in CI: {missing}")
        pytest.skip(missing)
    assert path is not None
    return path


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def run_code(page, code: str) -> None:
    from playwright.sync_api import expect

    steps_before = int(page.locator("#step-count").inner_text())
    page.fill("#code", code)
    page.click("#run")
    expect(page.locator("#step-count")).to_have_text(str(steps_before + 1))
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")


def test_type_run_persist_reset(page):
    from playwright.sync_api import expect

    with running_server() as server:
        page.goto(server.url + "/")
        assert page.url.endswith("/web/")
        expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        expect(page.locator("#episode-id")).not_to_have_text("—")
        first_episode = page.locator("#episode-id").inner_text()

        run_code(page, "x = 41\nprint('hello from the browser')")
        expect(page.locator("#stdout")).to_have_text("hello from the browser\n")
        expect(page.locator("#exit-code")).to_have_text("0")
        expect(page.locator("#reward")).to_have_text("0")
        expect(page.locator("#wall-time")).not_to_have_text("—")

        run_code(page, "print(x + 1)")
        expect(page.locator("#stdout")).to_have_text("42\n")
        expect(page.locator("#history li")).to_have_count(2)

        run_code(page, "raise ValueError('shown in red')")
        expect(page.locator("#exit-code")).to_have_text("1")
        expect(page.locator("#stderr")).to_contain_text("ValueError: shown in red")

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_ui.png"), full_page=True)

        page.click("#reset")
        expect(page.locator("#step-count")).to_have_text("0")
        expect(page.locator("#history li")).to_have_count(0)
        expect(page.locator("#episode-id")).not_to_have_text(first_episode)
        run_code(page, "print(x)")
        expect(page.locator("#stderr")).to_contain_text("NameError")


def test_token_is_asked_for_then_used(page):
    from playwright.sync_api import expect

    with running_server(token=TOKEN) as server:
        page.goto(server.url + "/web/")
        expect(page.locator("#status")).to_have_attribute("data-state", "auth")
        expect(page.locator("#token-dialog")).to_be_visible()
        page.fill("#token-input", TOKEN)
        page.click("#token-submit")
        expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        run_code(page, "print('authorised')")
        expect(page.locator("#stdout")).to_have_text("authorised\n")


def test_token_in_the_page_url_connects_directly(page):
    from playwright.sync_api import expect

    with running_server(token=TOKEN) as server:
        page.goto(f"{server.url}/web/?token={TOKEN}")
        expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        assert "token" not in page.url  # the page drops it from the address bar
        run_code(page, "print(2 ** 10)")
        expect(page.locator("#stdout")).to_have_text("1024\n")
