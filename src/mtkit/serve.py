"""`mtkit serve`: a model over HTTP (FastAPI on uvicorn), with dynamic batching.

Requests that arrive close together share one decoding batch: a request's lines wait at most
`max_wait_ms` for others (and no longer once as many requests wait as the last batch had, or their
lines fill a batch), then all waiting lines
go through `Translator.run` together, which sorts them by length into token-budget batches as
`mtkit translate` does. Decoding runs in one worker thread, off the event loop, so `/health` and
new requests are answered while a batch decodes. A request whose client has gone, or that timed
out, is dropped before its lines are decoded. SIGTERM (uvicorn's graceful shutdown) stops accepting
connections, finishes the requests in flight and exits 0.

Endpoints: POST /v1/translate, GET /health, GET /v1/models, OpenAPI docs at /docs, and at / a page
(src/mtkit/static) that translates and shows every attention head.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
# the request class is imported inside create_app (FastAPI is an optional dependency).
import asyncio
import json
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from mtkit.errors import UserError

log = logging.getLogger("mtkit")

INSTALL = 'pip install "mtkit[serve]"'
MAX_BEAM = 64


@dataclass
class ServeOptions:
    """How `mtkit serve` listens, batches and limits requests."""

    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_wait_ms: float = 50.0
    """How long a request's lines wait at most for others to share their batch (less when as many
    requests wait as the last batch had)."""
    max_tokens: int | None = None
    """Source tokens x beam per decoding batch (default: the model's decode.max_tokens)."""
    max_lines: int = 256
    """Lines per request at most."""
    max_body: int = 1 << 20
    """Request body bytes at most."""
    timeout: float = 60.0
    """Seconds a request may wait for its translation before a 503."""


class BadRequest(Exception):
    """A request the server refuses: the HTTP status and a message naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Request:
    """One request's lines and settings, and where its result goes."""

    lines: list[str]
    beam: int
    nbest: int
    attention: bool
    future: asyncio.Future
    cancelled: bool = False  # timed out or the client went away: not decoded
    words: int = field(init=False)

    def __post_init__(self) -> None:
        self.words = sum(len(line.split()) + 1 for line in self.lines)


def parse_request(body: bytes, max_lines: int, default_beam: int) -> tuple[list[str], int, int, bool]:
    """(lines, beam, nbest, attention) of a /v1/translate body, or BadRequest naming the field."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(400, f"body: invalid UTF-8 at byte {exc.start}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadRequest(400, f"body: not JSON ({str(exc).splitlines()[0][:100]})") from None
    if not isinstance(data, dict):
        raise BadRequest(422, f"body: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"text", "beam", "nbest", "attention"})
    if unknown:
        raise BadRequest(422, f"{unknown[0]}: unknown field (known: text, beam, nbest, attention)")
    if "text" not in data:
        raise BadRequest(422, "text: required (a string, or a list of strings: one per line)")
    raw = data["text"]
    lines = [raw] if isinstance(raw, str) else raw
    if not isinstance(lines, list):
        raise BadRequest(422, f"text: expected a string or a list of strings, got {type(raw).__name__}")
    for i, line in enumerate(lines):
        if not isinstance(line, str):
            raise BadRequest(422, f"text[{i}]: expected a string, got {type(line).__name__}")
    if len(lines) > max_lines:
        raise BadRequest(413, f"text: {len(lines)} lines; at most {max_lines} per request (--max-lines)")
    beam = _integer(data, "beam", default_beam, 1, MAX_BEAM)
    nbest = _integer(data, "nbest", 1, 1, beam)
    attention = data.get("attention", False)
    if not isinstance(attention, bool):
        raise BadRequest(422, f"attention: expected true or false, got {json.dumps(attention)[:40]}")
    return lines, beam, nbest, attention


def _integer(data: dict, key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(422, f"{key}: expected an integer from {low} to {high}, "
                              f"got {json.dumps(value)[:40]}")
    return value


class Batcher:
    """Collects the lines of requests that arrive together and decodes them as one batch in a
    worker thread; each request gets its own translations back."""

    def __init__(self, translator: Any, max_wait: float, max_words: int):
        self.translator, self.max_wait, self.max_words = translator, max_wait, max_words
        self.queue: asyncio.Queue[Request] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mtkit-decode")
        self.task: asyncio.Task | None = None
        self.counts = {"requests": 0, "batches": 0, "dropped": 0}  # reported by /health
        self.expect = 1  # requests to wait for: the last batch's and those that came meanwhile
        self.arrived = 0  # requests that came while a batch decoded

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def submit(self, request: Request) -> None:
        self.counts["requests"] += 1
        self.arrived += 1
        await self.queue.put(request)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            words = batch[0].words
            # Wait for others to share the batch, up to max_wait, and no longer once as many requests
            # wait as the last batch had plus those that came while it decoded: under steady load those
            # clients come back together, and a batch of the few that came back late would cost nearly
            # a full one (and two alternating half batches, half the throughput).
            while words < self.max_words:
                if self.queue.empty():  # take all that wait; wait for more only as said above
                    remaining = deadline - loop.time()
                    if len(batch) >= self.expect or remaining <= 0:
                        break
                    try:
                        request = await asyncio.wait_for(self.queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                else:
                    request = self.queue.get_nowait()
                batch.append(request)
                words += request.words
            live = [r for r in batch if not r.cancelled and not r.future.done()]
            self.counts["dropped"] += len(batch) - len(live)
            if not live:
                continue
            self.arrived = 0
            self.counts["batches"] += 1
            try:
                results = await loop.run_in_executor(self.executor, self._decode, live)
                self.expect = len(live) + self.arrived
            except Exception as exc:  # one bad batch must not stop the server
                log.exception("decoding failed")
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            for r, result in zip(live, results):
                if not r.future.done():
                    r.future.set_result(result)

    def _decode(self, requests: list[Request]) -> list[dict]:
        """All requests' lines through the translator, grouped by their settings; per request its
        translations (and n-best lists, attention records)."""
        out: list[dict] = [{} for _ in requests]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(requests):
            if not r.cancelled:
                groups.setdefault((r.beam, r.nbest), []).append(i)
        base = self.translator.decode
        try:
            for (beam, nbest), members in groups.items():
                self.translator.decode = replace(base, beam_size=beam)
                lines = [line for i in members for line in requests[i].lines]
                found = iter(self.translator.run(lines, nbest))
                for i in members:
                    r = requests[i]
                    results = [next(found) for _ in r.lines]
                    out[i] = {"translations": [t.nbest[0][0] for t in results]}
                    if nbest > 1:
                        out[i]["nbest"] = [[{"text": s, "score": round(score, 4)} for s, score in t.nbest]
                                           for t in results]
                    if r.attention:
                        out[i]["attention"] = [self.translator.attention(t) for t in results]
        finally:
            self.translator.decode = base
        return out


def _static() -> Any:
    return resources.files("mtkit") / "static"


def create_app(model: str | Path, opts: ServeOptions) -> Any:
    """The FastAPI application serving `model` (loaded in the background once the server starts)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, Field

    class TranslateRequest(BaseModel):
        text: str | list[str] = Field(description="One line, or a list of lines (one translation each).")
        beam: int | None = Field(None, ge=1, le=MAX_BEAM, description="Beam size (default: the model's).")
        nbest: int = Field(1, ge=1, description="Translations per line, best first (at most the beam).")
        attention: bool = Field(False, description=(
            "Also return every attention weight (encoder, decoder and encoder-decoder; all layers and "
            "heads) with the subwords of both sides, per line and per piece."))

    state: dict[str, Any] = {"translator": None, "error": None, "name": Path(str(model)).name}

    def load() -> None:
        from mtkit.checkpoint import resolve_model
        from mtkit.translate import Translator

        try:
            path = resolve_model(model)
            translator = Translator.load(path, opts.device)
            if opts.max_tokens:
                translator.decode = replace(translator.decode, max_tokens=opts.max_tokens)
            state["path"] = path
            state["translator"] = translator
            log.info("serving %s", path)
        except Exception as exc:  # the server stays up and says why in /health
            state["error"] = str(exc)
            log.error("cannot load %s: %s", model, exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=load, name="mtkit-load", daemon=True)
        loader.start()
        state["loader"] = loader
        yield
        if state.get("batcher") is not None:
            await state["batcher"].stop()

    app = FastAPI(title="mtkit", description="Machine translation with mtkit's Transformer.",
                  lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=str(_static()), check_dir=False), name="static")

    def batcher() -> Batcher | None:
        translator = state["translator"]
        if translator is None:
            return None
        if state.get("batcher") is None:
            d = translator.decode
            state["batcher"] = Batcher(translator, opts.max_wait_ms / 1000, max(1, d.max_tokens // 2))
            state["batcher"].start()
        return state["batcher"]

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the model is loaded; 503 while it loads (or if it could not be)."""
        if state["translator"] is not None:
            counts = state["batcher"].counts if state.get("batcher") is not None else {}
            return JSONResponse({"status": "ok", "model": state["name"], **counts})
        if state["error"] is not None:
            return JSONResponse({"status": "error", "error": state["error"]}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        """The model served: its name, languages, layers, heads and decoding defaults."""
        translator = state["translator"]
        if translator is None:
            return error(503, "model: still loading")
        cfg = translator.model.cfg
        info = {"name": state["name"], "path": str(state["path"]), **translator.languages,
                "layers": cfg.n_layers, "heads": cfg.n_heads, "beam": translator.decode.beam_size,
                "max_positions": cfg.max_positions}
        return JSONResponse({"models": [info]})

    @app.post("/v1/translate", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": TranslateRequest.model_json_schema()}}}})
    async def translate(request: HTTPRequest) -> JSONResponse:
        """Translate one line or a list of lines: {"translations": [...]} in input order."""
        start = time.perf_counter()
        b = batcher()
        if b is None:
            why = "still loading" if state["error"] is None else state["error"]
            return error(503, f"model: {why}")
        try:
            body = await _read_body(request, opts.max_body)
            lines, beam, nbest, attention = parse_request(body, opts.max_lines,
                                                          state["translator"].decode.beam_size)
        except BadRequest as exc:
            return error(exc.status, exc.message)
        job = Request(lines, beam, nbest, attention, asyncio.get_running_loop().create_future())
        await b.submit(job)
        try:
            result = await _wait(job, request, opts.timeout)
        except TimeoutError:
            return error(503, f"timeout: no translation within {opts.timeout:g} s (--timeout)")
        except Exception as exc:
            return error(500, f"decoding failed: {exc}")
        if result is None:  # the client went away
            return error(499, "client closed the request")
        return JSONResponse({"model": state["name"], **result,
                             "time_ms": round(1000 * (time.perf_counter() - start), 2)})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((_static() / "index.html").read_text(encoding="utf-8"))

    return app


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused (413) beyond `limit` bytes without reading all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"body: {declared} bytes; at most {limit} (--max-body)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"body: more than {limit} bytes (--max-body)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait(job: Request, request: Any, timeout: float) -> dict | None:
    """The job's result; None if the client disconnects first (the job is then dropped); TimeoutError
    after `timeout` seconds (the job dropped as well, if not yet decoding)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            try:
                return await asyncio.wait_for(asyncio.shield(job.future), min(0.25, remaining))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
    finally:
        if not job.future.done():
            job.cancelled = True


def run(model: str | Path, opts: ServeOptions) -> None:
    """Serve until SIGINT or SIGTERM (then finish the requests in flight and return)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError(f"mtkit serve needs FastAPI and uvicorn: {INSTALL}") from None
    from mtkit.checkpoint import resolve_model

    resolve_model(model)  # a missing model is one error line now, not a server that never gets ready
    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn raises a caught signal again once it has shut down; SIGTERM asks for a stop
            # once the requests in flight are answered, which is then done: exit 0, not -15
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
                captured.remove(sig)

    config = uvicorn.Config(create_app(model, opts), host=opts.host, port=opts.port, log_level="info",
                            access_log=False, timeout_graceful_shutdown=max(opts.timeout, 1.0))
    Server(config).run()
