"""The in-process executor runs every call into its worker on one thread of its own, whichever
thread drives the engine (engine/executor/base.py, UniProcExecutor): the server builds the engine on
its main thread and steps it on its loop thread, and a second thread opening OpenMP regions made
libgomp stop spin-waiting (served decode steps 30 ms instead of 19)."""
from __future__ import annotations

import os
import threading

from engine.sampling_params import SamplingParams
from engine.worker.worker import Worker

PROMPTS = [{"prompt_token_ids": list(range(5 + i, 40 + 2 * i))} for i in range(4)]
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_every_worker_call_runs_on_the_worker_thread(tiny_model_path, monkeypatch):
    from engine.entrypoints.llm import LLM

    seen: dict[str, set[int]] = {}
    for name in ("init_device", "load_model", "init_cache", "execute_model", "shutdown"):
        method = getattr(Worker, name)

        def record(self, *args, _name=name, _method=method, **kwargs):
            seen.setdefault(_name, set()).add(threading.get_ident())
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(Worker, name, record)
    llm = LLM(str(tiny_model_path), dtype="float32", num_gpu_blocks_override=64)
    on_main = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    threads_after_main = _os_threads()  # every pool the steps use exists by now

    result: dict = {}

    def drive() -> None:
        result["tokens"] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
        result["threads"] = _os_threads()

    t = threading.Thread(target=drive)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive()
    assert result["tokens"] == on_main
    # only the driving thread itself is new: no second OpenMP or torch thread team was started
    assert result["threads"] == threads_after_main + 1
    llm.llm_engine.shutdown()
    worker_threads = set().union(*seen.values())
    assert len(worker_threads) == 1, seen
    assert worker_threads.isdisjoint({threading.main_thread().ident, t.ident})
    assert set(seen) == {"init_device", "load_model", "init_cache", "execute_model", "shutdown"}
