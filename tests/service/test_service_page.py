"""The web page in headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import threading

import pytest

from .service_helpers import find_program

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    executable = find_program("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_upload_progress_player_and_download_in_the_page(browser, live_server, inputs, tmp_path) -> None:
    server = live_server()
    server.wait_ready()
    page = browser.new_page(accept_downloads=True)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert "Model: tiny" in page.inner_text("#server")
    assert page.locator("#preset option").count() == 3
    assert page.is_hidden("#key-row")

    # A missing file is named before anything is sent.
    page.click("#submit")
    assert "portrait" in page.inner_text("#error")

    page.set_input_files("#image", str(inputs["image"]))
    page.set_input_files("#audio", str(inputs["audio"]))
    page.fill("#prompt", "A person is talking to the camera.")
    page.select_option("#preset", "fast")
    assert "16 steps" in page.inner_text("#preset-note")
    page.click("details summary")
    page.fill("#steps", "3")
    page.fill("#frames", "5")
    page.click("#submit")

    # The bar moves with the server-sent events: record what it showed.
    page.wait_for_selector("#status-box:not([hidden])")
    seen = page.evaluate("""() => new Promise((resolve) => {
        const values = [], texts = [];
        const timer = setInterval(() => {
            values.push(document.getElementById('bar').value);
            texts.push(document.getElementById('status').textContent);
            if (document.getElementById('status').dataset.status === 'succeeded') {
                clearInterval(timer); resolve({values, texts});
            }
        }, 20);
    })""")
    assert seen["values"][-1] == 1
    assert any(0 < v < 1 for v in seen["values"]), seen  # it showed progress on the way
    assert any("Generating" in t for t in seen["texts"]), seen["texts"]
    assert "Done" in page.inner_text("#status")

    page.wait_for_selector("#result:not([hidden])")
    duration = page.evaluate("""() => new Promise((resolve) => {
        const v = document.getElementById('player');
        if (v.readyState >= 1) resolve(v.duration);
        v.addEventListener('loadedmetadata', () => resolve(v.duration));
        v.addEventListener('error', () => resolve(-1));
    })""")
    assert duration == pytest.approx(0.2, abs=0.05)  # 5 frames at 25 fps, playable in Chromium

    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / "download.mp4"
    download.value.save_as(saved)
    assert saved.read_bytes()[4:8] == b"ftyp"
    assert not errors, errors
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


def test_the_page_shows_the_server_error_and_asks_for_the_key(browser, live_server, inputs) -> None:
    server = live_server(workers=0, api_keys="page-key")
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert page.is_visible("#key-row")
    page.set_input_files("#image", str(inputs["image"]))
    page.set_input_files("#audio", str(inputs["audio"]))
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.inner_text("#error")

    page.fill("#api-key", "page-key")
    page.check("#two-speakers")
    page.set_input_files("#audio2", str(inputs["audio"]))
    page.fill("#bbox1", "1, 2, 3")
    page.click("#submit")
    assert "four numbers" in page.inner_text("#error")
    page.fill("#bbox1", "0, 0, 120, 256")
    page.fill("#bbox2", "130, 0, 256, 256")
    page.click("#submit")
    page.wait_for_selector("#status-box:not([hidden])")
    page.wait_for_function("document.getElementById('status').dataset.status === 'queued'")
    assert page.is_visible("#cancel")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').dataset.status === 'cancelled'")


@pytest.mark.parametrize("key", [None, "live-key"], ids=["open", "with-key"])
def test_the_live_player_plays_the_finished_part_while_the_job_runs(browser, live_server, inputs, tmp_path,
                                                                    monkeypatch, key) -> None:
    from talkgen.pipeline import pipeline as pipeline_module
    from talkgen.service import worker as worker_module

    # 9-frame chunks (the page sets frames, not motion frames): 0.6 s of speech = 9 + 6 new frames.
    for model in list(pipeline_module.MOTION_FRAMES):
        monkeypatch.setitem(pipeline_module.MOTION_FRAMES, model, 1)
    release, original = threading.Event(), worker_module.ChunkSink.__call__

    def held(self, chunk):  # hold the job after its first chunk until the page has played it
        original(self, chunk)
        if chunk.index == 0:
            assert release.wait(60)

    monkeypatch.setattr(worker_module.ChunkSink, "__call__", held)
    server = live_server(**({"api_keys": key} if key else {}))
    server.wait_ready()
    page = browser.new_page()
    errors, requests = [], []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.set_input_files("#image", str(inputs["image"]))
        page.set_input_files("#audio", str(inputs["audio"]))
        page.click("details summary")
        page.fill("#steps", "1")
        page.fill("#frames", "9")
        page.check("#streaming")
        if key:  # hls.js sends it with every request for the playlist and the segments
            page.fill("#api-key", key)
        page.click("#submit")

        page.wait_for_selector("#live:not([hidden])", timeout=60_000)
        assert "0.36 s" in page.inner_text("#live-note")
        played = page.evaluate("""async () => {
            const v = document.getElementById('live-player');
            const until = (test, ms) => new Promise((resolve, reject) => {
                const t0 = Date.now();
                const tick = () => test() ? resolve() : Date.now() - t0 > ms ? reject(new Error('timed out')) : setTimeout(tick, 50);
                tick();
            });
            await until(() => v.buffered.length && v.buffered.end(0) > 0.3, 30000);
            v.muted = true;
            await v.play();
            await until(() => v.currentTime > 0.2, 30000);
            return {start: v.buffered.start(0), end: v.buffered.end(0), time: v.currentTime, width: v.videoWidth,
                    hls: typeof window.Hls};
        }""")
        assert played["hls"] == "function" and played["width"] > 0, played  # hls.js played it (MSE)
        # The first chunk's 9 frames; hls.js starts its clock at the AAC encoder's priming (64 ms before them).
        assert played["end"] - played["start"] == pytest.approx(0.36, abs=0.02) and played["start"] < 0.1, played
        assert page.evaluate("document.getElementById('status').dataset.status") == "running"
        page.screenshot(path=str(tmp_path / "live.png"), full_page=True)

        release.set()
        page.wait_for_function("document.getElementById('status').dataset.status === 'succeeded'", timeout=60_000)
        page.wait_for_selector("#result:not([hidden])")
        assert page.is_hidden("#live")  # the whole mp4 takes over
        duration = page.evaluate("""() => new Promise((resolve) => {
            const v = document.getElementById('player');
            if (v.readyState >= 1) resolve(v.duration);
            v.addEventListener('loadedmetadata', () => resolve(v.duration));
        })""")
        assert duration == pytest.approx(0.6, abs=0.05)
        assert all(url.startswith((server.url, "blob:", "data:")) for url in requests), requests  # nothing from elsewhere
        assert not errors, errors
    finally:
        release.set()
