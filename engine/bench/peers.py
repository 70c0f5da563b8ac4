"""The systems a benchmark compares, each behind one interface: transformers (one request at a
time, and static batches), llama.cpp through llama-cpp-python, and vLLM's CPU build from its own
virtualenv (engine/bench/vllm_peer.py). A peer that cannot run here says why in one line and is
skipped; every peer gets the same prompts, greedy, with exact output lengths."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
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


@dataclass
class DecodeJob:
    """Single-request decode: one prompt generating ``tokens`` tokens, ``repeats`` times before the
    workload and again after it (the fastest pass counts: the machine is shared)."""
    request: BenchRequest
    tokens: int = 128
    repeats: int = 3


class Peer(ABC):
    name: str
    settings: str
    decode_step_s: list[float]  # single-request decode, seconds per step of each pass (peers that measure it)

    def unavailable(self) -> str | None:
        """Why this peer cannot run here, or None."""
        return None

    @abstractmethod
    def generate(self, requests: list[BenchRequest]) -> int:
        """Generates every request's output (greedy, exactly its output_len); returns the tokens made."""

    def measure(self, requests: list[BenchRequest], repeat: int = 1,
                settle: Callable[[], object] | None = None) -> PeerResult:
        """Loads (untimed), calls ``settle`` (waiting for a quiet machine), then generates
        ``requests`` ``repeat`` times; seconds is the mean."""
        reason = self.unavailable()
        if reason is not None:
            return PeerResult(self.name, self.settings, ran=False, reason=reason)
        try:
            self.prepare(requests)
            if settle is not None:
                settle()
            with OtherLoad() as load:
                tokens, iterations = self.timed_generate(requests, repeat)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # the run goes on; the table says why
            return PeerResult(self.name, self.settings, ran=False, reason=f"failed: {str(e)[-300:]}")
        finally:
            self.close()
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

    def close(self) -> None:
        """Frees what ``prepare`` loaded."""


class TransformersPeer(Peer):
    """transformers ``generate``: ``sequential`` (one request at a time) or ``static`` (batches in
    arrival order, left-padded, every request of a batch generating the batch's longest output;
    only the requested tokens count)."""

    def __init__(self, model_dir: str, mode: str = "sequential", batch: int = 16) -> None:
        self.model_dir, self.mode, self.batch = model_dir, mode, batch
        self.name = f"transformers ({mode})"
        self.settings = "fp32, greedy" + (f", batches of {batch}, left padding" if mode == "static" else "")
        self.model = self.tok = None
        self.decode_step_s = []

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

    def close(self) -> None:
        self.model = self.tok = None

    def _encode(self, group: list[BenchRequest]) -> dict:
        """Left-padded input ids and attention mask; token-id prompts are padded with id 0."""
        import torch

        if group[0].prompt_token_ids is None:
            return dict(self.tok([r.prompt for r in group], return_tensors="pt", padding=True))
        ids = [r.prompt_token_ids for r in group]
        width = max(len(p) for p in ids)
        return {"input_ids": torch.tensor([[0] * (width - len(p)) + p for p in ids]),
                "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])}

    def generate(self, requests: list[BenchRequest]) -> int:
        import torch

        from tqdm import tqdm

        size = 1 if self.mode == "sequential" else self.batch
        tokens = 0
        with torch.inference_mode():
            for i in tqdm(range(0, len(requests), size), desc=self.name, unit="batch" if size > 1 else "req",
                          dynamic_ncols=True):
                group = requests[i:i + size]
                enc = self._encode(group)
                n = max(r.output_len for r in group)
                out = self.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
                if out.shape[1] - enc["input_ids"].shape[1] != n:
                    raise RuntimeError("transformers generated another length than requested")
                tokens += sum(r.output_len for r in group)
        return tokens


class LlamaCppPeer(Peer):
    """llama.cpp through llama-cpp-python, one request at a time, on the GGUF file as shipped."""

    name = "llama.cpp (llama-cpp-python)"

    def __init__(self, gguf_path: str | None) -> None:
        self.gguf_path = gguf_path
        self.settings = f"{Path(gguf_path).name if gguf_path else 'no GGUF'}, greedy, one at a time, EOS banned"
        self.llm = None
        self.decode_step_s = []

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
            prompt = r.prompt if r.prompt_token_ids is None else r.prompt_token_ids
            out = self.llm.create_completion(prompt, max_tokens=r.output_len, temperature=0.0,
                                             logit_bias={eos: -1e9})
            tokens += out["usage"]["completion_tokens"]
        return tokens

    def close(self) -> None:
        self.llm = None


def llama_server_binary() -> str | None:
    return shutil.which("llama-server")
