"""The LitServe side of `main.py serve`: an OpenAI completions spec, the API that loads the model
into an `Engine`, and the loop that runs the engine in LitServe's inference worker.

LitServe's OpenAISpec serves chat completions, and its batching loops run one `predict` per batch
until the whole batch is done, failing every request of the batch when one raises. A model without
a chat template continues text, so this serves OpenAI's completions API (`CompletionsSpec`), and
its own loop (`EngineLoop`) batches continuously: requests join and leave between decoding steps,
and a request the engine refuses gets its own 400 without touching the others.

How a request flows: the spec (in the HTTP process) parses the JSON and checks every field it can
without the model (`protocol.parse_request`); a bad request is answered there. Otherwise it queues
the request and waits for the worker's first message: an error (a width not served, a prompt too
long) becomes a 400; anything else starts the answer, streamed as server-sent events or collected
into one JSON body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import sys
import time
import uuid
from collections import deque
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem

from .engine import Engine
from .protocol import RequestError, parse_request

logger = logging.getLogger(__name__)
COMPLETIONS_PATH = "/v1/completions"


def _error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    error_type = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": error_type, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _worker_error(data: Any) -> JSONResponse:
    """What the worker sent with an ERROR status: our RequestError's fields, or LitServe's own
    exceptions (a pickled exception, an HTTPException)."""
    if isinstance(data, dict) and "status" in data:
        return _error_response(data["status"], data["message"], data.get("param"))
    if isinstance(data, bytes):
        try:
            data = pickle.loads(data)
        except Exception:
            data = None
    if isinstance(data, HTTPException):
        return _error_response(data.status_code, str(data.detail))
    return _error_response(500, f"the model worker failed: {data!r}")


async def _messages(queue: deque, arrived: asyncio.Event):
    """(data, status) of one request's messages from the worker, as they arrive, up to its end
    (LitServe's `data_streamer` logs every error status as a server error; these are mostly 400s)."""
    while True:
        await arrived.wait()
        while queue:
            data, status = queue.popleft()
            if status == LitAPIStatus.FINISH_STREAMING:
                return
            yield data, status
            if status == LitAPIStatus.ERROR:
                return
        arrived.clear()


class CompletionsSpec(LitSpec):
    """POST /v1/completions (OpenAI's completions API, plus `width` and `latency_ms_per_token`)
    and GET /v1/models."""

    def __init__(self, max_tokens: int, model_name: str) -> None:
        super().__init__()
        self.api_path = COMPLETIONS_PATH
        self.max_tokens = max_tokens
        self.model_name = model_name

    @property
    def stream(self) -> bool:
        return True  # the worker sends several messages per request

    def pre_setup(self, lit_api: ls.LitAPI) -> None:
        self.add_endpoint(COMPLETIONS_PATH, self.completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    def decode_request(self, request, context_kwargs=None):  # the engine loop reads requests itself
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "lit-matmamba"}],
        }

    async def completions(self, request: Request):
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            return _error_response(400, f"the request body is not valid JSON: {err}")
        try:
            req = parse_request(data, self.max_tokens)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        uid = uuid.uuid4()
        messages, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=messages)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), req))
        stream = _messages(messages, event)
        try:
            first, status = await anext(stream)
        except StopAsyncIteration:
            self.response_buffer.pop(uid, None)
            return _error_response(500, "the model worker ended the request without an answer")
        if status == LitAPIStatus.ERROR:
            self.response_buffer.pop(uid, None)
            return _worker_error(first)
        head = {
            "id": f"cmpl-{uid.hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model or self.model_name,
        }
        if req.stream:
            body = self._events(uid, head, req.include_usage, first, stream)
            return StreamingResponse(body, media_type="text/event-stream")
        try:
            text, last = [first["text"]], first
            async for message, status in stream:
                if status == LitAPIStatus.ERROR:
                    return _worker_error(message)
                text.append(message["text"])
                last = message
        finally:
            self.response_buffer.pop(uid, None)
        choice = {"text": "".join(text), "index": 0, "logprobs": None, "finish_reason": last["finish_reason"]}
        return {
            **head,
            "choices": [choice],
            "usage": last.get("usage"),
            "width": last["width"],
            "ms_per_token": last.get("ms_per_token"),
        }

    async def _events(self, uid, head: dict, include_usage: bool, first: dict, stream):
        """Server-sent events: one chunk per message of the worker, then [DONE] (OpenAI's format)."""

        def chunk(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        try:
            message = first
            while True:
                choice = {"text": message["text"], "index": 0, "logprobs": None}
                choice["finish_reason"] = message["finish_reason"]
                yield chunk({**head, "choices": [choice], "width": message["width"]})
                if message["finish_reason"] is not None:
                    if include_usage:
                        yield chunk({**head, "choices": [], "usage": message["usage"]})
                    break
                try:
                    message, status = await anext(stream)
                except StopAsyncIteration:
                    break
                if status == LitAPIStatus.ERROR:  # the status line has gone out: an error event
                    yield chunk(json.loads(_worker_error(message).body))
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.response_buffer.pop(uid, None)


class EngineLoop(LitLoop):
    """LitServe's inference-worker loop for the engine: take every queued request, run one engine
    round, send each request its news; block on the queue only while there is nothing to decode."""

    def __call__(
        self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner
    ) -> None:
        engine: Engine = lit_api.engine
        senders: dict[Any, int] = {}  # uid -> the HTTP process waiting for it

        def send(uid, data, status, queue_id=None) -> None:
            queue_id = senders[uid] if queue_id is None else queue_id
            self.put_response(transport, queue_id, uid, data, status, LoopResponseType.STREAMING)

        while True:
            item = self.get_request(request_queue, block=not engine.busy, timeout=1.0)
            while item is not None:
                if item == _SENTINEL_VALUE:
                    return
                queue_id, uid, _, request = item
                try:
                    engine.submit(uid, request)
                    senders[uid] = queue_id
                except RequestError as err:
                    send(
                        uid,
                        {"status": err.status, "message": err.message, "param": err.param},
                        LitAPIStatus.ERROR,
                        queue_id,
                    )
                except Exception as err:  # a bug: this request fails, the others go on
                    logger.exception("could not queue request %s", uid)
                    send(
                        uid,
                        {"status": 500, "message": f"internal error: {err}"},
                        LitAPIStatus.ERROR,
                        queue_id,
                    )
                item = self.get_request(request_queue, block=False)
            if not engine.busy:
                continue
            try:
                news = engine.step()
            except Exception as err:
                logger.exception("decoding failed; every request in flight fails")
                for uid in engine.clear():
                    send(
                        uid,
                        {"status": 500, "message": f"internal error while decoding: {err}"},
                        LitAPIStatus.ERROR,
                    )
                    senders.pop(uid, None)
                continue
            for uid, message in news:
                send(uid, message, LitAPIStatus.OK)
                if message["finish_reason"] is not None:
                    send(uid, "", LitAPIStatus.FINISH_STREAMING)
                    del senders[uid]


class MatMambaAPI(ls.LitAPI):
    """Loads the model on the worker's device and builds the `Engine` (arguments as `serve`'s)."""

    def __init__(
        self,
        source: str,
        widths: list | None,
        max_batch_size: int,
        max_tokens: int,
        dtype: str,
        cuda_graphs: bool | None,
        seed: int,
        name: str,
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size, spec=CompletionsSpec(max_tokens, name), loop=EngineLoop()
        )
        self.source, self.widths, self.dtype = source, widths, dtype
        self.cuda_graphs, self.seed = cuda_graphs, seed

    def setup(self, device: str) -> None:
        from lit_matmamba.io import load

        try:
            pretrained = load(self.source, map_location=device)
            self.engine = Engine(
                pretrained,
                self.widths,
                self.max_batch_size,
                getattr(torch, self.dtype),
                self.cuda_graphs,
                self.seed,
            )
        except (ValueError, OSError) as err:
            print(f"serve: error: {err}", file=sys.stderr, flush=True)
            raise
        print(f"serving {self.source}\n{self.engine.table()}", flush=True)

    def predict(self, x):  # EngineLoop drives the engine; LitServe's loops, which call this, are unused
        raise NotImplementedError
