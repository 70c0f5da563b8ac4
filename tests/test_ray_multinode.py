"""A real multi-node Ray cluster on this one machine: Ray's own test cluster
(``ray.cluster_utils.Cluster``), four nodes of one CPU each, every node its own raylet and object
store on 127.0.0.1. Engines attach through RAY_ADDRESS with ``distributed_executor_backend="ray"``
and PAGED_ENGINE_RAY_PLACEMENT_STRATEGY=STRICT_SPREAD, which puts every rank on a different node,
so hidden states cross object stores, the ranks meet through the TCP store (not the single-node
file store) and each node loads its own part of the model. docs/ray.md's walkthrough runs these
same steps by hand."""
from __future__ import annotations

import time

import pytest

from engine import LLM, SamplingParams
from engine.errors import EngineStartupError, UnsupportedModelError

pytestmark = pytest.mark.slow

NODES = 4
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):\n    ", "List three prime numbers"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
ARGS = dict(distributed_executor_backend="ray", num_gpu_blocks_override=64)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    node = dict(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=80 << 20)
    c = Cluster(initialize_head=True, head_node_args={**node, "resources": {"node_0": 1}})
    for i in range(1, NODES):
        c.add_node(**node, resources={f"node_{i}": 1})
    c.wait_for_nodes()
    try:
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


@pytest.fixture
def attached(cluster, monkeypatch):
    """What a user on a cluster node sets: RAY_ADDRESS, and one node per rank."""
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    monkeypatch.setenv("PAGED_ENGINE_RAY_PLACEMENT_STRATEGY", "STRICT_SPREAD")
    yield cluster


def reference(path, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    llm = LLM(str(path), num_gpu_blocks_override=64)
    try:
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()


def listeners_of_cluster() -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of this test's Ray processes."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        out += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_impossible_layouts_fail_at_start_naming_the_fix(attached, tiny_model_path):
    t0 = time.monotonic()
    with pytest.raises(UnsupportedModelError, match=r"pipeline_parallel_size=3 does not divide the model's 2 layers.*\[1, 2\]"):
        LLM(str(tiny_model_path), pipeline_parallel_size=3, **ARGS)
    with pytest.raises(EngineStartupError, match=r"tensor_parallel_size=4 x pipeline_parallel_size=2 = 8 workers "
                       r"needs 8 CPU in the Ray cluster \(one per rank\), but the cluster has 4; add nodes"):
        LLM(str(tiny_model_path), tensor_parallel_size=4, pipeline_parallel_size=2, **ARGS)
    assert time.monotonic() - t0 < 30


def test_tp2_x_pp2_on_four_nodes_equals_one_worker(attached, tiny_model_path):
    want = reference(tiny_model_path)
    llm = LLM(str(tiny_model_path), tensor_parallel_size=2, pipeline_parallel_size=2, **ARGS)
    try:
        ex = llm.llm_engine.executor
        assert len({w.node_id for w in ex.workers}) == 4, "every rank on its own node"
        assert ex._init_method().startswith("tcp://127.0.0.1:"), "ranks on several nodes meet over TCP, on loopback"
        got = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert got == want
        timing = ex.stage_timing()  # (stage, busy s, steps) per rank: both stages computed every step
        assert [s for s, _, _ in timing] == [0, 0, 1, 1] and len({n for _, _, n in timing}) == 1
        # every socket this cluster and its workers (gloo, the TCP store) listen on is loopback
        socks = listeners_of_cluster()
        assert socks, "the cluster's processes were found"
        wild = [s for s in socks if s[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
        assert wild == [], f"listening beyond loopback: {wild}"
    finally:
        llm.shutdown()
