"""The Ray Serve deployment (engine/serve/deployment.py) on a local loopback Ray: ``serve.run`` of
the config file's application (Serve's HTTP proxy on 127.0.0.1 and a free port), answered through
the official openai client: chat, completions, streaming; bad arguments fail before any replica."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.server.conftest import free_port

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "serve_config.yaml"


@pytest.fixture(scope="module")
def serve_app(tiny_model_path):
    import ray
    from ray import serve

    from engine.serve.deployment import build_app

    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    app_cfg = yaml.safe_load(CONFIG.read_text())["applications"][0]
    args = {**app_cfg["args"], "model": str(tiny_model_path), "served-model-name": "tiny",
            "num-gpu-blocks-override": 64, "max-model-len": 512}
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=app_cfg["name"], route_prefix=app_cfg["route_prefix"])
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_config_file_names_the_builder_and_autoscaling():
    cfg = yaml.safe_load(CONFIG.read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "engine.serve.deployment:build_app" and cfg["http_options"]["host"] == "127.0.0.1"
    dep = app["deployments"][0]
    assert dep["name"] == "OpenAIServer" and dep["autoscaling_config"]["target_ongoing_requests"] > 0
    from engine.serve.deployment import server_namespace

    ns = server_namespace(app["args"])
    assert ns.max_model_len == 2048 and ns.served_model_name == ["smollm2"] and ns.port == 0
    with pytest.raises(ValueError, match="unknown argument"):
        server_namespace({"no-such-flag": 1})
    with pytest.raises(ValueError, match="max-model-len"):
        server_namespace({"max-model-len": "many"})


def test_serve_answers_chat_and_completions(serve_app):
    from openai import OpenAI

    c = OpenAI(base_url=serve_app + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                     temperature=0)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5
    comp = c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0)
    streamed = list(c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6,
                                         temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == comp.choices[0].text
    assert [ch.choices[0].finish_reason for ch in streamed if ch.choices][-1] == "length"
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    # errors keep OpenAI's shape through the proxy
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"


def test_serve_listens_on_loopback_only(serve_app):
    import psutil

    wild, procs = [], psutil.Process().children(recursive=True)  # the local Ray this module started
    assert procs
    for p in procs:
        try:
            wild += [(p.pid, c.laddr) for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
        except psutil.Error:
            continue
    assert wild == [], f"listening beyond loopback: {wild}"
