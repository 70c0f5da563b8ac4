"""Structured outputs: constrain generation to a JSON schema, regex, choice list, grammar or
structural tag, token by token (docs/structured_outputs.md). Light to import: xgrammar is loaded
only when the manager is built."""
from engine.structured_output.config import StructuredOutputsConfig
from engine.structured_output.params import InvalidGrammarError, StructuredOutputsParams

__all__ = ["InvalidGrammarError", "StructuredOutputsConfig", "StructuredOutputsParams"]
