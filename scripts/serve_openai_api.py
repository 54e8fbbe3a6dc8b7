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

Tools follow OpenAI's API: `tools` (function schemas) are listed in the prompt by the chat template, and calls the
model writes (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, model/tools.py) come back as
`message.tool_calls` (streamed: `delta.tool_calls`) with finish_reason "tool_calls"; `tool_choice` "none", "auto",
"required" or a named function (the last two make the reply start with the call). Results go back as
`{"role": "tool", "tool_call_id", "content"}` messages.

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
from dataclasses import dataclass
from itertools import groupby
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
from model.tools import TOOL_CALL_OPEN, ToolCall, ToolCallStream, openai_tool_calls_to_template  # noqa: E402

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

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant: the calls it made (OpenAI's shape)
    tool_call_id: str | None = None  # tool: the call this message is the result of

    def for_template(self, index: int) -> dict[str, Any]:
        """The message as the chat template takes it: list content joined, `developer` (OpenAI's new name) mapped to
        system, an assistant's tool_calls in the template's shape. A tool message without its tool_call_id or
        content, or a malformed call, is an APIError naming the field (`messages.2.tool_calls`); index is the
        message's position in the request."""
        where = f"messages.{index}"
        if self.role == "tool":
            for name in ("tool_call_id", "content"):
                if getattr(self, name) is None:
                    raise APIError(400, f"{where}.{name}: a tool message needs the tool_call_id of the call it answers "
                                        "and the result as content", param=f"{where}.{name}")
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.role == "assistant" and self.tool_calls:
            try:
                message["tool_calls"] = openai_tool_calls_to_template(self.tool_calls)
            except ValueError as exc:
                raise APIError(400, f"{where}.{exc}", param=f"{where}.tool_calls") from None
        return message


class FunctionDefinition(BaseModel):
    """What the prompt lists of a function tool (other fields, such as `strict`, are dropped)."""

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


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
    tools: list[ToolDefinition] | None = None
    tool_choice: Any = None  # "none", "auto", "required" or {"type": "function", "function": {"name": ...}}
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

    @field_validator("tool_choice")
    @classmethod
    def tool_choice_shape(cls, value: Any) -> Any:
        if value is None or value in ("none", "auto", "required"):
            return value
        function = value.get("function") if isinstance(value, dict) else None
        if isinstance(function, dict) and value.get("type") == "function" and isinstance(function.get("name"), str):
            return value
        raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')


@dataclass
class ToolPlan:
    """How a request uses tools: the ones listed in the prompt, the text the reply is made to start with, and
    whether calls are read out of the reply."""

    tools: list[dict] | None = None
    reply_prefix: str = ""
    parse_calls: bool = False


def tool_plan(req: ChatCompletionRequest, continuation: bool) -> ToolPlan:
    """The request's tools and tool_choice as a ToolPlan; an APIError (400) if they do not fit together.

    "none" (the default without tools): no tools in the prompt, the reply is plain content. "auto" (the default with
    tools): the model may call. "required": the reply starts with "<tool_call>". A named function: the reply starts
    with that call's opening, `<tool_call>{"name": "N", "arguments": `, so the model only writes the arguments."""
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools or []]
    choice = req.tool_choice or ("auto" if tools else "none")
    if choice == "none" or (choice == "auto" and not tools):
        return ToolPlan()
    if not tools:
        raise APIError(400, f"tool_choice {json.dumps(choice)} needs tools", param="tool_choice")
    if continuation:
        raise APIError(400, "tools need a chat model; this server continues raw text (model_mode 0)", param="tools")
    if choice == "auto":
        return ToolPlan(tools, "", True)
    if choice == "required":
        return ToolPlan(tools, TOOL_CALL_OPEN, True)
    name = choice["function"]["name"]
    if name not in [tool["function"]["name"] for tool in tools]:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice")
    opening = TOOL_CALL_OPEN + '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
    return ToolPlan(tools, opening, True)


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
    """400 (as OpenAI's API answers) naming the first offending field by its path in the body, e.g.
    `messages.0.role`."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, message, param=param, code=first["type"])


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

    async def stream(self, messages: list[dict], *, max_new_tokens: int, stop: list[str] | None = None,
                     tools: list[dict] | None = None, reply_prefix: str = "",
                     **sampling) -> AsyncIterator[str | GenerationResult]:
        """Yield the reply's text deltas, then its GenerationResult (`tools` are listed in the prompt, which ends
        with reply_prefix: see chat_prompt). Closing this generator early (the client went away) makes the request
        leave the batch before the next step."""
        prompt = chat_prompt(self.tokenizer, messages, max_new_tokens, self.max_context, self.continuation, tools,
                             reply_prefix)
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

    async def start(self, messages: list[dict], **sampling) -> AsyncIterator[str | GenerationResult]:
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
        """Auth first (401), then JSON, then the schema (400, with a code telling which)."""
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
        plan = tool_plan(req, model_mode == PRETRAIN_MODE)
        messages = [message.for_template(i) for i, message in enumerate(req.messages)]
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
        stream = await worker.start(messages, tools=plan.tools, reply_prefix=plan.reply_prefix, **sampling)
        parts = ReplyParts(reasoning, plan)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                sse_events(stream, header, parts, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await complete(stream, header, parts)

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


class ReplyParts:
    """A reply's text deltas as the API returns them: think pieces, answer pieces and tool calls, in reply order.
    ReplyRouter splits off the think part; when the plan reads calls, ToolCallStream takes them out of the answer
    (so a call's text is never sent as content), and the content is stripped at both ends as parse_tool_calls
    strips it (the template writes "content\n<tool_call>..."). A reply_prefix the model was given is put back in
    front."""

    def __init__(self, reasoning: bool, plan: ToolPlan):
        self.router = ReplyRouter(reasoning and not plan.reply_prefix)  # a forced call starts outside any think part
        self.calls = ToolCallStream() if plan.parse_calls else None
        self.prefix = plan.reply_prefix
        self.content_started, self.held_space = False, ""

    def feed(self, delta: str) -> list[Piece | ToolCall]:
        delta, self.prefix = self.prefix + delta, ""
        return self._take_calls(self.router.feed(delta))

    def close(self) -> list[Piece | ToolCall]:
        """What was held back, at the end of the reply (an unfinished call block is content)."""
        parts = self.feed("") + self._take_calls(self.router.close())
        return parts + [piece for text in (self.calls.close() if self.calls else []) for piece in self._content(text)]

    def _take_calls(self, pieces: list[Piece]) -> list[Piece | ToolCall]:
        if self.calls is None:
            return pieces
        parts: list[Piece | ToolCall] = []
        for part in self.calls.split(pieces):
            parts += [part] if isinstance(part, ToolCall) or part[0] == "think" else self._content(part[1])
        return parts

    def _content(self, text: str) -> list[Piece]:
        """Answer text without the content's leading whitespace; trailing whitespace is held until text follows."""
        if not self.content_started:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self.held_space += text
            return []
        self.content_started = True
        piece, self.held_space = ("answer", self.held_space + body), text[len(body):]
        return [piece]


async def complete(stream: AsyncIterator[str | GenerationResult], header: dict, parts: ReplyParts) -> dict[str, Any]:
    """The whole `chat.completion` body, once generation is over."""
    routed: list[Piece | ToolCall] = []
    try:
        async for item in stream:
            if isinstance(item, GenerationResult):
                result = item
                routed += parts.close()
            else:
                routed += parts.feed(item)
    except Exception as exc:
        raise generation_failed(exc) from exc
    calls = [part for part in routed if isinstance(part, ToolCall)]
    reasoning, content = reasoning_and_content([part for part in routed if not isinstance(part, ToolCall)])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if parts.router.has_think:
        message["reasoning_content"] = reasoning
    if calls:
        message["content"] = content or None
        message["tool_calls"] = [call.to_openai() for call in calls]
    finish_reason = "tool_calls" if calls else result.finish_reason
    return {
        **header,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_of(result),
    }


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event; the blank line ending it is what makes a client dispatch it."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def sse_events(
    stream: AsyncIterator[str | GenerationResult], header: dict, parts: ReplyParts, include_usage: bool
) -> AsyncIterator[str]:
    """`chat.completion.chunk` events: the role chunk, content / reasoning_content / tool_calls chunks
    (finish_reason null; each call whole in one chunk, at its `index`), an empty-delta chunk carrying finish_reason,
    the usage chunk (`choices: []`) if asked for, then [DONE]. A failure mid-stream is sent as an {"error": ...}
    event, which ends the stream."""
    calls_sent = 0

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({**header, "object": "chat.completion.chunk", "choices": [choice]})

    def delta_chunks(routed: list[Piece | ToolCall]) -> list[str]:
        """One chunk per run of text of one kind, one per call."""
        nonlocal calls_sent
        events = []
        for kind, run in groupby(routed, key=lambda part: "call" if isinstance(part, ToolCall) else part[0]):
            if kind == "call":
                for call in run:
                    events.append(chunk({"tool_calls": [{"index": calls_sent, **call.to_openai()}]}))
                    calls_sent += 1
            else:
                field = "reasoning_content" if kind == "think" else "content"
                events.append(chunk({field: "".join(text for _, text in run)}))
        return events

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for item in stream:
            if isinstance(item, GenerationResult):
                for event in delta_chunks(parts.close()):
                    yield event
                yield chunk({}, "tool_calls" if calls_sent else item.finish_reason)
                if include_usage:
                    yield sse({**header, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(item)})
            else:
                for event in delta_chunks(parts.feed(item)):
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
