"""A Ray cluster started with ``ray start --head`` on 127.0.0.1: ``LLM(..., tensor_parallel_size=2)``
and ``python -m engine serve --tensor-parallel-size 2`` attach to it through RAY_ADDRESS, place
their workers there, and give the cluster's CPUs back when they stop. The cluster is stopped by
signalling the ``ray start --block`` process this module started (never ``ray stop``, which would
stop every Ray instance on the host)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p.pid)
        except OSError:
            pass
    return out


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout} s\n{log.read_text()[-4000:] if log else ''}")


@pytest.fixture(scope="module")
def ray_head():
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="pe-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = Path(temp_dir) / "ray-start.log"
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
        "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "Ray runtime started" in log.read_text(), 120, "ray start", proc, log)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGTERM)  # ray start --block stops its processes on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        left = session_pids(proc.pid)
        for pid in left:  # only processes of the session this fixture started
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"ray start left processes behind: {left}"


@pytest.fixture(scope="module")
def tp1_text(tiny_model_path):
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=64)
    out = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]
    return out.text, list(out.token_ids)


def test_llm_attaches_to_running_cluster(ray_head, tiny_model_path, tp1_text, monkeypatch):
    import ray

    address, _ = ray_head
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", address)
    llm = LLM(str(tiny_model_path), tensor_parallel_size=2, num_gpu_blocks_override=64)
    try:
        assert ray.get_runtime_context().gcs_address == address
        assert ray.available_resources().get("CPU", 0) == 0, "both CPUs of the cluster hold this engine's ranks"
        out = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]
        assert list(out.token_ids) == tp1_text[1]
    finally:
        llm.shutdown()
    assert not ray.is_initialized(), "the engine disconnects the connection it opened"
    ray.init(address=address)
    try:
        wait_for(lambda: ray.available_resources().get("CPU") == 2.0, 15, "CPUs given back")
    finally:
        ray.shutdown()


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_serve_tp2_on_cluster(ray_head, tiny_model_path, tp1_text, tmp_path):
    import psutil
    import ray

    address, head = ray_head
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = dict(os.environ, RAY_ADDRESS=address)
    cmd = [
        sys.executable, "-m", "engine", "serve", "--model", str(tiny_model_path), "--tensor-parallel-size", "2",
        "--port", str(port), "--served-model-name", "tiny", "--num-gpu-blocks-override", "64", "--disable-log-stats",
    ]
    with open(log, "w") as f:
        server = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: _health(url) == 200, 180, "server /health", server, log)
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        req = urllib.request.Request(url + "/v1/completions", body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            text = json.loads(r.read())["choices"][0]["text"]
        assert text == tp1_text[0]
        # the workers live in the cluster ray start made, and every socket listens on loopback
        ray.init(address=address)
        try:
            assert ray.available_resources().get("CPU", 0) == 0
            pids = set(session_pids(head.pid)) | {server.pid}
            pids |= {c.pid for c in psutil.Process(server.pid).children(recursive=True)}
            lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout.splitlines()
            ours = [ln for ln in lines if any(f"pid={p}," in ln for p in pids)]
            assert len(ours) >= 4, lines
            bad = [ln for ln in ours if not ln.split()[3].startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"))]
            assert not bad, bad
            t0 = time.monotonic()
            server.send_signal(signal.SIGINT)
            assert server.wait(60) == 0, log.read_text()[-3000:]
            assert time.monotonic() - t0 < 60
            wait_for(lambda: ray.available_resources().get("CPU") == 2.0, 20, "CPUs given back after the server stopped")
        finally:
            ray.shutdown()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert f"Ray: connected to {address}" in log.read_text()
