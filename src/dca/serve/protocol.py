"""The OpenAI wire format: request bodies checked into `Request`s, and the bodies of answers and errors.

Checks are written out by hand rather than left to pydantic so that every refusal is a 400 with an
OpenAI-style body, `{"error": {"message", "type", "param", "code"}}`, naming the offending field.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal, get_args

# what a request's `augment` may say (and `dca serve --augment`, by name): each value is passed to
# AugmentedLM.generate(augment=...) as it is, so a new mode of generate needs only its name and value here
# ("async": decoding starts at once and the latents are written in when ready, dca.serve.asynchronous)
AugmentOption = Literal["true", "false", "async"]
AUGMENT_OPTIONS: dict[str, Any] = dict(zip(get_args(AugmentOption), (True, False, "async"), strict=True))
AUGMENT_VALUES: tuple[Any, ...] = tuple(AUGMENT_OPTIONS.values())
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 512  # chat's default is "the rest of the context", capped at this
MAX_STOP = 4


class RequestError(Exception):
    """A request the server will not run; `status` is its HTTP status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class Request:
    """A checked completion or chat request. `prompts` are texts or token ids; chat has one, from the template."""

    chat: bool
    prompts: list[str | list[int]]
    max_tokens: int | None  # None: the default for the endpoint
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    n: int
    stream: bool
    augment: Any
    model: str | None
    messages: list[dict[str, str]] | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {value!r}", name, "invalid_type")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RequestError(f"{name} must lie in {bracket}{low:g}, {high:g}], got {value!r}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise RequestError(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"{name} must be an integer {limit}, got {value!r}", name, "invalid_value")
    return value


def _prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("prompt is missing: give a string, a list of strings or a list of token ids", "prompt",
                           "missing_required_parameter")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [list(prompt)]
    else:
        raise RequestError(f"prompt must be a string, a non-empty list of strings or a non-empty list of token ids, "
                           f"got {type(prompt).__name__}", "prompt", "invalid_type")
    if any(p == "" for p in prompts):
        raise RequestError("prompt is empty: give at least one token of text", "prompt", "invalid_value")
    return prompts


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError("messages is missing: give a list of {role, content} objects", "messages",
                           "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages",
                           "invalid_type")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise RequestError(f"messages[{i}] must be an object with string role and content", f"messages[{i}]",
                               "invalid_type")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_request(body: Any, *, chat: bool, max_n: int, default_augment: Any = True) -> Request:
    """Check a /v1/completions (or, with `chat`, /v1/chat/completions) body."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {model!r}", "model", "invalid_type")
    stop = body.get("stop")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (tuple, list)) or len(stops) > MAX_STOP or not all(
            isinstance(s, str) and s for s in stops):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them, got {stop!r}",
                           "stop", "invalid_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream", "invalid_type")
    augment = body.get("augment", default_augment)
    if not any(augment is v or (isinstance(v, str) and augment == v) for v in AUGMENT_VALUES):
        raise RequestError(f"augment must be one of {json.dumps(list(AUGMENT_VALUES))}, got {json.dumps(augment)}",
                           "augment", "invalid_value")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    return Request(
        chat=chat,
        prompts=[] if chat else _prompts(body),
        messages=_messages(body) if chat else None,
        max_tokens=_integer(body, name, None, 1),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 0),  # not OpenAI's, but vLLM's and transformers'
        stop=tuple(stops),
        seed=_integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1),
        n=_integer(body, "n", 1, 1, max_n),
        stream=stream,
        augment=augment,
        model=model,
    )


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def choice(chat: bool, index: int, text: str, finish_reason: str | None) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def response(chat: bool, id: str, model: str, choices: list[dict], prompt_tokens: int,
             completion_tokens: int) -> dict:
    return {"id": id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk(chat: bool, id: str, model: str, index: int, text: str | None, finish_reason: str | None,
          first: bool = False) -> dict:
    """One server-sent event of a streamed answer: new text for one choice, or its finish reason."""
    if chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        piece = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        piece = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [piece]}
