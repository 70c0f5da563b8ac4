"""The built-in chat page: served without the key, off with --disable-frontend, and driven in a
real headless Chromium (Debian's package, through playwright) against a server on a tiny model."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.server.conftest import API_KEY, http, spawn_server, stop_server


def test_page_and_its_files_need_no_key(server):
    import urllib.request

    for path, kind in (("/", "text/html"), ("/static/chat.js", "javascript"), ("/static/chat.css", "text/css")):
        with urllib.request.urlopen(server.url + path, timeout=10) as r:  # no Authorization header
            assert r.status == 200 and kind in r.headers["Content-Type"], (path, r.headers["Content-Type"])
            body = r.read().decode()
        assert "http://" not in body and "https://" not in body, f"{path} must not load anything remote"
    # everything else still needs it
    assert http(server, "GET", "/v1/models", auth=False)[0] == 401
    assert http(server, "GET", "/static/other.js", auth=False)[0] == 401


def test_disable_frontend_leaves_the_routes_out(tmp_path, tiny_model_path):
    srv = spawn_server(tmp_path / "server.log", "--model", str(tiny_model_path), "--disable-frontend")
    try:
        assert http(srv, "GET", "/")[0] == 404
        assert http(srv, "GET", "/", auth=False)[0] == 401
    finally:
        stop_server(srv)


def _metric(srv, name: str) -> float:
    import urllib.request

    from engine.bench.serve_client import metric_sum

    with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as r:
        return metric_sum(r.read().decode(), name) or 0.0


def _endless_model(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A random Llama that cannot pick EOS (its lm_head rows for the stop tokens are zero, so their logit
    is 0 while the largest of the other 49k is several sigma above it) and is slow enough (4 layers,
    hidden 256) that an 8,000-token answer runs for many seconds: stop is pressed on a running request
    however fast the machine, never after the answer has ended by itself."""
    from safetensors.torch import load_file, save_file

    from tests.conftest import make_tiny_llama

    path = make_tiny_llama(out_dir, tokenizer_dir, hidden_size=256, intermediate_size=1024, num_layers=4,
                           max_position_embeddings=8192)
    weights = load_file(path / "model.safetensors")
    for eos in (0, 1, 2):  # <|endoftext|>, <|im_start|>, <|im_end|> in the default model's tokenizer
        weights["lm_head.weight"][eos] = 0.0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_chat_page_streams_and_stops_in_chromium(tmp_path, default_model_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency (.[test])")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it: apt-get install chromium)")
    artifacts = Path(os.environ.get("ENGINE_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    model = _endless_model(tmp_path / "endless", default_model_path)
    srv = spawn_server(tmp_path / "server.log", "--model", str(model), "--max-model-len", "8192",
                       "--num-gpu-blocks-override", "600")
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 640})
                page.goto(srv.url + "/")
                page.fill("#api-key", API_KEY)
                page.dispatch_event("#api-key", "change")  # stored in sessionStorage, models reloaded
                page.wait_for_function("document.querySelectorAll('#model option').length > 0", timeout=20000)
                assert page.evaluate("sessionStorage.getItem('paged-engine.api-key')") == API_KEY
                aborted = _metric(srv, "vllm:num_aborted_requests_total")
                page.fill("#temperature", "0")
                page.fill("#max-tokens", "8000")  # with no EOS, still running when stop is pressed
                page.fill("#prompt", "Tell me a very long story about a lighthouse.")
                page.click("#send")
                answer = ".msg.assistant .text"
                page.wait_for_function(f"document.querySelector('{answer}').textContent.length > 0", timeout=60000)
                first = len(page.text_content(answer))
                page.wait_for_function(f"document.querySelector('{answer}').textContent.length > {first}",
                                       timeout=30000)  # it grows as events arrive
                # the live figures (polled from /metrics each second) show the running request
                page.wait_for_function("document.querySelector('#running').textContent === '1' && "
                                       "document.querySelector('#tps').textContent !== '–'", timeout=15000)
                assert page.text_content("#kv").endswith("%")
                page.screenshot(path=str(artifacts / "chat_page.png"))
                assert page.is_enabled("#stop")
                page.click("#stop")
                page.wait_for_function("document.querySelector('.msg.assistant .meta')?.textContent === 'stopped'",
                                       timeout=10000)
                assert page.is_enabled("#send") and not page.is_enabled("#stop")
            finally:
                browser.close()
        # the server saw the client go: the request was aborted (not finished) and gave its blocks back
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if (_metric(srv, "vllm:num_aborted_requests_total") == aborted + 1
                    and _metric(srv, "vllm:kv_cache_blocks_used") == 0):
                break
            time.sleep(0.2)
        assert _metric(srv, "vllm:num_aborted_requests_total") == aborted + 1
        assert _metric(srv, "vllm:kv_cache_blocks_used") == 0
        assert _metric(srv, "vllm:num_requests_running") == 0
    finally:
        stop_server(srv)
