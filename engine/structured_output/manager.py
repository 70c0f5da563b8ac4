"""The engine process's grammar state: compiles (off the step, in a thread pool, cached), one
matcher per request, and each step's token bitmask.

Who calls what: the InputProcessor calls ``validate`` (parse check, compile started); the scheduler
calls ``add_request`` when it queues a constrained request, ``grammar_ready`` while the request
waits (status WAITING_FOR_FSM), ``fill_bitmask`` when it builds a SchedulerOutput, ``advance`` for
every token it appends and ``validate_drafts`` for the proposals it stores. Workers only apply
the bitmask (engine/structured_output/apply.py).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, wait
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from engine.structured_output.backend import StructuredOutputBackend, StructuredOutputGrammar
from engine.structured_output.config import StructuredOutputsConfig
from engine.structured_output.params import InvalidGrammarError, StructuredOutputsParams
from engine.structured_output.pool import CompilePool
from engine.structured_output.stats import StructuredOutputCounters, StructuredOutputStats

if TYPE_CHECKING:
    from engine.request import Request
    from engine.scheduler.output import SchedulerOutput

logger = logging.getLogger(__name__)

GrammarKey = tuple[str, str, str]  # (kind, spec, tokenizer)


@dataclass
class StructuredOutputRequest:
    """One request's grammar: the shared compile, then its own matcher."""

    params: StructuredOutputsParams
    future: Future
    submitted: float = field(default_factory=time.monotonic)
    grammar: StructuredOutputGrammar | None = None
    num_accepted: int = 0  # output tokens the matcher has consumed


class StructuredOutputManager:
    """``backend``: the backend, or a function that makes it (called on first use, so an engine that
    never sees a constrained request never imports xgrammar)."""

    def __init__(self, backend: StructuredOutputBackend | Callable[[], StructuredOutputBackend],
                 config: StructuredOutputsConfig | None = None) -> None:
        self._backend = backend if isinstance(backend, StructuredOutputBackend) else None
        self._make_backend = backend
        self.config = config or StructuredOutputsConfig()
        self._pool = CompilePool(self.config.max_compile_threads)
        self._cache: OrderedDict[GrammarKey, Future] = OrderedDict()
        self._lock = threading.RLock()
        self._timed_out: set[int] = set()  # ids of futures already written off
        self.counters = StructuredOutputCounters()
        self._pending: set[Request] = set()  # requests that may still wait for their grammar

    @property
    def backend(self) -> StructuredOutputBackend:
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = self._make_backend()
        return self._backend

    # ---- compiling -------------------------------------------------------------------------
    def resolve(self, params: StructuredOutputsParams) -> StructuredOutputsParams:
        """The params with the engine's JSON defaults applied (a copy when they change anything)."""
        cfg = self.config
        if params.kind in ("json", "json_object") and (
            (cfg.disable_any_whitespace and not params.disable_any_whitespace)
            or (cfg.disable_additional_properties and not params.disable_additional_properties)
        ):
            params = replace(params, disable_any_whitespace=params.disable_any_whitespace or cfg.disable_any_whitespace,
                             disable_additional_properties=params.disable_additional_properties
                             or cfg.disable_additional_properties)
        return params

    def key(self, params: StructuredOutputsParams) -> GrammarKey:
        return params.kind, params.spec, self.backend.tokenizer_key

    def validate(self, params: StructuredOutputsParams) -> StructuredOutputsParams:
        """Raises InvalidGrammarError for a constraint that does not parse (or that failed to compile
        before), and starts compiling it; returns the resolved params to queue. Any thread."""
        params = self.resolve(params)
        with self._lock:
            fut = self._cache.get(self.key(params))
        if fut is None:
            self.backend.check(params)
        elif fut.done() and fut.exception() is not None:  # it failed before: fail fast, naming this field
            raise InvalidGrammarError(str(fut.exception()), params.param)
        self.submit(params, count=False)
        return params

    def submit(self, params: StructuredOutputsParams, count: bool = True) -> Future:
        """The compile of ``params`` (cached: every request with the same key shares one)."""
        key = self.key(params)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
            else:
                started: list[float] = []  # set when the compile itself starts (its time limit counts from there)
                fut = self._cache[key] = self._pool.submit(self._compile, params, started)
                fut.compile_started = started
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        if count:
            self.counters.add("grammar_cache_hits" if fut.done() else "grammar_cache_misses")
        return fut

    def _compile(self, params: StructuredOutputsParams, started: list[float]) -> Any:
        self.backend.warm()
        started.append(time.monotonic())
        start = time.perf_counter()
        try:
            compiled = self.backend.compile(params)
            probe = self.backend.allocate_bitmask(1)
            self.backend.make_grammar(compiled).fill_bitmask(probe, 0)
            if not bool(probe.any()):
                raise InvalidGrammarError(f"structured_outputs {params.kind} allows no token to start the output",
                                          params.param)
        except BaseException:
            self.counters.add("compile_failures")
            raise
        self.counters.observe_compile(time.perf_counter() - start)
        return compiled

    def _wait_for_compiles(self, timeout: float) -> None:
        """Blocks up to ``timeout`` s until a waiting request's grammar is compiled: a step with
        nothing to run then does not spin (and starve the compile threads of the GIL)."""
        from engine.request import RequestStatus

        self._pending = {r for r in self._pending if r.status == RequestStatus.WAITING_FOR_FSM}
        if self._pending:
            wait([r.structured_output_request.future for r in self._pending], timeout=timeout,
                 return_when="FIRST_COMPLETED")

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Starts (or finds) the request's compile; it waits as WAITING_FOR_FSM until ``poll`` sees it done."""
        from engine.request import RequestStatus

        params = self.resolve(request.sampling_params.structured_outputs)
        request.sampling_params.structured_outputs = params
        request.structured_output_request = StructuredOutputRequest(params, self.submit(params))
        request.status = RequestStatus.WAITING_FOR_FSM
        self._pending.add(request)
        self.counters.add(f"requests_{params.kind}")

    def poll(self, request: Request) -> str | None:
        """None once the request's matcher exists (its status is then WAITING), "" while its grammar
        compiles, else why it cannot run (the scheduler then ends it with "error")."""
        from engine.request import RequestStatus

        try:
            if not self.grammar_ready(request):
                return ""
        except InvalidGrammarError as e:
            self._pending.discard(request)
            logger.warning("request %s: %s", request.request_id, e)
            return str(e)
        self._pending.discard(request)
        request.status = RequestStatus.WAITING
        return None

    def grammar_ready(self, request: Request) -> bool:
        """Whether the request's matcher exists (made here once its grammar is compiled). Raises
        InvalidGrammarError when the compile failed or ran past ``compile_timeout_s``."""
        sor = request.structured_output_request
        if sor.grammar is not None:
            return True
        fut = sor.future
        if not fut.done():
            limit, started = self.config.compile_timeout_s, getattr(fut, "compile_started", None)
            if not started or time.monotonic() - max(started[0], sor.submitted) <= limit:
                return False  # queued, or compiling within its limit
            self._write_off(fut, sor.params)
            raise InvalidGrammarError(
                f"structured_outputs {sor.params.kind} took longer than {limit:g} s to compile; simplify it "
                "or raise structured_outputs_config compile_timeout_s", sor.params.param)
        exc = fut.exception()
        if exc is not None:
            raise exc if isinstance(exc, InvalidGrammarError) else InvalidGrammarError(
                f"structured_outputs {sor.params.kind} failed to compile: {exc}", sor.params.param)
        sor.grammar = self.backend.make_grammar(fut.result())
        # a request queued with output tokens already (none today) replays them into its matcher
        out = request.output_token_ids
        if out and not sor.grammar.accept_tokens(out):
            raise InvalidGrammarError("the request's tokens so far do not match its grammar", sor.params.param)
        sor.num_accepted = len(out)
        return True

    def _write_off(self, fut: Future, params: StructuredOutputsParams) -> None:
        with self._lock:
            if id(fut) in self._timed_out:
                return
            self._timed_out.add(id(fut))
            self._cache.pop(self.key(params), None)  # a later request tries afresh
        self.counters.add("compile_timeouts")
        self.counters.add("compile_failures")
        logger.warning("a %s grammar compile ran past %g s; its thread is abandoned", params.kind,
                       self.config.compile_timeout_s)
        self._pool.replace_stuck_thread()

    def advance(self, request: Request, token: int) -> str | None:
        """Feeds one appended output token to the request's matcher: None to go on, "stop" when the
        grammar ended, "error" when it rejected the token (a bug, or no allowed token was left)."""
        sor = request.structured_output_request
        if sor is None or sor.grammar is None:
            return None
        if not sor.grammar.accept_tokens([token]):
            logger.error("request %s: token %d does not match its grammar; finishing it", request.request_id, token)
            return "error"
        sor.num_accepted += 1
        return "stop" if sor.grammar.is_terminated() else None

    def validate_drafts(self, request: Request, drafts: list[int]) -> list[int]:
        """The proposals up to (not including) the first one the grammar rejects or ends with."""
        sor = request.structured_output_request
        if not drafts or sor is None or sor.grammar is None:
            return drafts
        return sor.grammar.validate_tokens(drafts)

    # ---- the step's bitmask ----------------------------------------------------------------
    def fill_bitmask(self, so: SchedulerOutput, requests: dict[str, Request]) -> None:
        """Sets ``so.grammar_bitmask`` and ``so.structured_output_request_ids``: one row per constrained
        row that samples, and one per proposal position of a verifying request (the matcher is
        advanced through the proposals and rolled back)."""
        rows: dict[str, int] = {}
        plain: list[StructuredOutputGrammar] = []
        plain_rows: list[int] = []
        spec_rows: list[tuple[StructuredOutputGrammar, int, list[int]]] = []
        n = 0
        for rid, sample in zip(so.req_ids, so.sample):
            sor = requests[rid].structured_output_request if sample else None
            if sor is None or sor.grammar is None:
                continue
            rows[rid] = n
            spec = so.spec_token_ids.get(rid)
            if spec:
                spec_rows.append((sor.grammar, n, spec))
                n += len(spec) + 1
            else:
                plain.append(sor.grammar)
                plain_rows.append(n)
                n += 1
        if not rows:
            if not so.req_ids and self._pending:
                self._wait_for_compiles(0.005)
            return
        bitmask = self.backend.allocate_bitmask(n)
        if plain:
            self.backend.fill_bitmasks(plain, bitmask, plain_rows)
        for grammar, start, spec in spec_rows:
            accepted = 0
            for j, tok in enumerate(spec):
                grammar.fill_bitmask(bitmask, start + j)
                if not grammar.accept_tokens([tok]):
                    break  # verification rejects it (masked); the rows after it are never used
                accepted += 1
            else:
                grammar.fill_bitmask(bitmask, start + len(spec))
            grammar.rollback(accepted)
        so.grammar_bitmask = bitmask
        so.structured_output_request_ids = rows

    def get_stats(self) -> StructuredOutputStats:
        return self.counters.snapshot()

    def shutdown(self) -> None:
        self._pool.shutdown()
        if self._backend is not None:
            self._backend.shutdown()


def make_structured_output_manager(config: Any, tokenizer_loader: Callable[[], Any],
                                   eos_token_ids: frozenset[int]) -> StructuredOutputManager:
    """The engine's manager, with the backend ``structured_outputs_config`` names (built on first use)."""
    from engine.structured_output.backend import make_backend

    cfg = config.structured_outputs_config or StructuredOutputsConfig()
    key = str(config.tokenizer or config.model.path)

    def backend() -> StructuredOutputBackend:
        return make_backend(cfg.resolved_backend, tokenizer_loader, config.model.vocab_size, sorted(eos_token_ids), key)

    return StructuredOutputManager(backend, cfg)
