"""lm-evaluation-harness adapter: any width of a trained nested language model as lm-eval model
`matmamba`.

lm-eval (0.4.x) finds models in its registry only; it has no plugin mechanism for models of other
packages, so the adapter registers itself when this module is imported. From the command line,
`main.py lm_eval` imports it and then runs lm-eval's own command line with the same arguments:

    python main.py lm_eval --model matmamba --model_args pretrained=CKPT_OR_DIR,width=64 --tasks lambada_openai

From Python, `import lit_matmamba.deploy.harness` and then
`lm_eval.simple_evaluate(model="matmamba", model_args=...)`. Model arguments: `pretrained` (a
training checkpoint or a model directory with a tokenizer), `width` (an int, `D/4`, a `search`
result JSON, or one int per layer separated by colons: `64:32:32:16`, since lm-eval splits
`--model_args` on commas), `max_length` (default: the trained sequence length; longer inputs
keep their last tokens, and loglikelihood_rolling uses windows of it), `max_gen_toks`. The device
and batch size come from lm-eval's `--device` (its default, cuda, runs on the CPU where there is
no GPU) and `--batch_size`.

Scoring is exact under batching: the model is causal, so right-padding a batch to its longest
sequence changes no logit that is read.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models: get_model imports them only into an empty registry)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(
        f"lm-evaluation-harness is not installed ({err}): pip install 'lit-matmamba[eval]'"
    ) from err

from lit_matmamba.io import load

from .common import parse_width, pick_device


@register_model("matmamba")
class MatMambaEvalLM(TemplateLM):
    """A width of a lit-matmamba language model for lm-eval (module docstring for the arguments)."""

    def __init__(
        self,
        pretrained: str,
        width: Any = None,
        device: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's --device defaults to cuda: run where we can, as its hf model does
        self._device = pick_device(device)
        self.pretrained = load(str(pretrained), map_location=self._device)
        if not self.pretrained.is_language_model:
            raise ValueError(
                f"{pretrained} holds a {type(self.pretrained.model).__name__}, not a language model"
            )
        self.tokenizer = self.pretrained.tokenizer()
        if self.tokenizer is None:
            raise ValueError(f"{pretrained} records no tokenizer; lm-eval needs one")
        self.model = self.pretrained.model.eval()
        self.width = parse_width(width, self.model.config)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": 8
        self.max_length = int(max_length or self.pretrained.seq_len or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self._eos = self.pretrained.eos_token_id()  # once: each call parses the tokenizer's JSON
        self._eot = self._eos if self._eos is not None else 0

    # What lm-eval asks of a model ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "matmamba-" + (self.pretrained.source.rsplit("/", 1)[-1] or "tokenizer")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_source": self.pretrained.source, "width": self.width, "max_length": self.max_length}

    # Scoring --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding gives it) of each
        (context, continuation) pair of token ids, in batches of right-padded sequences."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        vocab = self.model.config.vocab_size
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            inputs, spans = [], []
            for i in rows:
                context, continuation = pairs[i]
                # Predict every continuation token: the input is the sequence minus its last token,
                # keeping at most max_length tokens (the latest).
                seq = (context + continuation)[-(self.max_length + 1) :][:-1]
                inputs.append(seq)
                spans.append((len(seq) - len(continuation), continuation))
            longest = max(len(s) for s in inputs)
            ids = torch.tensor([s + [0] * (longest - len(s)) for s in inputs], device=self._device)
            logprobs = F.log_softmax(self.model(ids, self.width)[..., :vocab].float(), dim=-1)  # (b, L, V)
            for row, i, (first, continuation) in zip(logprobs, rows, spans):
                target = torch.tensor(continuation, device=self._device)
                picked = row[first : first + len(continuation)]  # (n, V)
                logprob = picked.gather(-1, target[:, None]).sum()
                out[i] = (float(logprob), bool((picked.argmax(-1) == target).all()))
        return out

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list:
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(make_disjoint_window(window))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._score(windows)):
            totals[n] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []  # decoding stops at the end-of-text token anyway
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0))
            if not kwargs.pop("do_sample", False):
                temperature = 0.0  # lm-eval's convention: greedy unless do_sample
            elif temperature == 0.0:
                temperature = 1.0
            ids = self.tok_encode(context)[-self.max_length :] or [self.prefix_token_id]
            row = self.model.generate(
                [torch.tensor(ids)],
                max_new,
                self.width,
                temperature=temperature,
                top_k=kwargs.pop("top_k", None),
                top_p=kwargs.pop("top_p", None),
                eos_token_id=self._eos,
            )[0]
            text = self.tok_decode(row[len(ids) :].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main(argv: list[str], prog: str = "python main.py lm_eval") -> None:
    """lm-eval's own command line, with the model `matmamba` registered (`lm_eval --help`)."""
    from lm_eval.__main__ import cli_evaluate

    if argv in ([], ["-h"], ["--help"]):  # what the adapter takes, then lm-eval's `run --help`
        print(__doc__, flush=True)
        argv = ["run", "--help"]
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
