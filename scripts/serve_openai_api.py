"""OpenAI-compatible HTTP server for a MiniMind checkpoint (FastAPI + uvicorn).

Serves `POST /v1/chat/completions` (streamed as server-sent events or as one JSON body), `GET /v1/models` and
`GET /health`, so the official `openai` client and tools built on it (LangChain, Open WebUI, ...) can talk to a
local model.

Run (model flags are the same as eval_model.py's):
    python scripts/serve_openai_api.py --load 0 --model_mode 1 --dim 512 --n_layers 8          # out/full_sft_512.pth
    python scripts/serve_openai_api.py --load 1 --hf_path MiniMind2 --port 8998 --api_key sk-local
    python scripts/serve_openai_api.py --model_mode 3 --host 0.0.0.0                            # reasoning model, exposed
Then:
    python scripts/chat_openai_api.py --base_url http://127.0.0.1:8998/v1

Generation runs on one background thread, never on the event loop, with continuous batching: concurrent
requests share every decode step (up to --max_batch at once; a step costs little more for 8 rows than for 1), new
requests join between steps and finished ones leave, while `/health` and new connections stay responsive.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `model` when run as `python scripts/...`

from model.common import MODEL_MODES, PRETRAIN_MODE, REASON_MODE, exit_on_input_error  # noqa: E402
from model.batching import ContinuousBatcher, Sampling  # noqa: E402
from model.inference import (  # noqa: E402
    GenerationResult,
    Piece,
    ReplyRouter,
    ReplyText,
    chat_prompt,
)
from model.loading import add_model_args, load_model  # noqa: E402

DEFAULT_MAX_TOKENS = 512  # when a request names no max_tokens; the context length bounds it as well
DEFAULT_TEMPERATURE = DEFAULT_TOP_P = 0.85  # MiniMind's usual sampling, when a request leaves them out (or null)


# ----------------------------------------------------------------------------------------------------------------
# Request schema: the subset of OpenAI's chat-completions body that a local model can honour


class TextPart(BaseModel):
    """One element of a list-valued `content` (the vision-era message format); only text is understood."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_plain(self) -> dict[str, str]:
        """{"role", "content"} with list content joined and `developer` (OpenAI's new name) mapped to system."""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Unknown OpenAI fields (user, logprobs, presence_penalty, ...) are accepted and ignored, as clients send them;
    null means "the default", as in OpenAI's API."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # the range torch.Generator.manual_seed accepts
    n: int | None = Field(1, ge=1, le=1)
    # Not in OpenAI's API; clients pass them through `extra_body`.
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)

    @field_validator("stop")
    @classmethod
    def stop_as_list(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops or None


# ----------------------------------------------------------------------------------------------------------------
# OpenAI-style errors


class APIError(Exception):
    """An error returned to the client as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError) -> APIError:
    """422 naming the first offending field by its path in the body, e.g. `messages.0.role`."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(422, message, param=param, code=first["type"])


def generation_failed(exc: Exception) -> APIError:
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


# ----------------------------------------------------------------------------------------------------------------
# Generation off the event loop


class GenerationWorker:
    """Streams chat replies out of a ContinuousBatcher (model/batching.py), which runs the model on its own thread:
    concurrent requests share its decode steps, up to max_batch at a time, and the event loop only awaits tokens
    handed over with `call_soon_threadsafe`, so it never blocks on the model. Text (stop strings, whole
    characters) is made here from the tokens, by the same ReplyText the terminal chat uses."""

    def __init__(self, model, tokenizer, max_context: int, continuation: bool, max_batch: int = 8):
        self.tokenizer, self.max_context, self.continuation = tokenizer, max_context, continuation
        self.batcher = ContinuousBatcher(model, max_batch=max_batch, eos_token_id=tokenizer.eos_token_id)

    @property
    def pending(self) -> int:
        """Requests accepted and not finished, reported by /health."""
        return self.batcher.active

    async def stream(self, messages: list[dict[str, str]], *, max_new_tokens: int, stop: list[str] | None = None,
                     **sampling) -> AsyncIterator[str | GenerationResult]:
        """Yield the reply's text deltas, then its GenerationResult. Closing this generator early (the client
        went away) makes the request leave the batch before the next step."""
        prompt = chat_prompt(self.tokenizer, messages, max_new_tokens, self.max_context, self.continuation)
        reply = ReplyText(self.tokenizer, len(prompt.ids), stop)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[int | Exception | None] = asyncio.Queue()

        def hand_over(item: int | Exception | None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        handle = self.batcher.submit(prompt.ids, prompt.budget, Sampling(**sampling), hand_over, hand_over)
        try:
            while not reply.done and (item := await events.get()) is not None:
                delta = ""
                while True:  # every token already there goes out as one delta: fewer events when the loop lags
                    if isinstance(item, Exception):
                        raise item
                    delta += reply.push(item)
                    if reply.done or events.empty() or (item := events.get_nowait()) is None:
                        break
                if delta:
                    yield delta
                if item is None:
                    break
            last, result = reply.finish()
            if last:
                yield last
            yield result
        finally:
            handle.cancel()  # nothing to do if it already finished

    async def start(self, messages: list[dict[str, str]], **sampling) -> AsyncIterator[str | GenerationResult]:
        """stream(), once its first item is there: a request the model cannot take fails before any response is
        sent. stream_chat raises ValueError for those (a system message longer than the context): 400."""
        stream = self.stream(messages, **sampling)
        try:
            first = await anext(stream)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        except Exception as exc:
            raise generation_failed(exc) from exc

        async def first_then_rest() -> AsyncIterator[str | GenerationResult]:
            try:
                yield first
                async for item in stream:
                    yield item
            finally:
                await stream.aclose()

        return first_then_rest()

    def close(self) -> None:
        """Stop the batcher (the clients of requests still running are gone when the server stops)."""
        self.batcher.close()


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(
    model,
    tokenizer,
    model_name: str = "minimind",
    api_key: str | None = None,
    max_context: int | None = None,
    model_mode: int = 1,
    max_batch: int = 8,
) -> FastAPI:
    """The FastAPI app serving `model` (a MiniMindLM in eval mode) and its tokenizer.

    max_context bounds prompt + reply tokens (default: the model's max_seq_len); longer conversations lose their
    oldest turns, then tokens from the left, the system message kept. model_mode is eval_model.py's: 0 continues
    the last message as raw text (pretrained model), 3 returns the think part as `reasoning_content`. Up to
    max_batch requests are generated together (continuous batching); more wait for a free row.
    """
    if model_mode not in MODEL_MODES:
        raise ValueError(f"model_mode must be one of {sorted(MODEL_MODES)}, got {model_mode}")
    reasoning = model_mode == REASON_MODE
    worker = GenerationWorker(model, tokenizer, max_context or model.config.max_seq_len, model_mode == PRETRAIN_MODE,
                              max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(title="MiniMind OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker = worker
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # unknown path, wrong method
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")

    async def parse_request(request: Request) -> ChatCompletionRequest:
        """Auth first, then JSON, then the schema, so each failure gets its own status (401, 400, 422)."""
        check_api_key(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "pending_requests": worker.pending}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_api_key(request)
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "minimind"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse_request(request)
        sampling = dict(
            max_new_tokens=req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p,
            top_k=req.top_k,
            repetition_penalty=req.repetition_penalty,
            seed=req.seed,
            stop=req.stop,
        )
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model or model_name}
        stream = await worker.start([m.as_plain() for m in req.messages], **sampling)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                sse_events(stream, header, ReplyRouter(reasoning), include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await complete(stream, header, ReplyRouter(reasoning))

    return app


def usage_of(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def reasoning_and_content(pieces: list[Piece]) -> tuple[str, str]:
    """The think text and the answer text of routed pieces: OpenAI's reasoning_content and content."""
    return tuple("".join(text for kind, text in pieces if kind == part) for part in ("think", "answer"))


async def complete(stream: AsyncIterator[str | GenerationResult], header: dict, router: ReplyRouter) -> dict[str, Any]:
    """The whole `chat.completion` body, once generation is over."""
    pieces: list[Piece] = []
    try:
        async for item in stream:
            if isinstance(item, GenerationResult):
                result = item
                pieces += router.close()
            else:
                pieces += router.feed(item)
    except Exception as exc:
        raise generation_failed(exc) from exc
    reasoning, content = reasoning_and_content(pieces)
    message = {"role": "assistant", "content": content}
    if router.has_think:
        message["reasoning_content"] = reasoning
    return {
        **header,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": usage_of(result),
    }


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event; the blank line ending it is what makes a client dispatch it."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def sse_events(
    stream: AsyncIterator[str | GenerationResult], header: dict, router: ReplyRouter, include_usage: bool
) -> AsyncIterator[str]:
    """`chat.completion.chunk` events: the role chunk, content / reasoning_content chunks (finish_reason null),
    an empty-delta chunk carrying finish_reason, the usage chunk (`choices: []`) if asked for, then [DONE].
    A failure mid-stream is sent as an {"error": ...} event, which ends the stream."""

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({**header, "object": "chat.completion.chunk", "choices": [choice]})

    def delta_chunks(pieces: list[Piece]) -> list[str]:
        think, text = reasoning_and_content(pieces)
        return ([chunk({"reasoning_content": think})] if think else []) + ([chunk({"content": text})] if text else [])

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for item in stream:
            if isinstance(item, GenerationResult):
                for event in delta_chunks(router.close()):
                    yield event
                yield chunk({}, item.finish_reason)
                if include_usage:
                    yield sse({**header, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(item)})
            else:
                for event in delta_chunks(router.feed(item)):
                    yield event
    except Exception as exc:
        yield sse(generation_failed(exc).body())
        return
    finally:
        await stream.aclose()
    yield sse("[DONE]")


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible chat server for a MiniMind checkpoint")
    add_model_args(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 exposes the server to the network")
    server.add_argument("--port", type=int, default=8998)
    server.add_argument("--api_key", default=None, help="if set, requests must send `Authorization: Bearer <key>`")
    server.add_argument("--model_name", default=None, help="model id reported by /v1/models (default: minimind-{stage})")
    server.add_argument("--max_batch", type=int, default=8,
                        help="requests generated together (continuous batching); more wait for a free row")
    args = parser.parse_args()

    import uvicorn

    model, tokenizer = exit_on_input_error(lambda: load_model(args))
    name = args.model_name or f"minimind-{MODEL_MODES[args.model_mode]}"
    app = create_app(model, tokenizer, model_name=name, api_key=args.api_key, max_context=args.max_seq_len,
                     model_mode=args.model_mode, max_batch=args.max_batch)
    print(f"serving {name} ({model.num_parameters() / 1e6:.1f}M parameters) on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
