"""A process that ran ``LLM(tensor_parallel_size=2)`` (or ``data_parallel_size=2``) over Ray and exits without calling shutdown
(at the end of the script, or on SIGTERM): its exit status is 0 (143 for SIGTERM, not Ray's abort)
and no process it started (the local cluster: GCS, raylet, the agents, the two workers) outlives it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent("""
    import json, sys
    import psutil
    from engine import LLM, SamplingParams

    llm = LLM(sys.argv[1], **json.loads(sys.argv[3]), max_model_len=128, num_gpu_blocks_override=16)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    print("RESULT " + json.dumps({"tokens": out[0].outputs[0].token_ids, "pids": pids}), flush=True)
    # no llm.shutdown(): interpreter exit (or SIGTERM) must tear Ray down
    if sys.argv[2] == "wait":
        sys.stdin.read()  # until the test signals
""")


TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}
DP2 = {"data_parallel_size": 2}  # two replica actors and the front end's event-loop thread


@pytest.mark.parametrize("layout,how,want_status", [(TP2, "exit", 0), (TP2, "sigterm", 128 + signal.SIGTERM),
                                                    (DP2, "exit", 0)])
def test_tp2_over_ray_exits_cleanly_and_leaves_no_process(tiny_model_path, layout, how, want_status):
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("ray")
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # a cluster of its own, never an attached one
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_model_path), "wait" if how == "sigterm" else "-",
                             json.dumps(layout)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        result, lines = None, []
        for line in proc.stdout:  # bounded: the child ends (or is killed below) within the timeout
            lines.append(line)
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
                break
        if result is not None and how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = "".join(lines) + out[-3000:] + err[-5000:]
    assert result is not None, log
    assert proc.returncode == want_status, log
    assert len(result["tokens"]) == 6
    assert len(result["pids"]) >= 3, result  # the cluster's processes and the two workers did run

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + 10
    left = [p for p in result["pids"] if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    described = []
    for p in left:
        try:
            described.append(f"{p}: {' '.join(psutil.Process(p).cmdline())[:200]}")
        except psutil.Error:
            pass
    assert not left, "left running:\n" + "\n".join(described) + "\n" + log
