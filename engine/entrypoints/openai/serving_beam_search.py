"""``use_beam_search`` on /v1/completions and /v1/chat/completions (vLLM's extra field, ``n`` is
the width): the beam search loop of engine/entrypoints/beam_search.py driven over the async engine,
its beams handed back as the request's ``n`` choices, best first."""
from __future__ import annotations

from typing import Any

from engine.core.input_processor import InvalidInputError
from engine.entrypoints.beam_search import BeamSearchParams, advance_all, make_instances, step_inputs
from engine.entrypoints.openai.protocol import Body, OpenAIError
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

# fields beam search cannot honour (it ranks beams by the model's own log-probabilities), each
# with the value that means "not used"
_UNSUPPORTED: dict[str, Any] = {
    "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "repetition_penalty": 1.0, "logit_bias": None, "allowed_token_ids": None, "min_tokens": 0,
    "stop": [], "stop_token_ids": [],
}


def beam_search_params(body: Body, params: SamplingParams, width: int, stream: bool) -> BeamSearchParams:
    """The request's BeamSearchParams (``params``: its sampling fields with n=1, ``width``: its n);
    a 400 naming the first field beam search cannot honour."""
    if stream:
        raise OpenAIError("'stream' is not supported with use_beam_search: the beams are only known at the end",
                          param="stream")
    if params.structured_outputs is not None:
        field = "structured_outputs" if body.has("structured_outputs") else "response_format"
        raise OpenAIError(f"'{field}' cannot be combined with use_beam_search", param=field)
    if body.has("tools") and body.raw("tool_choice") not in (None, "none"):
        raise OpenAIError("'tool_choice' cannot be combined with use_beam_search", param="tool_choice")
    if params.logprobs is not None or params.prompt_logprobs is not None:  # (chat's logprobs=true is 0)
        raise OpenAIError("'logprobs' cannot be combined with use_beam_search", param="logprobs")
    for name, unused in _UNSUPPORTED.items():
        value = getattr(params, name)
        if not (value == unused or (not value and not unused) or (name == "top_k" and value == -1)):
            raise OpenAIError(f"'{name}' cannot be combined with use_beam_search", param=name)
    if params.temperature not in (0.0, 1.0):
        raise OpenAIError("use_beam_search ranks beams by the model's log-probabilities: 'temperature' must be "
                          f"0 or 1 (unscaled), got {params.temperature}", param="temperature")
    early = body.raw("early_stopping", False)
    bp = BeamSearchParams(
        beam_width=width, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos, temperature=0.0,
        length_penalty=body.float("length_penalty", 1.0), include_stop_str_in_output=params.include_stop_str_in_output,
        early_stopping=early,
    )
    try:
        bp.validate(width_param="n")
    except InvalidInputError as e:
        raise OpenAIError(str(e), param=e.param) from None
    return bp


async def run_beam_search(serving: Any, prompt_ids: list[list[int]], bp: BeamSearchParams,
                          request_id: str) -> list[RequestOutput]:
    """One RequestOutput per prompt whose ``outputs`` are its beams (index 0 the best)."""
    try:
        instances = make_instances(prompt_ids, bp, serving.input_processor.eos_token_ids, serving.max_model_len)
    except InvalidInputError as e:
        raise OpenAIError(str(e), param="n" if e.param == "beam_width" else e.param) from None
    step = 0
    kept: list[str] = []  # the previous step's requests: their continuations fork their blocks
    try:
        while True:
            live = [inst for inst in instances if not inst.done and inst.max_new_tokens > 0]
            if not live:
                break
            asks = step_inputs(serving.input_processor, live)
            streams = await serving.add_all(f"{request_id}-beam{step}", [a[1] for a in asks], stream=False)
            serving.engine.release_kv(kept)  # (applied after the adds: the forks are queued first)
            kept = [s.request_id for s in streams]
            try:
                outs = await serving.final_outputs(streams)
            finally:
                serving.abort_unfinished(streams)
            for out in outs:
                if out.outputs[0].finish_reason in ("abort", "error") or not out.outputs[0].logprobs:
                    raise OpenAIError(f"a beam search step ended with {out.outputs[0].finish_reason!r}", status=500,
                                      type="server_error")
            advance_all(live, asks, outs)
            step += 1
    finally:
        if kept:
            serving.engine.release_kv(kept)
    results = []
    for i, inst in enumerate(instances):
        beams = inst.output(serving.tokenizer).sequences
        outputs = [CompletionOutput(index=j, text=s.text or "", token_ids=s.tokens[len(inst.prompt_token_ids):],
                                    cumulative_logprob=s.cum_logprob, finish_reason=s.finish_reason)
                   for j, s in enumerate(beams)]
        results.append(RequestOutput(f"{request_id}-{i}", None, inst.prompt_token_ids, outputs, finished=True))
    return results
