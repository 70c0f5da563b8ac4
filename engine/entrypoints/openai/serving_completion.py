"""POST /v1/completions."""
from __future__ import annotations

import logging
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from engine.core.input_processor import PromptType
from engine.errors import EngineDeadError
from engine.outputs import Logprob, RequestOutput
from engine.entrypoints.openai.protocol import Body, OpenAIError, now_int, random_id
from engine.entrypoints.openai.serving_beam_search import beam_search_params, run_beam_search
from engine.entrypoints.openai.serving_engine import (
    SSE_DONE, OpenAIServing, write_quietly, clamp_logprob, engine_dead_error, error_response, json_response, sse,
)

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    """Progress of one choice while streaming."""

    text_offset: int = 0
    started: bool = False
    finished: bool = False
    num_tokens: int = 0


@dataclass
class _Prompt:
    text: str | None
    ids: list[int]


@dataclass
class _Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    choices: dict[int, _Choice] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class OpenAIServingCompletion(OpenAIServing):
    async def parse_prompts(self, body: Body) -> list[_Prompt]:
        raw = body.required("prompt")
        err = OpenAIError(
            "'prompt' must be a string, an array of strings, an array of token ids or an array of arrays of token ids",
            param="prompt",
        )
        if isinstance(raw, str):
            items: list[Any] = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
            items = [raw]
        elif isinstance(raw, list) and raw:
            items = raw
        else:
            raise err
        prompts = []
        for item in items:
            if isinstance(item, str):
                ids = await self.in_tokenizer_thread(self.tokenizer.encode, item, size=len(item))
                prompts.append(_Prompt(item, ids))
            elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                prompts.append(_Prompt(None, list(item)))  # the InputProcessor checks the ids
            else:
                raise err
        return prompts

    async def create_completion(self, request: web.Request, data: Any) -> web.StreamResponse:
        body = Body(data)
        model = self.check_model(body)
        body.required("prompt")
        if body.has("suffix"):
            raise OpenAIError("'suffix' is not supported", param="suffix")
        stream = body.bool("stream", False)
        include_usage, continuous_usage = body.stream_options(stream)
        echo = body.bool("echo", False)
        num_logprobs = body.int("logprobs", None, lo=0, hi=self.config.max_logprobs)
        max_tokens = body.int("max_tokens", 16, lo=1)
        kw = self.sampling_kwargs(body)
        priority = body.int("priority", 0)
        prompts = await self.parse_prompts(body)  # last: tokenizing is the costly check
        for p in prompts:
            self.check_length(len(p.ids), max_tokens, "prompt")
        if body.bool("use_beam_search", False):  # vLLM's extra field: n is the beam width
            bp = beam_search_params(body, self.make_params(max_tokens=max_tokens, logprobs=num_logprobs,
                                                           **{**kw, "n": 1}), kw["n"], stream)
            rid = random_id("cmpl")
            outs = await run_beam_search(self, [p.ids for p in prompts], bp, rid)
            return json_response(self._full_response(outs, _Ctx(rid, now_int(), model, bp.beam_width, echo, None,
                                                                prompts)))
        params = self.make_params(
            max_tokens=max_tokens,
            logprobs=num_logprobs,
            prompt_logprobs=num_logprobs if echo and num_logprobs is not None else None,
            **kw,
        )
        request_id = random_id("cmpl")
        engine_prompts: list[PromptType] = [
            {"prompt": p.text, "prompt_token_ids": p.ids} if p.text is not None else {"prompt_token_ids": p.ids}
            for p in prompts
        ]
        inputs = await self.process_inputs(engine_prompts, params, "prompt")
        streams = await self.add_all(request_id, inputs, stream, priority, lora_request=self.lora_request_for(model))
        ctx = _Ctx(request_id, now_int(), model, params.n, echo, num_logprobs, prompts)
        try:
            if stream:
                return await self._stream(request, streams, ctx, include_usage, continuous_usage)
            try:
                outs = await self.final_outputs(streams)
            except EngineDeadError as e:
                return error_response(engine_dead_error(e, status=500))
            return json_response(self._full_response(outs, ctx))
        finally:
            self.abort_unfinished(streams)

    # ---- formatting ------------------------------------------------------------------------
    def _decode(self, tid: int) -> str:
        return self.tokenizer.decode([tid])

    def _logprobs(
        self, token_ids: list[int], entries: list[dict[int, Logprob] | None], offset: int
    ) -> tuple[dict, int]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, entry in zip(token_ids, entries):
            chosen = entry.get(tid) if entry else None
            s = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None else self._decode(tid)
            tokens.append(s)
            token_lps.append(clamp_logprob(chosen.logprob) if chosen is not None else None)
            tops.append(
                {(v.decoded_token if v.decoded_token is not None else self._decode(k)): clamp_logprob(v.logprob)
                 for k, v in entry.items()}
                if entry else None
            )
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset

    def _prompt_logprobs(self, out: RequestOutput) -> tuple[dict, int]:
        entries = list(out.prompt_logprobs or [])
        entries += [None] * (len(out.prompt_token_ids) - len(entries))
        return self._logprobs(out.prompt_token_ids, entries, 0)

    def _choice_logprobs(
        self, out: RequestOutput, o: Any, ctx: "_Ctx", first: bool, offset: int
    ) -> tuple[dict | None, int]:
        if ctx.num_logprobs is None:
            return None, offset
        merged: dict | None = None
        if first and ctx.echo:
            merged, offset = self._prompt_logprobs(out)
        gen, offset = self._logprobs(o.token_ids, o.logprobs or [None] * len(o.token_ids), offset)
        if merged is None:
            return gen, offset
        for k in merged:
            merged[k] += gen[k]
        return merged, offset

    def _prompt_text(self, ctx: "_Ctx", i: int) -> str:
        p = ctx.prompts[i]
        return p.text if p.text is not None else self.tokenizer.decode(p.ids)

    def _full_response(self, outs: list[RequestOutput], ctx: "_Ctx") -> dict:
        choices, completion_tokens = [], 0
        for i, out in enumerate(outs):
            for o in out.outputs:
                text = (self._prompt_text(ctx, i) + o.text) if ctx.echo else o.text
                logprobs, _ = self._choice_logprobs(out, o, ctx, True, 0)
                completion_tokens += len(o.token_ids)
                choices.append({"index": i * ctx.n + o.index, "text": text, "logprobs": logprobs,
                                "finish_reason": o.finish_reason})
        choices.sort(key=lambda c: c["index"])
        prompt_tokens = sum(len(p.ids) for p in ctx.prompts)
        return {
            "id": ctx.request_id,
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    async def _stream(self, request: web.Request, streams: list, ctx: "_Ctx", include_usage: bool,
                      continuous_usage: bool) -> web.StreamResponse:
        resp = await self.start_sse(request)
        usage = _Usage(prompt_tokens=sum(len(p.ids) for p in ctx.prompts))

        def chunk(choices: list[dict], usage_value: Any = None) -> dict:
            c = {"id": ctx.request_id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
                 "choices": choices}
            if include_usage:
                c["usage"] = usage_value
            return c

        try:
            async with aclosing(self.merged(streams)) as outputs:
                async for i, out in outputs:
                    for o in out.outputs:
                        index = i * ctx.n + o.index
                        st = usage.choices.setdefault(index, _Choice())
                        if st.finished:
                            continue
                        st.num_tokens += len(o.token_ids)
                        usage.completion_tokens += len(o.token_ids)
                        finish = o.finish_reason
                        if not (o.text or o.token_ids or finish or (ctx.echo and not st.started)):
                            continue
                        text = o.text
                        if ctx.echo and not st.started:
                            text = self._prompt_text(ctx, i) + text
                        logprobs, st.text_offset = self._choice_logprobs(out, o, ctx, not st.started, st.text_offset)
                        st.started = True
                        st.finished = finish is not None
                        u = usage.as_dict() if continuous_usage else None
                        await resp.write(sse(chunk([{"index": index, "text": text, "logprobs": logprobs,
                                                     "finish_reason": finish}], u)))
            if include_usage:
                await resp.write(sse(chunk([], usage.as_dict())))
            await resp.write(SSE_DONE)
        except EngineDeadError as e:
            await write_quietly(resp, sse(engine_dead_error(e, status=500).to_dict()) + SSE_DONE)
        except ConnectionResetError:  # the client went away: the caller aborts what is left
            pass
        except Exception as e:  # noqa: BLE001 - headers are out: report in-band, as vLLM does
            logger.exception("streaming %s failed", ctx.request_id)
            err = OpenAIError(f"internal error: {e!r}", status=500, type="server_error")
            await write_quietly(resp, sse(err.to_dict()) + SSE_DONE)
        return resp


@dataclass
class _Ctx:
    request_id: str
    created: int
    model: str
    n: int
    echo: bool
    num_logprobs: int | None
    prompts: list[_Prompt]
