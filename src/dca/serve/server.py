"""`dca serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a frozen model and its coprocessor.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (the tokenizer's chat
template), `GET /health`. `stream: true` answers with server-sent events ending in `data: [DONE]`. Beyond
OpenAI's fields, a body may say `augment: false` (the frozen model) and `top_k`.

* batching: concurrent requests share `generate` calls (`dca.serve.engine`); rows are left-padded;
* seeds: each choice j of a request with `seed` s samples with its own generator seeded s + j, so its tokens do
  not depend on what else is in its batch (up to float rounding); without a seed a random one is drawn;
* errors: 400 with `{"error": {"message", "type", "param", "code"}}` for a bad request (also a prompt that with
  its latents, or with its max_tokens, exceeds the context), 404 for another model's name, 503 with
  `Retry-After` when `max_queue` requests are waiting or the server is shutting down, 500 if generation fails;
* a client that disconnects cancels its request (dropped from the queue, or stopped at its next token);
* SIGTERM: uvicorn stops accepting connections and waits for open requests; then the queue is drained.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (a local import) at run time
import asyncio
import json
import socket
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dca.checks import check_device, check_int, check_literal_fields, check_number
from dca.config import help_meta
from dca.errors import ArgumentError, ResourceError
from dca.serve.batch import Row, Sampling
from dca.serve.engine import Engine, Job, QueueFull, ShuttingDown
from dca.serve.loading import chat_text, check_sources, context_limit, latent_slots, load_served, num_latents
from dca.serve.protocol import (
    AUGMENT_OPTIONS,
    CHAT_DEFAULT_MAX_TOKENS,
    COMPLETION_DEFAULT_MAX_TOKENS,
    AugmentOption,
    Request,
    RequestError,
    choice,
    chunk,
    error_body,
    new_id,
    parse_request,
    response,
)

RETRY_AFTER_S = 1


@dataclass
class ServeArgs:
    """Arguments of `dca serve`."""

    model: str = field(default="smollm2-135m", metadata=help_meta("the frozen decoder (builtin name or folder)"))
    coprocessor: str | None = field(default=None, metadata=help_meta("a saved coprocessor for it (none: frozen only)"))
    host: str = field(default="127.0.0.1", metadata=help_meta("address to listen on"))
    port: int = field(default=8000, metadata=help_meta("port to listen on"))
    max_batch: int = field(default=8, metadata=help_meta("most sequences decoded together (also the largest n)"))
    max_wait_ms: float = field(default=10.0, metadata=help_meta("how long a request waits for others to batch with"))
    max_queue: int = field(default=64, metadata=help_meta("waiting requests beyond which new ones get a 503"))
    device: str = field(default="auto", metadata=help_meta("auto, cpu, cuda, ..."))
    served_name: str = field(default="", metadata=help_meta("the model id clients name (default: the model's)"))
    augment: AugmentOption = field(default="true", metadata=help_meta("what a request without an `augment` field gets"))
    store: str | None = field(default=None, metadata=help_meta(
        "a store of augmented contexts (`dca cache build`): prompts that start with a stored document reuse it"))

    def __post_init__(self) -> None:
        check_int("port", self.port, minimum=0)
        if self.port > 65535:
            raise ArgumentError("port", f"must be at most 65535, got {self.port}")
        check_int("max_batch", self.max_batch)
        check_int("max_queue", self.max_queue)
        check_number("max_wait_ms", self.max_wait_ms, low=0.0, high=60_000.0)
        check_device("device", self.device)
        check_literal_fields(self)
        if self.store is not None and not Path(self.store).expanduser().is_dir():
            raise ArgumentError("store", f"no such store folder: {self.store} (build one with `dca cache build`)")


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Handler:
    """Turns checked requests into engine jobs and jobs into OpenAI answers."""

    def __init__(self, engine: Engine, name: str):
        self.engine, self.name = engine, name
        self.tokenizer = engine.tokenizer
        self.context = context_limit(engine.model)
        self.vocab = engine.model.decoder.get_input_embeddings().num_embeddings

    def _prompt_ids(self, req: Request) -> list[list[int]]:
        with self.engine.tokenizer_lock:
            return self._tokenize(req)

    def _tokenize(self, req: Request) -> list[list[int]]:
        if req.chat:
            try:
                text = chat_text(self.tokenizer, req.messages)
            except ArgumentError as err:
                raise RequestError(f"chat completions need a chat template: {err.message}", "messages",
                                   "chat_template_missing") from None
            except Exception as err:  # the template itself refused the messages (e.g. roles out of order)
                raise RequestError(f"the chat template refused these messages: {err}", "messages") from None
            return [self.tokenizer(text, add_special_tokens=False).input_ids]
        ids = [p if isinstance(p, list) else self.tokenizer(p).input_ids for p in req.prompts]
        for p in ids:
            if not p:
                raise RequestError("prompt has no tokens", "prompt", "invalid_value")
            if min(p) < 0 or max(p) >= self.vocab:
                raise RequestError(f"token ids must lie in [0, {self.vocab})", "prompt", "invalid_value")
        return ids

    def rows(self, req: Request) -> tuple[list[Row], int]:
        """One row per prompt and choice, and the number of prompt tokens (counted once per prompt)."""
        prompts = self._prompt_ids(req)
        param = "messages" if req.chat else "prompt"
        rows = []
        for ids in prompts:
            latents = 0 if req.augment is False else latent_slots(self.engine.model, len(ids))
            room = None if self.context is None else self.context - len(ids) - latents
            if room is not None and room < 1:
                raise RequestError(f"the prompt has {len(ids)} tokens and its latents add {latents} cache slots, "
                                   f"which leaves no room "
                                   f"in the model's context of {self.context}: shorten it", param,
                                   "context_length_exceeded")
            max_tokens = req.max_tokens
            if max_tokens is None:
                max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if not req.chat else CHAT_DEFAULT_MAX_TOKENS
                max_tokens = max_tokens if room is None else min(max_tokens, room)
            elif room is not None and max_tokens > room:
                raise RequestError(f"max_tokens={max_tokens} with a prompt of {len(ids)} tokens and {latents} "
                                   f"latent slots exceeds the model's context of {self.context} "
                                   f"(at most {room} new tokens)",
                                   "max_tokens", "context_length_exceeded")
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) % 2 ** 64
                rows.append(Row(ids, max_tokens, Sampling(req.temperature, req.top_p, req.top_k, seed), req.stop))
        return rows, sum(len(p) for p in prompts)

    async def complete(self, http: Any, req: Request):
        from fastapi.responses import JSONResponse, Response, StreamingResponse

        if req.model is not None and req.model != self.name:
            raise RequestError(f"the model {req.model!r} is not served here (this server serves {self.name!r})",
                               "model", "model_not_found", status=404)
        rows, prompt_tokens = self.rows(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        if req.stream:
            for k, row in enumerate(rows):
                row.on_text = lambda text, k=k: loop.call_soon_threadsafe(events.put_nowait, (k, text))
        job = Job(rows, augment=req.augment, on_done=lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
        try:
            self.engine.submit(job)
        except (QueueFull, ShuttingDown) as err:
            raise RequestError(f"the server is busy: {err}; retry in {RETRY_AFTER_S} s", None,
                               "server_busy" if isinstance(err, QueueFull) else "shutting_down", status=503,
                               type="server_error") from None
        id = new_id(req.chat)
        if req.stream:
            return StreamingResponse(self._stream(job, events, id, req.chat), media_type="text/event-stream")
        while not job.done.is_set():
            try:
                await asyncio.wait_for(events.get(), timeout=0.1)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                pass
            if not job.done.is_set() and await http.is_disconnected():
                job.cancel()
                return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        if job.error is not None:
            return JSONResponse(error_body(f"generation failed: {job.error}", "server_error"), status_code=500)
        choices = [choice(req.chat, k, row.text, row.finish_reason) for k, row in enumerate(rows)]
        return JSONResponse(response(req.chat, id, self.name, choices, prompt_tokens,
                                     sum(len(row.tokens) for row in rows)))

    async def _stream(self, job: Job, events: asyncio.Queue, id: str, chat: bool):
        first = [True] * len(job.rows)
        try:
            while (item := await events.get()) is not None:
                k, text = item
                yield _sse(chunk(chat, id, self.name, k, text, None, first=first[k]))
                first[k] = False
            if job.error is not None:
                yield _sse(error_body(f"generation failed: {job.error}", "server_error"))
            else:
                for k, row in enumerate(job.rows):
                    yield _sse(chunk(chat, id, self.name, k, None, row.finish_reason, first=first[k]))
            yield _sse("[DONE]")
        finally:
            if not job.done.is_set():
                job.cancel()  # the client went away


def create_app(engine: Engine, name: str, default_augment: Any = True):
    """The FastAPI app serving `engine`'s model as `name`; it starts the engine, and drains it on shutdown.
    `default_augment` is the `augment` of requests that do not say."""
    try:
        from fastapi import FastAPI
        from fastapi import Request as HTTPRequest
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException
    except ImportError as err:
        raise ResourceError(f"dca serve needs FastAPI and uvicorn: pip install -e '.[serve]' ({err})") from None

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # uvicorn has waited for open requests; finish what is queued

    app = FastAPI(title="dca", lifespan=lifespan)
    app.state.engine = engine
    handler = Handler(engine, name)

    @app.exception_handler(RequestError)
    async def request_error(_, err: RequestError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code, headers=err.headers)

    async def run(http: HTTPRequest, chat: bool):
        try:
            body = await http.json()
        except ValueError:
            raise RequestError("the request body is not valid JSON", None, "invalid_json") from None
        return await handler.complete(http, parse_request(body, chat=chat, max_n=engine.max_batch,
                                                          default_augment=default_augment))

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await run(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await run(http, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "dca"}]}

    @app.get("/health")
    async def health():
        return {"status": "draining" if engine.stopping else "ok", "model": name, "queued": engine.queued(),
                "coprocessor_latents": num_latents(engine.model), **engine.stats}

    return app


def engine_for(args: ServeArgs) -> tuple[Engine, str]:
    from dca.adapter import display_name

    model, tokenizer = load_served(args.model, args.coprocessor, args.device)
    store = None
    if args.store is not None:
        from dca.serve.store import ContextStore

        store = ContextStore(args.store)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000,
                    max_queue=args.max_queue, store=store)
    return engine, args.served_name or display_name(args.model)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` from a background thread on (host, port; 0: a free one). Returns (uvicorn server, thread, port).
    Stop it with `server.should_exit = True; thread.join()`."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.02)
    return server, thread, sock.getsockname()[1]


def run_serve(args: ServeArgs) -> None:
    check_sources(args.model, args.coprocessor)
    try:
        import uvicorn
    except ImportError as err:
        raise ResourceError(f"dca serve needs FastAPI and uvicorn: pip install -e '.[serve]' ({err})") from None
    engine, name = engine_for(args)
    app = create_app(engine, name, AUGMENT_OPTIONS[args.augment])
    print(f"dca serve: {name} ({handler_summary(engine)}) at http://{args.host}:{args.port}/v1", flush=True)
    # no graceful-shutdown timeout: on SIGTERM every open request is finished before the process exits
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=None)


def handler_summary(engine: Engine) -> str:
    n = num_latents(engine.model)
    return f"coprocessor with {n} latents" if n else "frozen model only"
