"""Typed exceptions users can catch; each message says how to fix the problem."""


class EngineError(Exception):
    """Base class of the engine's errors."""


class ModelNotFoundError(EngineError, FileNotFoundError):
    """The model path, or a file it needs, does not exist."""


class UnsupportedModelError(EngineError, ValueError):
    """The checkpoint's architecture or a setting of it is not supported."""


class PromptTooLongError(EngineError, ValueError):
    """The prompt can never be scheduled: longer than max_model_len or the whole KV cache."""


class EngineDeadError(EngineError, RuntimeError):
    """The engine (or a worker of it) failed; requests in flight cannot finish."""


class EngineStartupError(EngineError, RuntimeError):
    """The engine could not start its workers (not enough resources, a taken port, a dead cluster)."""
