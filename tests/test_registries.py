"""The registries the engine config validates against (architectures, quantization schemes,
scheduling policies, preemption modes), the policy interface, and the import graph they keep acyclic.
Model-free: config.json files are written by hand."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from engine.config import EngineArgs, PreemptionMode, SchedulerConfig
from engine.entrypoints.cli import add_engine_args, engine_args_from
from engine.errors import UnsupportedModelError
from engine.layers.quantization import QUANTIZATION_SCHEMES, method_for, quantization_methods
from engine.layers.quantization.int8 import Int8LinearMethod, Int8WeightOnlyMethod
from engine.models.hf_config import load_hf_config
from engine.models.registry import get_model_class, supported_architectures
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.policy import POLICIES, FcfsPolicy, PriorityPolicy, make_policy, policy_names
from engine.scheduler.scheduler import AdmissionKind

REPO = Path(__file__).resolve().parents[1]


def _model_dir(tmp_path: Path, architecture: str | None = "LlamaForCausalLM") -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["architectures"] = [architecture] if architecture else []
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


# ---- architectures ------------------------------------------------------------------------------
def test_architecture_registry_is_the_one_source():
    import engine.config

    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(supported_architectures())
    assert not hasattr(engine.config, "SUPPORTED_ARCHITECTURES")
    for arch in supported_architectures():  # every family builds on the Llama family's class
        assert get_model_class(arch).__name__ == arch and "LlamaForCausalLM" in [
            c.__name__ for c in get_model_class(arch).__mro__]


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", None])
def test_unknown_architecture_names_the_registered_ones(tmp_path, arch):
    path = _model_dir(tmp_path, arch)
    shown = arch or "(none listed in config.json)"
    msg = f"architecture {shown} is not supported; supported: {supported_architectures()}"
    with pytest.raises(UnsupportedModelError) as e:
        load_hf_config(path)
    assert str(e.value) == msg
    with pytest.raises(UnsupportedModelError) as e:
        EngineArgs(model=str(path), device="cpu").create_engine_config()
    assert str(e.value) == msg
    if arch:
        with pytest.raises(UnsupportedModelError) as e:
            get_model_class(arch)
        assert str(e.value) == msg


def test_load_hf_config_is_still_importable_from_engine_config():
    from engine import config

    assert config.load_hf_config is load_hf_config


# ---- quantization, policies, preemption modes -----------------------------------------------------
def test_unknown_choices_name_the_registered_ones():
    cases = [
        (dict(quantization="fp4"), "quantization must be None or", quantization_methods()),
        (dict(scheduling_policy="lifo"), "scheduling_policy must be", policy_names()),
        (dict(preemption_mode="offload"), "preemption_mode must be", [m.value for m in PreemptionMode]),
    ]
    for kwargs, start, names in cases:
        with pytest.raises(ValueError) as e:
            EngineArgs(**kwargs).validate()
        text = str(e.value)
        assert text.startswith(start) and text.endswith(f"got {next(iter(kwargs.values()))!r}"), text
        assert all(repr(n) in text for n in names), text
    assert quantization_methods() == list(QUANTIZATION_SCHEMES) == ["int8", "gguf"]
    assert policy_names() == list(POLICIES) == ["fcfs", "priority"]
    with pytest.raises(ValueError, match="unknown scheduling policy 'lifo'; use 'fcfs' or 'priority'"):
        make_policy("lifo")


@pytest.mark.parametrize("mode", ["recompute", "swap", PreemptionMode.SWAP])
def test_preemption_mode_accepts_strings(tmp_path, mode):
    args = EngineArgs(model=str(_model_dir(tmp_path)), device="cpu", preemption_mode=mode, swap_space=0.01)
    sched = args.create_engine_config().scheduler
    assert sched.preemption_mode is PreemptionMode(mode)
    assert sched.preemption_mode == str(mode) and str(sched.preemption_mode) == str(PreemptionMode(mode).value)
    assert sched.preempts_by_swap == (PreemptionMode(mode) is PreemptionMode.SWAP)


def test_cli_strings_reach_the_enum(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    ns = parser.parse_args(["--preemption-mode", "swap", "--swap-space", "0.01", "--scheduling-policy", "priority"])
    args = engine_args_from(ns)
    args.model, args.device = str(_model_dir(tmp_path)), "cpu"
    sched = args.create_engine_config().scheduler
    assert sched.preemption_mode is PreemptionMode.SWAP and sched.policy == "priority"


def test_a_scheduler_config_built_with_strings_still_compares():
    assert SchedulerConfig(preemption_mode="swap").preempts_by_swap
    assert not SchedulerConfig(preemption_mode="recompute").preempts_by_swap
    assert not SchedulerConfig().preempts_by_swap


def test_admission_kind_is_a_str_enum():
    assert [k.value for k in AdmissionKind] == ["new", "fork", "swap_in"]
    assert AdmissionKind("swap_in") is AdmissionKind.SWAP_IN and AdmissionKind.FORK == "fork"


def test_quantization_scheme_picks_methods_by_layer_kind():
    from torch import nn

    from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from engine.layers.linear import ReplicatedLinear

    linear, head, emb = ReplicatedLinear(8, 8, bias=False), ParallelLMHead(16, 8), VocabParallelEmbedding(16, 8)
    assert isinstance(method_for("int8", "model.layers.0.mlp.down_proj", linear), Int8LinearMethod)
    assert isinstance(method_for("int8", "lm_head", head), Int8WeightOnlyMethod)
    assert method_for("int8", "model.embed_tokens", emb) is None
    assert method_for("int8", "model.norm", nn.LayerNorm(8)) is None
    assert method_for(None, "lm_head", head) is None
    with pytest.raises(ValueError, match="quantization='fp4' is not supported; use one of \\['int8', 'gguf'\\] or None"):
        method_for("fp4", "lm_head", head)


# ---- the policy interface ------------------------------------------------------------------------
def _req(rid: str, arrival: float, priority: int = 0) -> Request:
    return Request(request_id=rid, prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(max_tokens=4),
                   arrival_time=arrival, priority=priority)


def test_step_order_fcfs_serves_running_first_priority_merges():
    running = [_req("r1", 1.0, priority=5), _req("r2", 2.0, priority=1)]
    waiting = [_req("w1", 0.5, priority=3), _req("w2", 3.0, priority=0)]
    fcfs, prio = FcfsPolicy(), PriorityPolicy()
    assert [r.request_id for r in fcfs.step_order(running, waiting)] == ["r1", "r2", "w1", "w2"]
    # priority keeps both lists in (priority, arrival) order; the step merges them
    running.sort(key=prio.sort_key)
    waiting.sort(key=prio.sort_key)
    assert [r.request_id for r in prio.step_order(running, waiting)] == ["w2", "r2", "w1", "r1"]


def test_waiting_insert_index_is_stable_in_policy_order():
    waiting = [_req("a", 1.0, priority=2), _req("b", 2.0, priority=2)]
    assert FcfsPolicy().waiting_insert_index(waiting, _req("c", 1.5, priority=0)) == 1
    assert PriorityPolicy().waiting_insert_index(waiting, _req("c", 1.5, priority=0)) == 0
    assert PriorityPolicy().waiting_insert_index(waiting, _req("d", 3.0, priority=2)) == 2


def test_only_a_strictly_higher_priority_arrival_may_displace():
    low, mid, high = _req("low", 0.0, priority=9), _req("mid", 0.0, priority=5), _req("high", 9.0, priority=0)
    fcfs, prio = FcfsPolicy(), PriorityPolicy()
    assert not any(fcfs.may_displace(a, b) for a in (low, mid, high) for b in (low, mid, high))
    assert prio.may_displace(high, low) and prio.may_displace(mid, low) and prio.may_displace(high, mid)
    assert not prio.may_displace(low, high) and not prio.may_displace(mid, mid)
    assert not prio.may_displace(_req("late", 5.0, priority=5), mid)  # equal priority: never


# ---- import graph --------------------------------------------------------------------------------
def _import_graph() -> dict[str, dict[str, str]]:
    """module -> {imported engine module: "module" | "function"} over engine/ (TYPE_CHECKING blocks
    excluded; a submodule import also counts its packages below the root ``engine``)."""
    mods = {}
    for p in (REPO / "engine").rglob("*.py"):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p

    def walk(nodes, level):
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(ast.iter_child_nodes(n), "function")
            elif isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                yield from walk(n.orelse, level)
            elif isinstance(n, ast.Import):
                yield from ((a.name, [], level) for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                yield n.module, [a.name for a in n.names], level
            else:
                yield from walk(ast.iter_child_nodes(n), level)

    graph: dict[str, dict[str, str]] = {}
    for name, path in mods.items():
        out = graph.setdefault(name, {})
        for mod, names, level in walk(ast.parse(path.read_text()).body, "module"):
            parts = mod.split(".")
            targets = {".".join(parts[:i]) for i in range(2, len(parts) + 1)} | {f"{mod}.{n}" for n in names}
            for t in targets & mods.keys():
                if t != name and not name.startswith(t + ".") and out.get(t) != "module":
                    out[t] = level
    return graph


def _reaches(graph: dict[str, dict[str, str]], src: str, dst: str, levels: set[str]) -> bool:
    seen, todo = set(), [src]
    while todo:
        m = todo.pop()
        for t, level in graph.get(m, {}).items():
            if level in levels and t not in seen:
                if t == dst:
                    return True
                seen.add(t)
                todo.append(t)
    return False


def test_no_import_cycles_among_module_level_imports():
    graph = _import_graph()
    cyclic = [m for m in graph if _reaches(graph, m, m, {"module"})]
    assert cyclic == []


@pytest.mark.parametrize("a, b", [
    ("engine.config", "engine.spec_decode.config"),
    ("engine.layers.linear", "engine.layers.quantization"),
    ("engine.layers.embedding", "engine.layers.quantization"),
    ("engine.config", "engine.scheduler.policy"),
])
def test_former_circles_stay_open_even_counting_lazy_imports(a, b):
    graph = _import_graph()
    both = {"module", "function"}
    assert not (_reaches(graph, a, b, both) and _reaches(graph, b, a, both))
