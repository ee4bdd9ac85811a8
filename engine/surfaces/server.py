"""The HTTP server, `python -m engine serve`: Ollama's API and OpenAI's, for the clients people
already use (the `ollama` and `openai` packages, Open WebUI, editors, curl).

    Ollama   GET /  /api/version  /api/tags  /api/ps     POST /api/chat  /api/generate  /api/show
             /api/pull             DELETE /api/delete
    OpenAI   POST /v1/chat/completions  /v1/completions   GET /v1/models  /v1/models/{model}
    serving  GET /health  /metrics

Both APIs run on the objects of the in-process API (surfaces/api.py): its registry of loaded
models, option names, prompt rendering, thinking parser and response shapes. Generations run
in each model's Batcher (engine/batching.py): up to --parallel sequences decode together, more
wait in a bounded queue (503 beyond it). Answers stream as Ollama's NDJSON or OpenAI's
server-sent events; a client that goes away cancels its generation at the next token.

Errors take each API's shape: Ollama's {"error": "..."} and OpenAI's {"error": {"message",
"type", "param", "code"}}, with 400 for bad input, 404 for an unknown model, 503 when the queue
is full; an error after an answer began streaming is its last line. Starlette and uvicorn are
the `serve` extra (pip install "engine[serve]").
"""
import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from .. import library
from ..batching import QueueFull
from ..errors import EngineError, ModelNotFound
from ..tokenizer import chat_messages
from . import api

try:
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
except ImportError:   # the module still imports (the CLI's help); serve() says what to install
    JSONResponse = PlainTextResponse = Response = StreamingResponse = None

log = logging.getLogger("engine.server")
MAX_BODY = 32 * 2**20        # bytes of a request body
DRAIN_SECONDS = 10.0         # after SIGTERM, how long running answers may go on before they end with an error
POLL_SECONDS = 0.25          # how often a waiting answer looks for a vanished client or a shutdown


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _status_of(error: Exception) -> int:
    if isinstance(error, HTTPError):
        return error.status
    if isinstance(error, ModelNotFound):
        return 404
    if isinstance(error, QueueFull):
        return 503
    if isinstance(error, EngineError):
        return 400
    return 500


OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 503: "server_error", 500: "server_error"}
OPENAI_CODES = {401: "invalid_api_key", 404: "model_not_found", 503: "overloaded"}


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict:
    """The error in the shape of the API the path belongs to."""
    if path.startswith("/v1/"):
        return {"error": {"message": message, "type": OPENAI_TYPES.get(status, "server_error"), "param": param,
                          "code": OPENAI_CODES.get(status)}}
    return {"error": message}


def _json(value) -> str:
    """Compact JSON without null fields (as Ollama's Go structs with omitempty write them)."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    return json.dumps(strip(value), ensure_ascii=False, separators=(",", ":"))


def ollama_json(value, status_code: int = 200):
    """A JSON response as Ollama writes one (no null fields)."""
    return Response(_json(value), status_code=status_code, media_type="application/json")


# --- serving state ------------------------------------------------------------------------------

@dataclass
class ServerState:
    api_key: str | None = None
    ready: bool = True                    # False while the models named at start load
    draining_since: float | None = None   # when SIGTERM came
    requests: dict = field(default_factory=dict)   # (route, status) -> count
    prompt_tokens: int = 0
    generated_tokens: int = 0
    started: float = field(default_factory=time.time)

    def drain_over(self) -> bool:
        return self.draining_since is not None and time.monotonic() - self.draining_since > DRAIN_SECONDS


def metrics_text(state: ServerState) -> str:
    """Prometheus' text format."""
    running = waiting = slots = 0
    rate = 0.0
    models = api.MODELS.running()
    for _, loaded in models:
        r, w = loaded.batcher.busy()
        running, waiting, slots = running + r, waiting + w, slots + loaded.llm.model.slots
        rate += loaded.batcher.tokens_per_second()
    lines = ["# HELP engine_requests_total HTTP requests answered, by route and status.",
             "# TYPE engine_requests_total counter"]
    lines += [f'engine_requests_total{{route="{route}",status="{status}"}} {count}'
              for (route, status), count in sorted(state.requests.items())]
    for name, kind, value, text in [
            ("prompt_tokens_total", "counter", state.prompt_tokens, "Prompt tokens prefilled."),
            ("generated_tokens_total", "counter", state.generated_tokens, "Tokens generated."),
            ("queue_length", "gauge", waiting, "Requests waiting for a slot."),
            ("busy_slots", "gauge", running, "Sequences being generated."),
            ("slots", "gauge", slots, "Sequences the loaded models can generate at once."),
            ("tokens_per_second", "gauge", round(rate, 3), "Tokens generated per second over the last 10 s."),
            ("loaded_models", "gauge", len(models), "Models in memory.")]:
        lines += [f"# HELP engine_{name} {text}", f"# TYPE engine_{name} {kind}", f"engine_{name} {value}"]
    return "\n".join(lines) + "\n"


# --- requests -----------------------------------------------------------------------------------

async def json_body(request) -> dict:
    """The request's JSON object, read up to MAX_BODY bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise HTTPError(413, f"the request body is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, RecursionError) as e:
        raise HTTPError(400, f"invalid JSON in the request body: {e}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return body


def field_of(body: dict, name: str, kinds, default=None, required: bool = False):
    """body[name], checked to be of one of `kinds` (a type or a tuple; a bool is no int here)."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    value = body.get(name)
    if value is None:
        if required:
            raise HTTPError(400, f"{name} is required", name)
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise HTTPError(400, f"{name} must be {names}, got {type(value).__name__}", name)
    return value


@dataclass
class Answer:
    """A submitted generation as an async stream of (thinking, answer) pieces."""
    generation: api.Generation
    events: asyncio.Queue
    request: object
    state: ServerState

    async def pieces(self, watch_client: bool = False):
        """(thinking, answer) per piece, then what the parser held back; raises the batcher's
        error, and ends early (with an error) when the server shuts down. The generation is
        released however it ends: a client that went away cancels it."""
        try:
            if self.generation.job is None:
                return
            parser = self.generation.parser
            while True:
                if self.state.drain_over():
                    raise EngineError("the server is shutting down: this answer was cut short")
                try:
                    kind, value = await asyncio.wait_for(self.events.get(), POLL_SECONDS)
                except asyncio.TimeoutError:
                    if watch_client and await self.request.is_disconnected():
                        return   # (a stream learns it from its next write instead)
                    continue
                if kind == "piece":
                    yield parser.feed(value)
                elif kind == "error":
                    raise value
                else:
                    stats = value
                    self.state.prompt_tokens += stats.prompt_tokens
                    self.state.generated_tokens += stats.generated_tokens
                    break
            yield parser.flush()
        finally:
            self.generation.release()


async def submit(request, state: ServerState, model: str, render, options, keep_alive) -> Answer:
    """Load (in a worker thread: it may take seconds), render and submit; its events come to this
    event loop."""
    if state.draining_since is not None:
        raise HTTPError(503, "the server is shutting down")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def deliver(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:   # the loop is closed: the server is gone
            pass
    generation = await asyncio.to_thread(api.start, model, render, options, keep_alive, deliver)
    return Answer(generation, events, request, state)


def think_field(body: dict):
    think = body.get("think")
    if think is None or isinstance(think, bool):
        return think
    if think in ("high", "medium", "low"):   # gpt-oss' levels: any of them turns thinking on
        return True
    raise HTTPError(400, f"think must be true, false or one of high, medium, low; got {think!r}", "think")


def check_format(body: dict) -> None:
    if body.get("format") not in (None, ""):
        raise HTTPError(400, "structured output (format) is not supported yet", "format")


# --- Ollama's API --------------------------------------------------------------------------------

async def ollama_answer(request, state, body: dict, render, respond):
    model = field_of(body, "model", str, required=True)
    stream = field_of(body, "stream", bool, True)
    options = field_of(body, "options", dict)
    answer = await submit(request, state, model, render, options, body.get("keep_alive"))
    if not stream:
        parts = [p async for p in answer.pieces(watch_client=True)]
        return ollama_json(respond("".join(t for t, _ in parts), "".join(a for _, a in parts), True,
                                    answer.generation.statistics()))

    async def lines():
        try:
            async for thinking, text in answer.pieces():
                if thinking or text:
                    yield _json(respond(thinking, text, False, {})) + "\n"
            yield _json(respond("", "", True, answer.generation.statistics())) + "\n"
        except EngineError as e:
            yield _json({"error": str(e)}) + "\n"
    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def ollama_chat(request):
    state = request.app.state.server
    body = await json_body(request)
    check_format(body)
    if body.get("tools"):
        raise HTTPError(400, "tools are not supported yet", "tools")
    messages = field_of(body, "messages", list, [])
    checked = chat_messages(messages) if messages else []
    think = think_field(body)
    model = body.get("model")
    return await ollama_answer(request, state, body,
                               lambda llm: api.render_chat(llm, checked, think) if checked else None,
                               api.chat_response(model))


async def ollama_generate(request):
    state = request.app.state.server
    body = await json_body(request)
    check_format(body)
    prompt = field_of(body, "prompt", str, "")
    system = field_of(body, "system", str)
    raw = field_of(body, "raw", bool, False)
    think = think_field(body)
    render = api.generate_renderer(prompt, system, raw, think)
    return await ollama_answer(request, state, body, render, api.generate_response(body.get("model")))


async def ollama_tags(request):
    return ollama_json(await asyncio.to_thread(api.list_models))


async def ollama_ps(request):
    return ollama_json(api.ps())


async def ollama_show(request):
    body = await json_body(request)
    model = body.get("model") or body.get("name")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, "model is required", "model")
    return ollama_json(await asyncio.to_thread(api.show, model))


async def ollama_pull(request):
    body = await json_body(request)
    model = body.get("model") or body.get("name")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, "model is required", "model")
    stream = field_of(body, "stream", bool, True)
    if not stream:
        await asyncio.to_thread(library.pull, model)
        return JSONResponse({"status": "success"})

    async def lines():
        yield _json({"status": f"pulling {model}"}) + "\n"
        try:
            await asyncio.to_thread(library.pull, model)
            yield _json({"status": "success"}) + "\n"
        except EngineError as e:
            yield _json({"error": str(e)}) + "\n"
    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def ollama_delete(request):
    body = await json_body(request)
    model = body.get("model") or body.get("name")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, "model is required", "model")
    try:
        await asyncio.to_thread(library.remove, model)
    except EngineError as e:
        raise HTTPError(404, str(e), "model") from None
    return JSONResponse({})


async def ollama_version(request):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return JSONResponse({"version": version("engine")})
    except PackageNotFoundError:
        return JSONResponse({"version": "0.0.0"})


async def root(request):
    return PlainTextResponse("Ollama is running")


# --- OpenAI's API --------------------------------------------------------------------------------

def openai_options(body: dict) -> dict:
    """OpenAI's sampling fields as Ollama's options (checked by the sampler like any other)."""
    options = {}
    for theirs, ours in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                         ("frequency_penalty", "frequency_penalty"), ("presence_penalty", "presence_penalty")):
        if body.get(theirs) is not None:
            options[ours] = body[theirs]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise HTTPError(400, f"max_tokens must be a positive integer, got {limit!r}", "max_tokens")
        options["num_predict"] = limit
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise HTTPError(400, "stop must be a string or a list of strings", "stop")
        options["stop"] = stop
    if body.get("n", 1) != 1:
        raise HTTPError(400, "n must be 1: one choice per request", "n")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise HTTPError(400, "structured output (response_format) is not supported yet", "response_format")
    if body.get("tools"):
        raise HTTPError(400, "tools are not supported yet", "tools")
    return options


def openai_messages(messages) -> list[dict]:
    """OpenAI's messages as ours: content parts joined, reasoning (reasoning_content, or Ollama's
    reasoning) dropped as the chat template drops it."""
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise HTTPError(400, f"message {i} must be an object", "messages")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise HTTPError(400, f"message {i}: only text content parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        role = "system" if message.get("role") == "developer" else message.get("role")
        out.append({"role": role, "content": "" if content is None and role == "assistant" else content})
    return chat_messages(out)


def finish_reason(generation: api.Generation) -> str:
    return "length" if generation.statistics()["done_reason"] == "length" else "stop"


def usage(generation: api.Generation) -> dict:
    stats = generation.job.request.stats
    return {"prompt_tokens": len(generation.job.request.prompt_ids), "completion_tokens": stats.generated_tokens,
            "total_tokens": len(generation.job.request.prompt_ids) + stats.generated_tokens}


async def openai_answer(request, state, body: dict, render, chat: bool):
    model = field_of(body, "model", str, required=True)
    stream = field_of(body, "stream", bool, False)
    stream_options = field_of(body, "stream_options", dict, {})
    answer = await submit(request, state, model, render, openai_options(body), None)
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    def choice(thinking: str, text: str, reason, delta: bool) -> dict:
        if not chat:
            return {"index": 0, "text": thinking + text, "logprobs": None, "finish_reason": reason}
        message = {"role": "assistant", "content": text, "reasoning_content": thinking or None}
        if delta:
            message = {k: v for k, v in message.items() if v}
        return {"index": 0, ("delta" if delta else "message"): message, "logprobs": None, "finish_reason": reason}

    def envelope(choices: list, **more) -> dict:
        return {"id": ident, "object": kind + (".chunk" if stream and chat else ""), "created": created,
                "model": model, "system_fingerprint": "engine", "choices": choices, **more}

    if not stream:
        parts = [p async for p in answer.pieces(watch_client=True)]
        thinking, text = "".join(t for t, _ in parts), "".join(a for _, a in parts)
        return JSONResponse(envelope([choice(thinking, text, finish_reason(answer.generation), False)],
                                     usage=usage(answer.generation)))

    def event(value) -> str:
        return f"data: {json.dumps(value, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def events():
        try:
            if chat:
                yield event(envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]))
            async for thinking, text in answer.pieces():
                if thinking or text:
                    yield event(envelope([choice(thinking, text, None, True)]))
            yield event(envelope([choice("", "", finish_reason(answer.generation), True)]))
            if stream_options.get("include_usage"):
                yield event(envelope([], usage=usage(answer.generation)))
        except EngineError as e:
            yield event(error_body("/v1/", _status_of(e), str(e)))
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


def openai_think(body: dict):
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in ("none", "minimal", "low", "medium", "high"):
        raise HTTPError(400, f"reasoning_effort must be none, minimal, low, medium or high; got {effort!r}",
                        "reasoning_effort")
    return effort != "none"


async def openai_chat(request):
    state = request.app.state.server
    body = await json_body(request)
    messages = openai_messages(body.get("messages"))
    think = openai_think(body)
    return await openai_answer(request, state, body, lambda llm: api.render_chat(llm, messages, think), chat=True)


async def openai_completions(request):
    state = request.app.state.server
    body = await json_body(request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise HTTPError(400, "prompt must be a non-empty string", "prompt")
    return await openai_answer(request, state, body, lambda llm: (prompt, False), chat=False)


def _model_entry(name: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "library"}


async def openai_models(request):
    models = await asyncio.to_thread(library.local_models)
    return JSONResponse({"object": "list", "data": [_model_entry(m.name) for m in models]})


async def openai_model(request):
    name = request.path_params["model"]
    models = await asyncio.to_thread(library.local_models)
    if not any(m.name == name for m in models):
        raise ModelNotFound(f"model {name!r} not found")
    return JSONResponse(_model_entry(name))


# --- serving ------------------------------------------------------------------------------------

async def health(request):
    state = request.app.state.server
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    if state.draining_since is not None:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request):
    return PlainTextResponse(metrics_text(request.app.state.server), media_type="text/plain; version=0.0.4")


async def error_response(request, error: Exception):
    """Any error before an answer began, in the shape of the API asked (Starlette's handler)."""
    status = _status_of(error)
    message = str(error) if status != 500 else f"internal error: {type(error).__name__}: {error}"
    return JSONResponse(error_body(request.url.path, status, message, getattr(error, "param", None)),
                        status_code=status)


class Gate:
    """ASGI middleware around every request: the API key (on every route but /health) and one
    access-log line (client, method, path, status, seconds, bytes)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path = time.perf_counter(), scope["path"]
        sent = {"status": 0, "bytes": 0}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)
        try:
            if self.state.api_key and path != "/health" and not self._authorized(scope):
                await JSONResponse(error_body(path, 401, "a valid API key is required: Authorization: Bearer KEY"),
                                   status_code=401)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            route = path if path in ROUTE_PATHS else "/v1/models/{model}" if path.startswith("/v1/models/") \
                else "other"
            key = (route, sent["status"])
            self.state.requests[key] = self.state.requests.get(key, 0) + 1
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %s %.3fs %d', client[0], scope["method"], path, sent["status"],
                     time.perf_counter() - started, sent["bytes"])

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                expected = f"Bearer {self.state.api_key}".encode()
                return hmac.compare_digest(value, expected)
        return False


ROUTES = [("GET", "/", root), ("HEAD", "/", root), ("GET", "/api/version", ollama_version),
          ("POST", "/api/chat", ollama_chat), ("POST", "/api/generate", ollama_generate),
          ("GET", "/api/tags", ollama_tags), ("GET", "/api/ps", ollama_ps), ("POST", "/api/show", ollama_show),
          ("POST", "/api/pull", ollama_pull), ("DELETE", "/api/delete", ollama_delete),
          ("POST", "/v1/chat/completions", openai_chat), ("POST", "/v1/completions", openai_completions),
          ("GET", "/v1/models", openai_models), ("GET", "/v1/models/{model}", openai_model),
          ("GET", "/health", health), ("GET", "/metrics", metrics)]
ROUTE_PATHS = {path for _, path, _ in ROUTES}


def create_app(state: ServerState | None = None):
    """The ASGI application (Starlette), wrapped in the Gate."""
    from starlette.applications import Starlette
    from starlette.routing import Route
    state = state or ServerState()
    by_path: dict = {}
    for method, path, handler in ROUTES:
        by_path.setdefault(path, []).append((method, handler))
    routes = [Route(path, entries[0][1], methods=[m for m, _ in entries]) for path, entries in by_path.items()]
    # HTTPError and EngineError are answered by Starlette's exception middleware; anything else
    # by its server-error middleware, which also logs the traceback
    app = Starlette(routes=routes, exception_handlers={HTTPError: error_response, EngineError: error_response,
                                                       Exception: error_response})
    app.state.server = state
    return Gate(app, state)


def serve(host: str = "127.0.0.1", port: int = 11434, models=(), parallel: int = 4, api_key: str | None = None,
          max_queue: int = 512, load_options: dict | None = None) -> None:
    """Run the server until SIGINT or SIGTERM. `models` load at start (/health answers 503 until
    they have); others load on first use."""
    if JSONResponse is None:
        raise EngineError('the server needs Starlette and uvicorn: pip install "engine[serve]" '
                          '(or pip install starlette uvicorn)')
    import uvicorn
    api_key = api_key or os.environ.get("ENGINE_API_KEY") or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can use it "
                    "(--api-key or ENGINE_API_KEY)", host)
    api.MODELS.parallel, api.MODELS.max_queue = parallel, max_queue
    api.MODELS.defaults = dict(load_options or {})
    state = ServerState(api_key=api_key, ready=not models)

    def preload():
        try:
            for name in models:
                loaded, seconds = api.MODELS.acquire(name, {})
                api.MODELS.done(loaded, -1)
                log.info("loaded %s in %.1f s (%d parallel sequences)", name, seconds, parallel)
        except EngineError as e:
            log.error("could not load %s", e)
        state.ready = True
    threading.Thread(target=preload, daemon=True).start()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.draining_since is None:
                state.draining_since = time.monotonic()
                log.info("shutting down: answers in progress get %.0f s to finish", DRAIN_SECONDS)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(state), host=host, port=port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=int(DRAIN_SECONDS + 5))
    Server(config).run()
