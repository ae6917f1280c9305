"""The decoding engine behind the server: one copy of the weights, one group of rows per served
width, continuous batching within each group. Plain PyTorch; the LitServe side (`server.py`)
feeds it requests and sends out what it returns.

Each served width has a `GraphedDecoder` (`lit_matmamba.graphs`): a recurrent state preallocated
for `max_batch_size` rows at that width and, on the GPU, one CUDA graph per batch bucket. A
request joins its width's group at the next round: its prompt is prefilled (eagerly, prompts of
one length together) into free rows. Every round samples one token for every active row of every
group, then advances each group by one graphed step; a finished row's slot is refilled by the
group's last row, so the active rows stay leading and a step of n rows replays the graph of the
smallest bucket that holds them. Rows of one width decode together; widths take turns, sharing
the weights.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_matmamba.deploy.common import describe, parse_width
from lit_matmamba.graphs import GraphedDecoder
from lit_matmamba.io import Pretrained
from lit_matmamba.models.config import Width
from lit_matmamba.models.lm import MatMambaLM, sample

from .protocol import CompletionRequest, RequestError


@dataclass
class _Row:
    """One request being decoded."""

    uid: Any
    request: CompletionRequest
    ids: list[int]  # the prompt's tokens
    new: list[int] = field(default_factory=list)  # generated tokens (without the EOS)
    text: str = ""  # the text sent so far
    finish_reason: str | None = None

    @property
    def sampling(self) -> tuple[float, int | None, float | None]:
        r = self.request
        return r.temperature, r.top_k, r.top_p


@dataclass
class _Group:
    """The rows decoding at one width."""

    width: Width
    label: str
    decoder: GraphedDecoder
    params: int
    ms_per_token: float = float("nan")
    rows: list[_Row] = field(default_factory=list)  # row i is the decoder's slot i
    waiting: deque[_Row] = field(default_factory=deque)
    logits: torch.Tensor | None = None  # (len(rows), V): what the rows sample from next


class Engine:
    """Continuous batching of completions at several widths of one nested language model.

    Args:
        pretrained: the model with its tokenizer (`lit_matmamba.io.load`), on the device to serve on.
        widths: the widths served (each as `parse_width` reads it; default: the trained
            granularities). Each costs a state of `max_batch_size` rows and, on the GPU, its graphs.
        max_batch_size: the most rows one width decodes at once; more requests wait for a slot.
        dtype: the weights' dtype (default: kept). With bf16 or fp16 weights the SSM state is kept
            in that dtype too, as stock mamba-ssm does; otherwise as `allocate_cache` keeps it.
        cuda_graphs: replay CUDA graphs of the steps (default: on a CUDA device).
        seed: seed of the sampler (one generator for every request).
        timing_steps: decoding steps timed per width at start-up for `ms_per_token`.
    """

    def __init__(
        self,
        pretrained: Pretrained,
        widths: Sequence[Any] | None = None,
        max_batch_size: int = 16,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool | None = None,
        seed: int = 0,
        timing_steps: int = 20,
    ) -> None:
        if not isinstance(pretrained.model, MatMambaLM):
            raise ValueError(
                f"{pretrained.source} holds a {type(pretrained.model).__name__}, not a language model"
            )
        self.tokenizer = pretrained.tokenizer()
        if self.tokenizer is None:
            raise ValueError(
                f"{pretrained.source} records no tokenizer; serve a checkpoint or an export that has one"
            )
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model = pretrained.model.eval()
        if dtype is not None:
            model.to(dtype)
        self.device = model.backbone.embedding.weight.device
        self.dtype = model.backbone.embedding.weight.dtype
        self.eos = pretrained.eos_token_id()
        self.seq_len = pretrained.seq_len
        self.max_batch_size = max_batch_size
        self.generator = torch.Generator(self.device).manual_seed(seed)
        config = model.config
        ssm_dtype = self.dtype if self.dtype in (torch.bfloat16, torch.float16) else None
        groups: dict[tuple[int, ...], _Group] = {}
        for value in pretrained.granularities if widths is None else widths:
            width = parse_width(value, config)
            key = tuple(config.resolve(width))
            if key in groups:
                continue
            decoder = GraphedDecoder(
                model, width, max_batch_size, ssm_dtype=ssm_dtype, cuda_graphs=cuda_graphs
            )
            groups[key] = _Group(width, self._label(width), decoder, model.num_params(width))
        if not groups:
            raise ValueError("no widths to serve")
        # Widest first: the default width, and the order a latency budget is tried in.
        self.groups = dict(sorted(groups.items(), key=lambda item: -item[1].params))
        self.cuda_graphs = next(iter(self.groups.values())).decoder.cuda_graphs
        self.measure(timing_steps)

    def _label(self, width: Width) -> str:
        d = self.model.config.d_model
        if isinstance(width, int):
            return (
                f"{width} (D)"
                if width == d
                else f"{width} (D/{d // width})"
                if d % width == 0
                else str(width)
            )
        return describe(width)

    # Start-up ----------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, steps: int) -> dict[str, float]:
        """Milliseconds of one decoding step of one row at each width (what a lone request waits
        per token, sampling aside); sets each group's `ms_per_token`. Runs before any request: the
        rows it steps hold no sequence."""
        token = torch.zeros(1, dtype=torch.long, device=self.device)
        for group in self.groups.values():
            for _ in range(2):
                group.decoder.step(token)
            self._sync()
            start = time.perf_counter()
            for _ in range(steps):
                group.decoder.step(token)
            self._sync()
            group.ms_per_token = (time.perf_counter() - start) * 1e3 / steps
        return self.timings()

    def timings(self) -> dict[str, float]:
        """Served width (label) -> measured milliseconds per token, widest first."""
        return {g.label: g.ms_per_token for g in self.groups.values()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def table(self) -> str:
        """The served widths with their parameters and measured milliseconds per token."""
        how = "CUDA graphs" if self.cuda_graphs else "eager"
        lines = [
            f"{'width':>16s} {'params':>12s} {'ms/token':>10s}   (one row, {how}, {self.dtype}, {self.device})"
        ]
        for g in self.groups.values():
            lines.append(f"{g.label:>16s} {g.params:>12,d} {g.ms_per_token:>10.3f}")
        return "\n".join(lines)

    # Requests ----------------------------------------------------------------------------------
    def _group_for(self, request: CompletionRequest) -> _Group:
        config = self.model.config
        served = ", ".join(g.label for g in self.groups.values())
        if request.width is not None:
            value = list(request.width) if isinstance(request.width, tuple) else request.width
            try:
                key = tuple(config.resolve(parse_width(value, config)))
            except ValueError as err:
                raise RequestError(str(err), "width") from None
            if key not in self.groups:
                raise RequestError(
                    f"width {request.width!r} is valid but not served here; served widths: {served}", "width"
                )
            return self.groups[key]
        if request.latency_ms_per_token is not None:
            budget = request.latency_ms_per_token
            for group in self.groups.values():  # widest first
                if group.ms_per_token <= budget:
                    return group
            fastest = min(self.groups.values(), key=lambda g: g.ms_per_token)
            raise RequestError(
                f"no served width decodes within {budget:g} ms per token: the fastest, {fastest.label}, "
                f"takes {fastest.ms_per_token:.3f} ms (measured at start-up)",
                "latency_ms_per_token",
            )
        return next(iter(self.groups.values()))

    def submit(self, uid: Any, request: CompletionRequest) -> None:
        """Queue a request for its width (the next `step` starts it), or raise `RequestError`."""
        group = self._group_for(request)
        ids = self.tokenizer.encode(request.prompt, add_special_tokens=False).ids
        if not ids:
            raise RequestError("the prompt encodes to no tokens: give some text to continue", "prompt")
        if self.seq_len is not None and len(ids) > self.seq_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens, more than the longest context the model was trained "
                f"on ({self.seq_len} tokens): shorten it",
                "prompt",
            )
        group.waiting.append(_Row(uid, request, ids))

    @property
    def busy(self) -> bool:
        return any(g.rows or g.waiting for g in self.groups.values())

    def clear(self) -> list[Any]:
        """Drop every request (after an error); returns their ids."""
        uids = []
        for g in self.groups.values():
            uids += [r.uid for r in g.rows] + [r.uid for r in g.waiting]
            g.rows, g.waiting, g.logits = [], deque(), None
        return uids

    # Decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[tuple[Any, dict[str, Any]]]:
        """One round: admit waiting requests, sample a token for every row, advance every group.
        Returns (uid, message) for each row with news: the new text (possibly empty while a
        character is incomplete), and when it ends its `finish_reason` ("stop" at the end-of-text
        token, "length" at max_tokens) and `usage`."""
        out = []
        for group in self.groups.values():
            self._admit(group)
            if not group.rows:
                continue
            tokens = self._sample(group)
            for row, token in zip(group.rows, tokens):
                out.append((row.uid, self._advance(group, row, token)))
            for i in reversed(range(len(group.rows))):  # refill finished slots from the end
                if group.rows[i].finish_reason is not None:
                    last = len(group.rows) - 1
                    if i != last:
                        group.decoder.move(last, i)
                        group.rows[i] = group.rows[last]
                    group.rows.pop()
            group.logits = None
            if group.rows:
                nxt = torch.tensor([r.new[-1] for r in group.rows], device=self.device)
                group.logits = group.decoder.step(nxt)
        return out

    def _admit(self, group: _Group) -> None:
        free = self.max_batch_size - len(group.rows)
        if not free or not group.waiting:
            return
        rows = [group.waiting.popleft() for _ in range(min(free, len(group.waiting)))]
        prompts = [torch.tensor(r.ids, device=self.device) for r in rows]
        logits = group.decoder.prefill(prompts, start=len(group.rows))  # (len(rows), V)
        group.logits = logits if group.logits is None else torch.cat([group.logits, logits])
        group.rows += rows

    def _sample(self, group: _Group) -> list[int]:
        logits = group.logits[:, : self.model.config.vocab_size]  # (n, V)
        settings = [r.sampling for r in group.rows]
        if len(set(settings)) == 1:
            return sample(logits, *settings[0], generator=self.generator).tolist()
        tokens = torch.empty(len(settings), dtype=torch.long, device=self.device)
        for setting in set(settings):  # rows with one setting sample together
            idx = torch.tensor([i for i, s in enumerate(settings) if s == setting], device=self.device)
            tokens[idx] = sample(logits[idx], *setting, generator=self.generator)
        return tokens.tolist()

    def _advance(self, group: _Group, row: _Row, token: int) -> dict[str, Any]:
        if token == self.eos:
            row.finish_reason = "stop"
        else:
            row.new.append(token)
            if len(row.new) >= row.request.max_tokens:
                row.finish_reason = "length"
        text = self.tokenizer.decode(row.new, skip_special_tokens=True)
        # A byte-level token may end inside a character: hold the text back until it is whole.
        delta = ""
        if row.finish_reason is not None or not text.endswith("\ufffd"):
            delta, row.text = text[len(row.text) :], text
        message: dict[str, Any] = {"text": delta, "finish_reason": row.finish_reason, "width": group.width}
        if row.finish_reason is not None:
            message["usage"] = {
                "prompt_tokens": len(row.ids),
                "completion_tokens": len(row.new),
                "total_tokens": len(row.ids) + len(row.new),
            }
            message["ms_per_token"] = group.ms_per_token
        return message
