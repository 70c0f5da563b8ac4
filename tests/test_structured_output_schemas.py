"""The JSON schemas the structured-output tests generate against (imported by them), and a check
that each is itself a valid schema. Strings, arrays and numbers are bounded so a small model's
greedy output ends well inside max_tokens."""
from __future__ import annotations

import jsonschema
import pytest

NAME = {"type": "string", "minLength": 1, "maxLength": 16}

SCHEMAS: dict[str, dict] = {
    "flat_object": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                    "required": ["name", "age"]},
    "boolean_field": {"type": "object", "properties": {"done": {"type": "boolean"}}, "required": ["done"]},
    "enum_string": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "enum_mixed": {"type": "object", "properties": {"v": {"enum": [1, "two", None, True]}}, "required": ["v"]},
    "const": {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -9, "maximum": 9}},
              "required": ["kind", "x"]},
    "nested_object": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "name": NAME},
                 "required": ["id", "name"]}}, "required": ["user"]},
    "deeply_nested": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object",
        "properties": {"c": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["c"]}}, "required": ["b"]}},
        "required": ["a"]},
    "array_min_max": {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 3}},
                      "required": ["tags"]},
    "array_of_ints": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 5},
    "array_of_objects": {"type": "array", "maxItems": 2, "minItems": 1, "items": {"type": "object",
        "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"]}},
    "string_pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    "format_date": {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]},
    "format_email": {"type": "object", "properties": {"email": {"type": "string", "format": "email"}},
                     "required": ["email"]},
    "format_ipv4": {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"}}, "required": ["ip"]},
    "format_uuid": {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
    "number_bounds": {"type": "object", "properties": {"t": {"type": "number", "minimum": -10, "maximum": 10}},
                      "required": ["t"]},
    "integer_bounds": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20}},
                       "required": ["n"]},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                                     NAME]}}, "required": ["value"]},
    "ref_defs": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                                     "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                                  "required": ["x", "y"]}},
                 "type": "object", "properties": {"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}},
                 "required": ["start", "end"]},
    "optional_fields": {"type": "object", "properties": {"title": NAME, "note": NAME}, "required": ["title"]},
    "nullable": {"type": "object", "properties": {"middle": {"type": ["string", "null"], "maxLength": 10}},
                 "required": ["middle"]},
    "many_fields": {"type": "object", "properties": {f"f{i}": {"type": "integer", "minimum": 0, "maximum": 9} for i in range(8)},
                    "required": [f"f{i}" for i in range(8)]},
}


def validate(schema: dict, text: str) -> object:
    """Parses ``text`` and validates it (formats checked too); returns the value."""
    import json

    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    return value


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_valid(name):
    jsonschema.Draft202012Validator.check_schema(SCHEMAS[name])
