"""POST /v1/answer and the OpenAI-compatible POST /v1/chat/completions (LLaVA), with SSE.

Both go through the same generation engine (batched prefill and decode), the same auth, queue
bounds, deadlines and error table as classification. `model` in the chat API is a checkpoint
reference (`name` or `name@version`); `plain` (or the backbone's name) means no prompts. Errors
after a stream has started are sent as a last `data: {"error": ...}` event.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from service import errors
from service.api.deps import GenerationDep, ReadAuth
from service.api.errors import COMMON, responses
from service.engine.answering import Detokenizer, Generation, Prepared, user_message

router = APIRouter(tags=["generation"])
MAX_TEXT = 32_000


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(default=None, description="name[@version]; none: plain model")
    image: str | None = Field(default=None, description="base64 or data: URI")
    instruction: str = Field(min_length=1, max_length=MAX_TEXT)
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stream: bool = False


class AnswerResponse(BaseModel):
    checkpoint: str | None
    version: int | None
    answer: str
    finish_reason: str
    usage: dict[str, int]


def _sse(payload: Any) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _error_event(exc: BaseException) -> bytes:
    if isinstance(exc, errors.PromptServeError):
        return _sse({"error": {"code": exc.code, "message": exc.message}})
    return _sse({"error": {"code": "internal", "message": "internal error; it has been logged"}})


async def _first(stream: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
    """Pull the first event before answering 200, so queue and deadline errors get a status."""
    first = await stream.__anext__()

    async def chained() -> AsyncIterator[Any]:
        yield first
        async for item in stream:
            yield item

    return first, chained()


@router.post(
    "/v1/answer", response_model=AnswerResponse, responses=responses(*COMMON, 404, 415, 504)
)
async def answer(req: AnswerRequest, _: ReadAuth, gen: GenerationDep) -> Any:
    """Answer an instruction about an image under a checkpoint's M²PT prompts."""
    sampling = gen.sampling(req.max_new_tokens, req.temperature, req.top_p, req.seed)
    images = [req.image] if req.image else []
    prep = await gen.prepare(req.checkpoint, user_message(req.instruction, bool(images)), images)
    usage = {"prompt_tokens": len(prep.ids)}
    if not req.stream:
        text, reason, n = await gen.complete(prep, sampling)
        return {
            "checkpoint": prep.checkpoint,
            "version": prep.version,
            "answer": text,
            "finish_reason": reason,
            "usage": {**usage, "completion_tokens": n},
        }
    _, events = await _first(gen.events(prep, sampling))
    detok = Detokenizer(gen.backbone.tokenizer)

    async def body() -> AsyncIterator[bytes]:
        n = 0
        try:
            async for event in events:
                n += len(event.tokens)
                if delta := detok.push(event.tokens):
                    yield _sse({"text": delta})
                if event.finish_reason is not None:
                    if rest := detok.flush():
                        yield _sse({"text": rest})
                    yield _sse(
                        {
                            "checkpoint": prep.checkpoint,
                            "version": prep.version,
                            "finish_reason": event.finish_reason,
                            "usage": {**usage, "completion_tokens": n},
                        }
                    )
        except Exception as exc:
            yield _error_event(exc)
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream")


# --- OpenAI-compatible chat completions ------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for
    model: str = Field(max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=100)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stream: bool = False


def _messages(req: ChatRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI messages -> chat-template messages and inline images (data: URIs only)."""
    out: list[dict[str, Any]] = []
    images: list[str] = []
    for i, m in enumerate(req.messages):
        if m.content is None or isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for part in m.content:
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url[:5].lower() == "data:":
                    raise errors.BadRequest(
                        f"message {i}: image_url must be a data: URI "
                        "(data:image/png;base64,...); remote URLs are never fetched"
                    )
                images.append(url)
                parts.append({"type": "image"})
            else:
                raise errors.BadRequest(f"message {i}: unsupported content part {kind!r}")
        out.append({"role": m.role, "content": parts})
    if sum(len(str(m["content"])) for m in out) > MAX_TEXT * 4:
        raise errors.TooLarge("the conversation is too long")
    return out, images


@router.post("/v1/chat/completions", responses=responses(*COMMON, 404, 415, 504))
async def chat_completions(req: ChatRequest, _: ReadAuth, gen: GenerationDep) -> Any:
    """OpenAI's chat completions API; `model` names the checkpoint (or `plain`)."""
    if req.n not in (None, 1):
        raise errors.BadRequest("n > 1 is not supported; send one request per completion")
    sampling = gen.sampling(
        req.max_completion_tokens or req.max_tokens,
        1.0 if req.temperature is None else req.temperature,  # OpenAI's default
        1.0 if req.top_p is None else req.top_p,
        req.seed,
    )
    messages, images = _messages(req)
    prep = await gen.prepare(req.model, messages, images)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
    if not req.stream:
        text, reason, n = await gen.complete(prep, sampling)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                }
            ],
            "usage": _usage(prep, n),
        }
    _, events = await _first(gen.events(prep, sampling))
    return StreamingResponse(_chat_stream(gen, prep, head, events), media_type="text/event-stream")


def _usage(prep: Prepared, n: int) -> dict[str, int]:
    return {
        "prompt_tokens": len(prep.ids),
        "completion_tokens": n,
        "total_tokens": len(prep.ids) + n,
    }


async def _chat_stream(
    gen: Generation, prep: Prepared, head: dict[str, Any], events: AsyncIterator[Any]
) -> AsyncIterator[bytes]:
    detok = Detokenizer(gen.backbone.tokenizer)

    def chunk(delta: dict[str, Any], reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        return _sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for event in events:
            if delta := detok.push(event.tokens):
                yield chunk({"content": delta})
            if event.finish_reason is not None:
                if rest := detok.flush():
                    yield chunk({"content": rest})
                yield chunk({}, event.finish_reason)
    except Exception as exc:
        yield _error_event(exc)
    yield _sse("[DONE]")
