"""Typed stats: EngineStats after real generates, its old dict view, and the one EngineStats ->
Prometheus table of /metrics (same names, types and HELP lines as before stats were typed)."""
from __future__ import annotations

import dataclasses
import re

import pytest

from engine import LLM, SamplingParams
from engine.core.request_metrics import EngineMetrics
from engine.core.stats import EngineStats, KVCacheStats, SchedulerStats, SpecDecodingStats
from engine.entrypoints.openai.metrics import ENGINE_METRICS, UNEXPORTED_FIELDS, render_metrics
from tests.server.golden_metrics import METRIC_FAMILIES

NUM_BLOCKS = 64

# every key LLMEngine.get_stats() returned while it returned a dict
OLD_KEYS = [
    "num_running", "num_waiting", "num_swapped",
    "kv_blocks_total", "kv_blocks_free", "kv_blocks_used", "kv_blocks_cached", "kv_cache_usage",
    "kv_host_blocks_total", "kv_host_blocks_free", "prefix_cache_queries", "prefix_cache_hits",
    "prefix_cache_hit_rate", "prefix_cache_evictions", "shared_prompt_tokens", "cow_copies",
    "swapped_out_blocks", "swapped_in_blocks", "swap_in_cache_hits",
    *(f"scheduler_{f.name}" for f in dataclasses.fields(SchedulerStats)),
    "prompt_tokens_total", "generation_tokens_total",
    "spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_acceptance_rate",
    "spec_mean_accepted_length",
]


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=NUM_BLOCKS, max_model_len=256)
    yield llm
    llm.shutdown()


class _Client:
    """What render_metrics reads of an EngineClient."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats, self.metrics, self.errored = stats, EngineMetrics(), False

    def get_stats(self) -> EngineStats:
        return self.stats

    def num_queued_requests(self) -> int:
        return 0


def test_engine_stats_after_a_real_generate(llm):
    before = llm.get_stats()
    assert isinstance(before, EngineStats)
    prompts = [[5, 6, 7, 8, 9], list(range(100, 140))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    st = llm.get_stats()
    assert isinstance(st.scheduler, SchedulerStats) and isinstance(st.kv_cache, KVCacheStats)
    assert isinstance(st.spec_decoding, SpecDecodingStats)
    assert st.num_running == st.num_waiting == st.num_swapped == 0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == 12
    assert st.generation_tokens_total - before.generation_tokens_total == generated
    assert st.prompt_tokens_total == st.scheduler.num_prefill_tokens
    assert st.kv_cache.prefix_cache_queries - before.kv_cache.prefix_cache_queries == sum(map(len, prompts))
    assert st.kv_cache.kv_blocks_total == NUM_BLOCKS
    assert st.kv_cache.kv_blocks_used == 0 and st.kv_cache.kv_blocks_free == NUM_BLOCKS
    assert st.kv_cache.kv_cache_usage == 0.0
    assert st.scheduler.num_steps > before.scheduler.num_steps
    assert st.scheduler.num_decode_tokens > 0
    assert st.spec_decoding.num_drafts == 0 and st.spec_decoding.acceptance_rate == 0.0  # no speculation


def test_stats_are_snapshots(llm):
    old = llm.get_stats()
    frozen = dataclasses.asdict(old)
    llm.generate({"prompt_token_ids": [11, 12, 13]}, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert dataclasses.asdict(old) == frozen  # later steps never change a snapshot
    assert llm.get_stats().generation_tokens_total == old.generation_tokens_total + 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        old.num_running = 5  # type: ignore[misc]


def test_old_dict_keys_still_read(llm):
    st = llm.get_stats()
    assert list(st.as_dict()) == OLD_KEYS
    assert st["kv_blocks_used"] == st.kv_cache.kv_blocks_used
    assert st["scheduler_num_steps"] == st.scheduler.num_steps
    assert st["generation_tokens_total"] == st.generation_tokens_total
    assert st["spec_num_drafts"] == st.spec_decoding.num_drafts
    assert llm.llm_engine.kv_cache.get_stats()["prefix_cache_queries"] == st.kv_cache.prefix_cache_queries
    assert "spec_mean_accepted_length" in st and "no_such_stat" not in st
    assert "kv_blocks_free" in st.kv_cache
    with pytest.raises(KeyError):
        st["no_such_stat"]


def _numeric_fields(obj: object, prefix: str = "") -> set[str]:
    """Dotted paths of every number (fields and properties) in a stats dataclass tree."""
    out = set()
    names = [f.name for f in dataclasses.fields(obj)]
    names += [n for n, v in vars(type(obj)).items() if isinstance(v, property)]
    for name in names:
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            out |= _numeric_fields(value, f"{prefix}{name}.")
        elif isinstance(value, (int, float)) or isinstance(value, list):
            out.add(prefix + name)
    return out


def test_every_stat_has_a_metric_or_is_listed_unexported():
    exported = {m.field for m in ENGINE_METRICS}
    assert len(exported) == len(ENGINE_METRICS)
    assert exported.isdisjoint(UNEXPORTED_FIELDS)
    assert _numeric_fields(EngineStats()) == exported | UNEXPORTED_FIELDS


def _families(text: str) -> list[tuple[str, str, str]]:
    helps = re.findall(r"^# HELP (\S+) (.+)$", text, re.M)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    return [(name, types[name], help) for name, help in helps]


def test_metrics_text_keeps_the_old_families_and_values():
    sched = SchedulerStats(num_steps=7, num_preemptions=2, last_num_running=3)
    kv = KVCacheStats(kv_blocks_total=64, kv_blocks_free=60, kv_blocks_used=4, kv_cache_usage=0.0625,
                      prefix_cache_queries=10, prefix_cache_hits=4)
    spec = SpecDecodingStats(num_drafts=2, num_draft_tokens=6, num_accepted_tokens=3)
    stats = EngineStats(num_running=3, num_waiting=1, prompt_tokens_total=40, generation_tokens_total=9,
                        scheduler=sched, kv_cache=kv, spec_decoding=spec)
    text = render_metrics(_Client(stats), "m", rejections={})
    assert _families(text) == [tuple(f) for f in METRIC_FAMILIES]
    for line in (
        'vllm:num_requests_running{model_name="m"} 3',
        'vllm:kv_cache_blocks_used{model_name="m"} 4',
        'vllm:kv_cache_usage_perc{model_name="m"} 0.0625',
        'vllm:prefix_cache_hits_total{model_name="m"} 4',
        'vllm:engine_prefix_cache_hit_rate{model_name="m"} 0.4',
        'vllm:engine_scheduler_num_steps{model_name="m"} 7',
        'vllm:num_preemptions_total{model_name="m"} 2',
        'vllm:prompt_tokens_total{model_name="m"} 40',
        'vllm:generation_tokens_total{model_name="m"} 9',
        'vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 3',
        'vllm:engine_spec_acceptance_rate{model_name="m"} 0.5',
        'vllm:engine_spec_mean_accepted_length{model_name="m"} 2.5',
    ):
        assert line in text.splitlines(), line
    assert "kv_blocks_free" not in text


def test_metrics_of_a_real_engine_have_the_old_families(llm):
    llm.generate("hello there", SamplingParams(max_tokens=2), use_tqdm=False)
    text = render_metrics(_Client(llm.get_stats()), "m", rejections={})
    assert _families(text) == [tuple(f) for f in METRIC_FAMILIES]
