"""`main.py serve`: one copy of a nested model's weights answering each request at the width it
asks for, over an OpenAI-compatible completions API on LitServe.

    python main.py serve --ckpt_path logs/lm_demo/version_0/checkpoints/last.ckpt --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0, "width": "D/4"}'

- `engine.py`: the decoding engine (plain PyTorch): a `GraphedDecoder` per served width,
  continuous batching, the start-up timings a latency budget is read against.
- `protocol.py`: what a request may hold, checked before it is queued.
- `server.py`: LitServe's side (the completions spec, the API, the worker loop).
- `load_test.py`: concurrent clients of mixed widths against a running server
  (`python -m lit_matmamba.serve.load_test --help`).
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from lit_matmamba.deploy.common import WidthArg, run

from .engine import Engine
from .protocol import CompletionRequest, RequestError, parse_request

__all__ = ["CompletionRequest", "Engine", "RequestError", "main", "parse_request", "serve"]

_DTYPES = ("float32", "bfloat16", "float16", "float64")


def serve(
    ckpt_path: str | None = None,
    model: str | None = None,
    widths: list[WidthArg] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    max_tokens: int = 256,
    device: str | None = None,
    dtype: str | None = None,
    cuda_graphs: bool | None = None,
    seed: int = 0,
    name: str = "matmamba",
) -> None:
    """Serve a language model at every width it was trained at, from one copy of the weights,
    over an OpenAI-compatible completions API (LitServe).

    Endpoints: POST /v1/completions (OpenAI's completions API: prompt, max_tokens, temperature,
    top_p, stream, stream_options; plus top_k, and the width: `width`, an int, one int per layer,
    "D" or "D/k", or `latency_ms_per_token`, the widest served width whose decoding step measured at
    start-up fits the budget; default the widest; the response names the width used), GET
    /v1/models, GET /health (200 once the model is loaded). A malformed request gets a 400 with an
    OpenAI-style error naming the field; the others are not disturbed.

    One copy of the weights serves every width. Each width has a recurrent state for
    `max_batch_size` rows allocated at start-up and, on the GPU, its decoding step captured as a
    CUDA graph per batch bucket (powers of two up to max_batch_size). Requests of one width decode
    together; a request joins or leaves its width's batch between steps (continuous batching), and
    the widths take turns. The start-up table gives the milliseconds per token of each width.

    Args:
        ckpt_path: a training checkpoint (.ckpt).
        model: or a model directory (from `export`).
        widths: the widths to serve, each as `--width` of `generate` takes it, such as
            '[D, D/2, D/4, D/8]' or '[128, [128,64,64,32]]' (default: the trained granularities).
        host: the address to listen on (0.0.0.0: every interface).
        port: the port to listen on.
        max_batch_size: the most requests of one width decoding at once; more wait for a slot.
        max_tokens: the most new tokens a request may ask for.
        device: cpu, cuda, cuda:1, ... (default: cuda when there is a GPU).
        dtype: the weights' dtype: float32, bfloat16, float16 or float64 (default: bfloat16 on the
            GPU, float32 on the CPU). With bfloat16 or float16 the SSM state is kept in it too, as
            stock mamba-ssm does.
        cuda_graphs: replay CUDA graphs of the decoding steps (default: on the GPU).
        seed: seed of the sampler.
        name: the model's name in responses and /v1/models.
    """
    try:
        import litserve as ls

        from .server import MatMambaAPI
    except ModuleNotFoundError as err:
        raise ValueError(
            f"{err.name} is missing: install the serve extra (pip install 'lit-matmamba[serve]')"
        ) from None
    if (ckpt_path is None) == (model is None):
        raise ValueError("give either --ckpt_path (a training checkpoint) or --model (a model directory)")
    source = ckpt_path if ckpt_path is not None else model
    if not Path(source).exists():
        raise FileNotFoundError(f"{source} not found")
    if max_batch_size < 1 or max_tokens < 1:
        raise ValueError(
            f"max_batch_size and max_tokens must be at least 1, got {max_batch_size}, {max_tokens}"
        )
    dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device}")
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
    api = MatMambaAPI(source, widths, max_batch_size, max_tokens, dtype, cuda_graphs, seed, name)
    server = ls.LitServer(
        api,
        accelerator=dev.type,
        devices=1 if dev.type == "cpu" or dev.index is None else [dev.index],
        timeout=False,  # requests wait for a slot as long as it takes
    )
    # LitServe shuts its worker processes down on Ctrl+C; SIGTERM (a process manager, `kill`) does the same.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(host=host, port=port, generate_client_file=False)
    except RuntimeError as err:  # LitServe: the worker's setup failed (the reason is printed above)
        raise ValueError(f"the model could not be served: {err}") from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str], prog: str = "python main.py serve") -> None:
    run(serve, argv, prog)
