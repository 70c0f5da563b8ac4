"""One real server process (the default model, 127.0.0.1, a free port) shared by the server tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

API_KEY = "test-key-123"
MODEL_NAME = "smol-test"
MAX_MODEL_LEN = 512
MAX_BODY = 1 << 20
# keeps the KV cache (and start-up) small: 256 blocks x 16 tokens hold 32 streams with room to spare
NUM_BLOCKS = 256
ENGINE_ARGS = dict(max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=NUM_BLOCKS)


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    log_path: Path
    proc: subprocess.Popen

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def http(server: "Server", method: str, path: str, body: object = None, *, data: bytes | None = None,
         headers: dict | None = None, auth: bool = True, timeout: float = 60) -> tuple[int, object]:
    """A raw HTTP request to the server: (status, parsed JSON body or text)."""
    import json

    hdrs = {"Authorization": f"Bearer {API_KEY}"} if auth else {}
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def tokenize(server: "Server", text: str) -> list[int]:
    status, out = http(server, "POST", "/tokenize", {"prompt": text})
    assert status == 200, out
    return out["tokens"]


def spawn_server(log_path: Path, *extra_args: str) -> Server:
    """Starts ``python -m engine serve`` with the test settings (plus ``extra_args``) and waits
    until it is healthy; the caller stops it (``stop_server``)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "engine", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", MODEL_NAME,
        "--api-key", API_KEY,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--num-gpu-blocks-override", str(NUM_BLOCKS),
        "--max-request-body-bytes", str(MAX_BODY),
        "--log-stats-interval", "1",
        *extra_args,
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", log_path, proc)
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{srv.log()[-4000:]}")
            try:
                if _get(srv.url + "/health") == 200:
                    return srv
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not become healthy in 180 s:\n{srv.log()[-4000:]}")
            time.sleep(0.5)
    except BaseException:
        stop_server(srv)
        raise


def stop_server(srv: Server) -> None:
    if srv.proc.poll() is not None:
        return
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server(tmp_path_factory, default_model_path) -> Server:
    srv = spawn_server(tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="session")
def client(server):
    import openai

    with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def async_client(server: Server):
    """An AsyncOpenAI client; use it inside the coroutine given to asyncio.run."""
    import openai

    return openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def reference_llm(default_model_path):
    """The offline LLM with the server's engine settings, for greedy comparisons."""
    from engine.entrypoints.llm import LLM

    llm = LLM(**ENGINE_ARGS)
    yield llm
    llm.shutdown()
