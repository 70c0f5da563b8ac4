"""vLLM's CPU build as an offline peer, run by the Python of its own virtualenv (``--vllm-python`` or
``$VLLM_PYTHON``) with the settings of ../shared/platform.md: same weights, fp32, greedy, exact
output lengths. Its process loads the model, warms up and says ``READY``; only then does the
parent wait for a quiet machine and start timing, so vLLM's start-up (45 s or more) is outside the
timed region and the other-cores figure covers exactly the timed work."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from engine.bench.datasets import BenchRequest
from engine.bench.peers import DecodeJob, Peer

READY = "@@BENCH-READY@@"

# Runs inside vLLM's own virtualenv: stdlib and vllm only.
_SCRIPT = r'''
import json, sys, time

READY = "@@BENCH-READY@@"


def main():
    from vllm import LLM, SamplingParams

    job = json.load(open(sys.argv[1]))
    as_prompt = lambda p: p if isinstance(p, str) else {"prompt_token_ids": p}
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype="float32", max_model_len=job["max_model_len"], seed=0)
    startup = time.perf_counter() - t0
    prompts = [as_prompt(p) for p in job["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True) for n in job["output_lens"]]
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    print(READY, flush=True)
    repeat = int(sys.stdin.readline().split()[1])
    dj = job.get("decode")

    def decode_step():
        # a one-token pass and an n-token pass of the same prompt: the difference is n - 1 decode steps
        p, n = as_prompt(dj["prompt"]), dj["tokens"]
        t0 = time.perf_counter()
        llm.generate([p], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate([p], SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True), use_tqdm=False)
        return ((time.perf_counter() - t1) - (t1 - t0)) / (n - 1)

    decode = [decode_step() for _ in range(dj["repeats"])] if dj else []
    iterations = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        iterations.append(time.perf_counter() - t0)
    decode += [decode_step() for _ in range(dj["repeats"])] if dj else []
    json.dump({"iterations": iterations, "startup_s": startup, "decode_step_s": decode,
               "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}, open(sys.argv[2], "w"))


if __name__ == "__main__":  # vLLM starts its engine core with multiprocessing's spawn
    main()
'''


def vllm_env() -> dict[str, str]:
    """vLLM's CPU settings for this machine (../shared/platform.md)."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_USE_AOT_COMPILE": "0", "HF_HUB_OFFLINE": "1"}
    tcmalloc = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    if Path(tcmalloc).exists():
        env["LD_PRELOAD"] = tcmalloc
    return env


class VLLMPeer(Peer):
    """vLLM's offline ``LLM.generate`` on the whole workload at once (its own scheduler batches it),
    and optionally single-request decode (``decode``) in the same process."""

    name = "vLLM CPU"

    def __init__(self, python: str | None, model_dir: str, max_model_len: int = 2048,
                 decode: DecodeJob | None = None) -> None:
        self.python = python or os.environ.get("VLLM_PYTHON")
        self.model_dir, self.max_model_len, self.decode = model_dir, max_model_len, decode
        self.version = "?"
        self.startup_s: float | None = None
        self.decode_step_s = []
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def settings(self) -> str:
        threads = f"0-{(os.cpu_count() or 1) - 1}"
        return (f"vllm-cpu {self.version}, fp32, greedy, max_model_len={self.max_model_len}, "
                f"prefix caching on (its default), OMP threads bound to {threads}")

    def unavailable(self) -> str | None:
        if not self.python:
            return "no vLLM virtualenv: pass --vllm-python PATH (or set VLLM_PYTHON); recipe in docs/benchmarks.md"
        if not Path(self.python).exists():
            return f"{self.python} does not exist"
        probe = subprocess.run([self.python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                               timeout=300, env=vllm_env())
        if probe.returncode != 0:
            return f"{self.python} cannot import vllm: {probe.stderr.decode(errors='replace').strip()[-200:]}"
        self.version = probe.stdout.decode().strip().splitlines()[-1] if probe.stdout.strip() else "?"
        return None

    def prepare(self, requests: list[BenchRequest]) -> None:
        """Starts vLLM's process and waits until it has loaded and warmed up."""
        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        job = {"model": self.model_dir, "max_model_len": self.max_model_len,
               "prompts": [r.prompt if r.prompt_token_ids is None else r.prompt_token_ids for r in requests],
               "output_lens": [r.output_len for r in requests]}
        if self.decode is not None:
            r = self.decode.request
            job["decode"] = {"prompt": r.prompt if r.prompt_token_ids is None else r.prompt_token_ids,
                             "tokens": self.decode.tokens, "repeats": self.decode.repeats}
        (tmp / "job.json").write_text(json.dumps(job))
        (tmp / "run_vllm.py").write_text(_SCRIPT)
        self._log = tmp / "vllm.log"
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen([self.python, str(tmp / "run_vllm.py"), str(tmp / "job.json"),
                                           str(tmp / "out.json")], env=vllm_env(), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=log)
        for line in self._proc.stdout:
            if line.decode(errors="replace").strip() == READY:
                return
        self._proc.wait(timeout=60)
        raise RuntimeError(f"vLLM exited with {self._proc.returncode} before it was ready: {self._log_tail()}")

    def _log_tail(self) -> str:
        return self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""

    def generate(self, requests: list[BenchRequest]) -> int:
        return self.timed_generate(requests, 1)[0]

    def timed_generate(self, requests: list[BenchRequest], repeat: int) -> tuple[int, list[float]]:
        """vLLM times its own generate calls (``repeat`` passes) and decode steps."""
        assert self._proc is not None and self._tmp is not None, "prepare() first"
        self._proc.stdin.write(f"go {repeat}\n".encode())
        self._proc.stdin.close()
        for _ in self._proc.stdout:  # whatever vLLM prints, until it exits
            pass
        if self._proc.wait(timeout=3600) != 0:
            raise RuntimeError(f"vLLM failed ({self._proc.returncode}): {self._log_tail()}")
        res = json.loads((Path(self._tmp.name) / "out.json").read_text())
        self.startup_s, self.decode_step_s = res["startup_s"], res["decode_step_s"]
        return res["tokens"], res["iterations"]

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
