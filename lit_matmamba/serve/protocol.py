"""A completion request as the server reads it: OpenAI's completions fields plus `width` and
`latency_ms_per_token`, checked before anything is queued (`parse_request`).

What needs the model (is the width served, how many tokens is the prompt) is checked by the
engine (`Engine.submit`); both raise `RequestError`, which the server answers with a 400 and an
OpenAI-style error body.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

# Fields the server reads (OpenAI's legacy completions API plus ours), and OpenAI fields it accepts
# only at the value that means "off": anything else there is an error, not silently ignored.
_READ = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stream",
    "stream_options",
    "width",
    "latency_ms_per_token",
    "user",
}
_OFF = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "stop": None,
    "suffix": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "seed": None,
}
# A width in a request: an int, one int per layer, "D" or "D/k". Not a file (the command line's
# search-result JSON): a request must not name files on the server.
_WIDTH_TEXT = re.compile(r"D(/\d+)?|\d+([,: ]+\d+)*")


class RequestError(ValueError):
    """A request the server refuses: `status` (400) and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": None,
            }
        }


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request. `width` is as the client wrote it (the engine resolves it against the
    model); at most one of `width` and `latency_ms_per_token` is set."""

    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    include_usage: bool = False
    width: int | str | tuple[int, ...] | None = None
    latency_ms_per_token: float | None = None
    model: str | None = None


def _number(
    data: dict, name: str, low: float, high: float = math.inf, low_open: bool = False
) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {value!r}", name)
    if value < low or (low_open and value == low) or value > high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"{name} must lie in {bounds}, got {value!r}", name)
    return float(value)


def _int(data: dict, name: str, low: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be a whole number, got {value!r}", name)
    if value < low:
        raise RequestError(f"{name} must be at least {low}, got {value}", name)
    return value


def _width(value: Any) -> int | str | tuple[int, ...] | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and _WIDTH_TEXT.fullmatch(value.strip()):
        return value.strip()
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    raise RequestError(
        f"width must be an int, one int per layer (a list), 'D' or 'D/k' (such as 'D/4'), got {value!r}",
        "width",
    )


def parse_request(data: Any, max_tokens_limit: int) -> CompletionRequest:
    """A JSON body (already decoded) -> a `CompletionRequest`, or `RequestError` naming what is
    wrong. `max_tokens_limit`: the most new tokens a request may ask for."""
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _READ - set(_OFF))
    if unknown:
        raise RequestError(
            f"unknown field {unknown[0]!r}; this server reads {', '.join(sorted(_READ))}", unknown[0]
        )
    for name, off in _OFF.items():
        value = data.get(name)
        if value is not None and value != off and not (name == "stop" and value == []):
            raise RequestError(f"{name}={value!r} is not supported by this server (leave it out)", name)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string (one prompt per request)", "prompt")
    if not prompt:
        raise RequestError("prompt is empty: give some text to continue", "prompt")
    max_tokens = _int(data, "max_tokens", 1)
    max_tokens = min(16, max_tokens_limit) if max_tokens is None else max_tokens  # 16: OpenAI's default
    if max_tokens > max_tokens_limit:
        raise RequestError(
            f"max_tokens={max_tokens} is more than this server generates for a request ({max_tokens_limit})",
            "max_tokens",
        )
    temperature = _number(data, "temperature", 0.0)
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    options = data.get("stream_options")
    if options is not None and (
        not stream or not isinstance(options, dict) or set(options) - {"include_usage"}
    ):
        raise RequestError(
            'stream_options is {"include_usage": true|false}, with stream true', "stream_options"
        )
    width = _width(data.get("width"))
    budget = _number(data, "latency_ms_per_token", 0.0, low_open=True)
    if width is not None and budget is not None:
        raise RequestError("give width or latency_ms_per_token, not both", "width")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {model!r}", "model")
    return CompletionRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=_number(data, "top_p", 0.0, 1.0, low_open=True),
        top_k=_int(data, "top_k", 1),
        stream=stream,
        include_usage=bool((options or {}).get("include_usage", False)),
        width=width,
        latency_ms_per_token=budget,
        model=model,
    )
