"""The page at ``/`` in a real headless Chromium (Debian's package, driven by Playwright).

Nothing is downloaded at test time: Playwright drives the system browser
(``/usr/bin/chromium``, from ``apt-get install chromium``) over its own
protocol, with a fresh empty profile. The test skips, saying why, where the
browser or the playwright package is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import layerrun

pytest.importorskip("fastapi")
from layerrun.server import running_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium chromium-driver)")
    sync = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a new, empty --user-data-dir
    with sync.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                   viewport={"width": 1400, "height": 900})
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.mark.slow
def test_page_chats_and_draws_the_timeline(browser, tiny_layered, tmp_path):
    eng = layerrun.load(tiny_layered("qwen2"), mode="stream", prefetch=2)
    want = eng.generate("Why is the sky blue?", max_new_tokens=24, ignore_eos=True)
    with running_server(eng, model_name="tiny") as s:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        failed = []  # any request to another host would fail offline: the page must make none
        page.on("request", lambda r: None if r.url.startswith(s.url) else failed.append(r.url))
        page.goto(s.url + "/")
        page.wait_for_function("window.layerrun && window.layerrun.messages > 0", timeout=30_000)
        assert page.inner_text("#model") == "tiny"
        assert page.inner_text("#mode").startswith("stream: 0 resident")
        assert "governor" in page.inner_text("#plan").lower() or page.inner_text("#plan").strip()
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "24")
        page.fill("#question", "Why is the sky blue?")
        page.click("#send")
        # the answer streams in: text appears before the request is done
        page.wait_for_function("document.querySelector('.msg.assistant') && "
                               "document.querySelector('.msg.assistant').textContent.length > 0", timeout=60_000)
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
        answer = page.eval_on_selector(".msg.assistant", "e => e.firstChild.textContent")
        assert answer == want.text
        # the live view received the steps of that answer and drew bars for reads and computes
        page.wait_for_function("window.layerrun.barsDrawn > 0 && "
                               "window.layerrun.events.some(e => e.kind === 'read' && e.slot !== null) && "
                               "window.layerrun.events.some(e => e.kind === 'compute')", timeout=30_000)
        stats = page.evaluate("({bars: window.layerrun.barsDrawn, slots: window.layerrun.slots})")
        assert stats["bars"] > eng.args.num_hidden_layers and stats["slots"] == 3
        memory = page.inner_text("#memory")
        assert "staging ring" in memory and "KV cache" in memory
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        assert (tmp_path / "page.png").stat().st_size > 10_000
        # /docs renders Swagger UI from this server's own assets
        page.goto(s.url + "/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
        page.close()
    eng.close()
    assert errors == [] and failed == []
    out = Path("/tmp/layerrun-page.png")
    try:
        shutil.copy(tmp_path / "page.png", out)  # for a person to look at
    except OSError:
        pass
