"""The server's structured-output request fields: OpenAI's ``response_format`` and vLLM's
``structured_outputs`` extra (plus vLLM's older ``guided_*`` names), read into
StructuredOutputsParams; and the wait for the grammar's compile before a response starts, so a
constraint that cannot compile is a 400 naming the field, never an error mid-stream."""
from __future__ import annotations

import asyncio
from typing import Any

from engine.entrypoints.openai.protocol import Body, OpenAIError
from engine.structured_output.params import InvalidGrammarError, StructuredOutputsParams

FORMAT_TYPES = ("text", "json_object", "json_schema", "structural_tag")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _from_response_format(body: Body) -> tuple[dict | None, str]:
    fmt = body.obj("response_format")
    if fmt is None:
        return None, ""
    kind = fmt.raw("type", "text")
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return {"json_object": True}, "response_format"
    if kind == "json_schema":
        js = fmt.obj("json_schema")
        if js is None:
            raise OpenAIError("'response_format.json_schema' is a required property", param="response_format.json_schema")
        js.str("name")
        js.str("description")
        js.bool("strict")
        schema = js.raw("schema")
        if schema is None:
            raise OpenAIError("'response_format.json_schema.schema' is a required property",
                              param="response_format.json_schema.schema")
        if not isinstance(schema, dict):
            raise OpenAIError("'response_format.json_schema.schema' must be a JSON schema object",
                              param="response_format.json_schema.schema")
        return {"json": schema}, "response_format.json_schema.schema"
    if kind == "structural_tag":
        return {"structural_tag": dict(fmt.data)}, "response_format"
    raise OpenAIError(f"'response_format.type' must be one of {list(FORMAT_TYPES)}, got {kind!r}",
                      param="response_format.type")


def structured_outputs_from_body(body: Body) -> StructuredOutputsParams | None:
    """The request's constraint, or None; a malformed one is an OpenAIError naming the field."""
    fields, param = _from_response_format(body)
    extra = body.raw("structured_outputs")
    guided = {v: body.raw(k) for k, v in _GUIDED.items() if body.has(k)}
    if body.bool("guided_json_object", False):
        guided["json_object"] = True
    sources = [name for name, present in (("response_format", fields), ("structured_outputs", extra),
                                          ("guided_*", guided)) if present]
    if len(sources) > 1:
        raise OpenAIError(f"give one of {' and '.join(repr(s) for s in sources)}, not both", param=sources[1])
    if extra is not None:
        fields, param = extra, "structured_outputs"
    elif guided:
        fields, param = guided, "structured_outputs"
        for k in ("guided_whitespace_pattern",):
            if body.has(k):
                fields["whitespace_pattern"] = body.raw(k)
    if fields is None:
        return None
    try:
        if param == "structured_outputs":
            params = StructuredOutputsParams.from_dict(fields, "structured_outputs")
        else:
            params = StructuredOutputsParams(**fields)
    except InvalidGrammarError as e:
        raise OpenAIError(str(e), param=param if param != "structured_outputs" else e.param) from None
    except TypeError as e:
        raise OpenAIError(f"'{param}' is malformed: {e}", param=param) from None
    if param != "structured_outputs":
        params._param = param
    return params


async def wait_for_grammars(input_processor: Any, inputs: list) -> None:
    """Waits (off the event loop's thread) for the compile of every constrained input; a failed or
    timed-out compile is an OpenAIError (400) naming the field."""
    manager = getattr(input_processor, "structured_output", None)
    seen: set[int] = set()
    for processed in inputs:
        params = processed.params.structured_outputs
        if params is None or manager is None:
            continue
        fut = manager.submit(params, count=False)
        if id(fut) in seen:
            continue
        seen.add(id(fut))
        limit = manager.config.compile_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), timeout=limit)
        except asyncio.TimeoutError:
            raise OpenAIError(f"the {params.kind} constraint took longer than {limit:g} s to compile; simplify it",
                              param=params.param) from None
        except InvalidGrammarError as e:
            raise OpenAIError(str(e), param=params.param) from None
