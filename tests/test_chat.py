"""LLM.chat, its template handling and errors, and `python -m engine generate --chat`."""
from __future__ import annotations

import pytest

from engine.entrypoints.chat_utils import render_chat, render_chat_prompt
from engine.sampling_params import SamplingParams

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
]


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    from engine.entrypoints.llm import LLM

    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=128, seed=0)
    yield llm
    llm.shutdown()


def test_chat_uses_the_models_template(llm):
    tok = llm.get_tokenizer()
    expected_text = tok.apply_chat_template(CONV, add_generation_prompt=True, tokenize=False)
    assert expected_text.endswith("<|im_start|>assistant\n")
    params = SamplingParams(temperature=0, max_tokens=5)
    out = llm.chat(CONV, params, use_tqdm=False)
    assert len(out) == 1
    assert out[0].prompt == expected_text
    assert out[0].prompt_token_ids == tok.encode(expected_text, add_special_tokens=False)
    ref = llm.generate({"prompt_token_ids": out[0].prompt_token_ids}, params, use_tqdm=False)[0]
    assert out[0].outputs[0].token_ids == ref.outputs[0].token_ids
    # without the generation prompt the rendering stops after the last message
    ids = render_chat(tok, CONV, add_generation_prompt=False)
    assert tok.decode(ids) == tok.apply_chat_template(CONV, add_generation_prompt=False, tokenize=False)


def test_chat_batch_of_conversations_and_text_parts(llm):
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        [{"role": "user", "content": "Something else entirely"}],
    ]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(outs) == 3
    assert outs[0].prompt_token_ids == outs[1].prompt_token_ids, "text parts render like a plain string"
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[2].prompt_token_ids != outs[0].prompt_token_ids


def test_custom_template_and_continue_final_message(llm, tmp_path):
    tok = llm.get_tokenizer()
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    text, ids = render_chat_prompt(tok, CONV, template)
    assert text == "[system] Be brief.\n[user] What is 2 + 2?\n[assistant] "
    path = tmp_path / "t.jinja"
    path.write_text(template)
    out = llm.chat(CONV, SamplingParams(temperature=0, max_tokens=2), chat_template=str(path), use_tqdm=False)[0]
    assert out.prompt == text and out.prompt_token_ids == ids
    partial = CONV + [{"role": "assistant", "content": "The answer is"}]
    text, _ = render_chat_prompt(tok, partial, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("The answer is")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "messages"),
        ([{"content": "no role"}], "role"),
        ([{"role": "wizard", "content": "x"}], "role"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text parts"),
        ([{"role": "user", "content": 5}], "content"),
    ],
)
def test_bad_messages_raise_value_error(llm, messages, match):
    with pytest.raises(ValueError, match=match):
        llm.chat(messages, use_tqdm=False)


def test_bad_template_options_raise_and_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(CONV, continue_final_message=True, use_tqdm=False)
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat(CONV, chat_template="/no/such/template.jinja", use_tqdm=False)
    with pytest.raises(ValueError, match="template"):
        llm.chat(CONV, chat_template="{{ raise_exception('no system messages') }}", use_tqdm=False)
    assert llm.chat(CONV, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_cli_generate_chat(tiny_model_path, capsys):
    from engine.entrypoints.cli import main

    rc = main(["generate", "--chat", "--model", str(tiny_model_path), "--num-gpu-blocks-override", "32",
               "--max-tokens", "4", "--n", "2", "--temperature", "0.8", "--sample-seed", "3", "Hello there"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "--- prompt: 'Hello there'" in out and "[sample 0]" in out and "[sample 1]" in out
    rc = main(["generate", "--chat", "--model", str(tiny_model_path), "--num-gpu-blocks-override", "32",
               "--min-p", "2.0", "Hello"])
    assert rc == 2 and "min_p" in capsys.readouterr().err
