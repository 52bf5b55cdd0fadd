"""The built-in web page (ferry/server/webui/) in a real headless browser: the distribution's chromium driven by
Playwright's Python package, against real `python -m ferry.server` processes on the in-house model ferry-tiny.

Skips (with the reason) only when Playwright or a chromium binary is missing; `make install` sets both up."""
from __future__ import annotations

import json
import pathlib
import shutil
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import REPO_ROOT, Server

pw = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed (make install)")
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and pathlib.Path(p).exists()), None)
if CHROMIUM is None:
    pytest.skip("no chromium binary (apt-get install chromium; `make install` does it where apt is available)",
                allow_module_level=True)

MODEL = REPO_ROOT / "ferry" / "assets" / "ferry-tiny"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
KEY = "sesame-webui"
LOOPING = "How do I read a file in Python?"  # greedy decoding loops on it until max tokens (issue 24)


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> Server:
    server = Server(MODEL, "--served-model-name", "ferry-tiny", log_path=tmp_path_factory.mktemp("web") / "log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, server: Server, **settings: object):
    """A fresh context (empty storage) on the page; every request it makes is recorded in page.requests."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(server.url + "/")
    page.wait_for_selector("#model:not(:empty)")
    if settings:
        page.click("#settings summary")
        for name, value in settings.items():
            page.fill(f"#{name}", str(value))
            page.dispatch_event(f"#{name}", "change")
    return page


def only_local(page, server: Server) -> None:
    """The page asked nothing of any host but the server."""
    foreign = [u for u in page.requests if not (u.startswith(server.url + "/") or u.startswith(("blob:", "data:")))]
    assert not foreign, foreign
    page.context.close()


def send(page, text: str, wait: bool = True) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    if wait:
        page.wait_for_selector("#send:not([hidden])", timeout=60_000)


def messages(page) -> list[dict]:
    return page.evaluate("""() => { const s = JSON.parse(localStorage.getItem('ferry.convs'));
        return s.find(c => c.id === localStorage.getItem('ferry.current')).messages; }""")


def api_answer(server: Server, messages_: list[dict], max_tokens: int) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": messages_, "temperature": 0, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_page_is_small_and_locked_to_the_server(web):
    r = httpx.get(web.url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "http" not in csp
    files = ["index.html"] + [f"webui/{p.name}" for p in (REPO_ROOT / "ferry/server/webui").iterdir()]
    sizes = [len(httpx.get(f"{web.url}/{f}").content) for f in files]
    assert sum(sizes) < 100_000, dict(zip(files, sizes))


def test_send_streams_the_greedy_answer_then_regenerate_and_edit(browser, web):
    page = open_page(browser, web, temperature=0, max_tokens=24)
    send(page, "Hello")
    msgs = messages(page)
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    expected = api_answer(web, [{"role": "user", "content": "Hello"}], 24)
    assert msgs[1]["content"] == expected and expected
    stats = msgs[1]["stats"]
    assert stats["completion_tokens"] == 24 and stats["finish"] == "length" and stats["prompt_tokens"] > 0
    assert stats["ttft_ms"] > 0 and stats["gen_tps"] > 0
    assert "TTFT" in page.text_content(".msg.assistant .stats")

    page.click(".msg.assistant .regenerate")
    page.wait_for_selector("#send:not([hidden])")
    again = messages(page)
    assert len(again) == 2 and again[1]["content"] == expected  # greedy: the same answer

    page.click(".msg.user .edit")
    page.fill(".msg.user textarea", "Tell me about Debian")
    page.click(".msg.user .save-edit")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    edited = messages(page)
    assert [m["content"] for m in edited[:1]] == ["Tell me about Debian"] and len(edited) == 2
    assert edited[1]["content"] == api_answer(web, [{"role": "user", "content": "Tell me about Debian"}], 24)
    only_local(page, web)


def test_stop_aborts_the_request_on_the_server(browser, web):
    before = web.wait_idle().get('ferry_request_success_total{finished_reason=abort}', 0.0)
    page = open_page(browser, web, temperature=0, max_tokens=4000)
    send(page, LOOPING, wait=False)
    page.wait_for_function("() => document.querySelector('.msg.assistant .body').textContent.length > 5")
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])")
    assert messages(page)[1]["stats"]["finish"] == "stopped"
    after = web.wait_idle()
    assert after["ferry_num_requests_running"] == 0
    assert after.get('ferry_request_success_total{finished_reason=abort}', 0.0) == before + 1
    only_local(page, web)


def test_export_then_import(browser, web, tmp_path):
    page = open_page(browser, web, temperature=0, max_tokens=8)
    send(page, "Hi")
    original = messages(page)
    with page.expect_download() as download:
        page.click("#export")
    path = tmp_path / "chat.json"
    download.value.save_as(path)
    data = json.loads(path.read_text())
    assert [m["content"] for m in data["conversation"]["messages"]] == [m["content"] for m in original]
    page.set_input_files("#import", str(path))
    page.wait_for_function("() => document.querySelectorAll('#convs li').length === 2")
    assert [m["content"] for m in messages(page)] == [m["content"] for m in original]
    assert page.text_content(".msg.user .body") == "Hi"
    only_local(page, web)


def test_engine_panel_numbers_move_while_a_request_runs(browser, web):
    page = open_page(browser, web)
    page.click("#tab-stats")
    page.wait_for_selector("[data-stat='Generated tokens']")
    first = int(page.text_content("[data-stat='Generated tokens']"))
    body = {"prompt": LOOPING, "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    worker = threading.Thread(target=httpx.post, args=(web.url + "/v1/completions",), kwargs={"json": body, "timeout": 120})
    worker.start()
    page.wait_for_function(f"() => +document.querySelector(\"[data-stat='Generated tokens']\").textContent > {first}",
                           timeout=30_000)
    assert page.text_content("[data-stat='KV policy']") == "full"
    assert "/" in page.text_content("[data-stat='KV blocks']")
    worker.join()
    only_local(page, web)


CRAFTED = ("<script>window.__pwned = 1</script> and <img src=x onerror=\"window.__pwned = 2\">\n"
           "```html\n<script>window.__pwned = 3</script>\n```\n**<b>bold</b>**")


def test_model_output_is_shown_as_text_never_as_html(browser, web):
    page = open_page(browser, web)
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": CRAFTED[i:i + 7]}}]} for i in range(0, len(CRAFTED), 7)]
    chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=sse))
    send(page, "say something nasty")
    assert messages(page)[1]["content"] == CRAFTED
    body = page.locator(".msg.assistant .body")
    text = body.text_content()
    assert "<script>window.__pwned = 1</script>" in text and '<img src=x onerror="window.__pwned = 2">' in text
    assert "<script>window.__pwned = 3</script>" in page.text_content(".msg.assistant pre code")
    assert page.evaluate("() => document.querySelectorAll('#messages script, #messages img, #messages b').length") == 0
    time.sleep(0.2)
    assert page.evaluate("() => window.__pwned") is None
    only_local(page, web)


def test_works_with_api_key(browser, tmp_path_factory):
    server = Server(MODEL, "--api-key", KEY, log_path=tmp_path_factory.mktemp("web-key") / "log")
    try:
        assert httpx.get(server.url + "/v1/stats/stream").status_code == 401
        context = browser.new_context()
        page = context.new_page()
        page.requests = []
        page.on("request", lambda r: page.requests.append(r.url))
        page.goto(server.url + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#key", "wrong")
        page.click("#key-form button")
        page.wait_for_function("() => document.getElementById('key-error').textContent.includes('incorrect')")
        page.fill("#key", KEY)
        page.click("#key-form button")
        page.wait_for_selector("#key-form[hidden]", state="attached")
        assert page.text_content("#model") == str(MODEL)
        page.click("#settings summary")
        page.fill("#max_tokens", "6")
        page.dispatch_event("#max_tokens", "change")
        send(page, "Hi")
        msgs = messages(page)
        assert msgs[1]["stats"]["completion_tokens"] >= 1 and "error" not in msgs[1]
        page.click("#tab-stats")
        page.wait_for_selector("[data-stat='Running']")
        only_local(page, server)
    finally:
        server.stop()


def test_an_open_engine_tab_does_not_hold_shutdown(tmp_path):
    """The stats feed never ends by itself; SIGTERM must still stop the server within seconds, not after
    --request-timeout (uvicorn's graceful shutdown waits for open responses)."""
    server = Server(MODEL, log_path=tmp_path / "log")
    lines: list[str] = []

    def read() -> None:
        with httpx.stream("GET", server.url + "/v1/stats/stream", timeout=60) as r:
            lines.extend(line for line in r.iter_lines() if line.startswith("data:"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while not lines and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lines, "no stats event within 10 s"
    start = time.monotonic()
    assert server.stop(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    assert time.monotonic() - start < 10
    reader.join(timeout=5)
    assert not reader.is_alive()


def test_phone_width_and_theme_toggle(browser, web):
    context = browser.new_context(viewport={"width": 390, "height": 800}, color_scheme="light")
    page = context.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(web.url + "/")
    page.wait_for_selector("#model:not(:empty)")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # nothing wider than a phone
    assert page.is_visible("#input") and page.is_visible("#send") and page.is_visible("#new-conv")
    background = "() => getComputedStyle(document.body).backgroundColor"
    light = page.evaluate(background)
    page.click("#theme")
    dark = page.evaluate(background)
    assert light != dark and page.evaluate("() => document.documentElement.dataset.theme") == "dark"
    page.reload()
    page.wait_for_selector("#model:not(:empty)")
    assert page.evaluate(background) == dark  # the choice is kept
    only_local(page, web)
