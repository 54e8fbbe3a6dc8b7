"""The web demo in a real headless browser: Debian's chromium, driven by Playwright, talks to `streamlit run`.

The server runs in a subprocess from a launcher this test writes: it makes the demo's model loader return a tiny
model that emits scripted replies, a little slowly so streaming can be seen, then starts streamlit in-process.
Needs /usr/bin/chromium (`apt-get install chromium`; .ci/run installs it where it can) and Playwright (in
requirements.txt; never `playwright install`: its browser download is not used). Without them the test skips.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from test_serve_openai_api import write_tiny_checkpoint
from test_web_demo import CALL, ROOT, TINY_WEB_FLAGS, WEB_DEMO, free_port, served, server_flags

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install -r requirements.txt")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GREETING = "Hello from a scripted model, streamed one token at a time."
FINAL = "So the product is fifty-six thousand and eighty-eight."
REPLIES = [GREETING, f"Let me compute.{CALL} One moment please, while the call is shown and waits.", FINAL]
STEP_DELAY = 0.08  # seconds per generated token: a reply takes about a second to stream

LAUNCHER = '''"""Serve scripts/web_demo.py with a model whose replies are scripted (written by tests/test_web_browser.py)."""
import sys
import time

sys.path[:0] = [{root!r}, {tests!r}]
import model.loading
from streamlit.web import cli
from test_eval_model import scripted_replies

real_load_model = model.loading.load_model
scripts = []  # held for the server's whole life: a collected context manager would remove its hook


def load_scripted(args):
    tiny_model, tokenizer = real_load_model(args)
    scripts.append(scripted_replies(tiny_model, tokenizer, {replies!r}))
    scripts[-1].__enter__()
    tiny_model.register_forward_hook(lambda *_: time.sleep({delay!r}))
    return tiny_model, tokenizer


model.loading.load_model = load_scripted
sys.argv = ["streamlit", "run", {web_demo!r}, *sys.argv[1:]]
sys.exit(cli.main())
'''


@pytest.fixture
def chromium_page(tmp_path):
    """A page of a fresh headless chromium (its own empty profile)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}: apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        browser.set_default_timeout(60_000)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_browser_streams_a_reply_then_shows_a_tool_call_and_its_result(chromium_page, tmp_path):
    page = chromium_page
    write_tiny_checkpoint(tmp_path / "out" / "full_sft_64.pth")
    launcher = tmp_path / "serve_scripted.py"
    launcher.write_text(LAUNCHER.format(root=str(ROOT), tests=str(ROOT / "tests"), replies=REPLIES,
                                        delay=STEP_DELAY, web_demo=str(WEB_DEMO)))
    port = free_port()
    command = [sys.executable, str(launcher), *server_flags(port),
               "--", "--out_dir", str(tmp_path / "out"), *TINY_WEB_FLAGS.split(), "--max_seq_len", "2048"]
    with served(command, port, tmp_path / "streamlit.log") as url:
        page.goto(url)
        messages = page.get_by_test_id("stChatMessage")
        chat_input = page.get_by_placeholder("Message MiniMind")

        chat_input.fill("hello")
        chat_input.press("Enter")
        # Streamed: part of the reply is on the page before all of it is
        page.wait_for_function("""([greeting]) => {
            const shown = [...document.querySelectorAll('[data-testid="stChatMessage"]')].at(-1)?.innerText ?? '';
            const words = greeting.split(' ');
            return shown.includes(words[0]) && !shown.includes(words.at(-1));
        }""", arg=[GREETING])
        sync_api.expect(messages.nth(1)).to_contain_text(GREETING)

        tools = page.get_by_role("switch", name="Tools")  # in the sidebar, off by default
        sync_api.expect(tools).not_to_be_checked()
        page.get_by_test_id("stSidebar").get_by_text("Tools", exact=True).click()  # its label: the input is covered
        sync_api.expect(tools).to_be_checked()
        chat_input.fill("What is 123*456?")
        chat_input.press("Enter")
        # The call shows as soon as it is complete, while the model still writes the rest of its reply
        page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="stExpander"]')]
            .some(e => e.innerText.includes('🔧 calculator') && e.innerText.includes('⏳ running'))""")
        sync_api.expect(messages.nth(3)).to_contain_text(FINAL)
        call = messages.nth(3).get_by_test_id("stExpander")
        sync_api.expect(call).to_have_count(1)
        call.get_by_text("🔧 calculator").click()  # kept in the history collapsed
        sync_api.expect(call).to_contain_text(json.dumps({"expression": "123*456"}))
        sync_api.expect(call).to_contain_text("56088")
        sync_api.expect(messages.nth(3)).to_contain_text("Let me compute.")
        page.screenshot(path=str(tmp_path / "tool_call.png"), full_page=True)
