"""What the GPU benchmarks share: timing, the matmul ceiling, building models and batches, results."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lit_matmamba.models import MatMambaConfig, MatMambaLM

# Dense bf16 datasheet peak of the H100 and H200 SXM (MFU is also reported against the measured
# matmul ceiling).
PEAK_FLOPS = 989e12


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("this benchmark needs a CUDA GPU (none is visible to torch)")


def time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of `fn()` over `reps` calls, timed with CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def matmul_ceiling() -> float:
    """FLOP/s of a large bf16 matrix product on this GPU, the practical ceiling for MFU."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (time_ms(lambda: a @ b, reps=20) / 1e3)


def build_lm(preset: str, chunk_size: int | None = None, seed: int = 0) -> MatMambaLM:
    """A seeded `MatMambaLM` of `preset`, initialised on the GPU (a 1.4B model takes minutes on the
    host)."""
    torch.manual_seed(seed)
    overrides = {} if chunk_size is None else dict(chunk_size=chunk_size)
    with torch.device("cuda"):
        return MatMambaLM(MatMambaConfig.from_name(preset, **overrides))


def random_ids(model: MatMambaLM, batch: int, seq: int) -> torch.Tensor:
    """Token ids (batch, seq + 1): `seq` predictions per sequence, as the training data gives."""
    return torch.randint(0, model.config.vocab_size, (batch, seq + 1), device="cuda")


def write_results(out: str | None, results: dict[str, Any]) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        print(f"wrote {out}", flush=True)


class _Expand(float):
    """mamba-ssm 2.3.2 computes d_inner = (expand * d_model) // world_size, a float for a float
    expand, and fails to build layers with expand < 1; this expand multiplies to whole ints."""

    def __mul__(self, other):
        product = float(self) * other
        return int(product) if float(product).is_integer() else product

    __rmul__ = __mul__


def stock_lm(config: MatMambaConfig, width: int) -> torch.nn.Module:
    """Stock mamba-ssm's `MambaLMHeadModel` with Mamba2 layers, standalone at `width` (its inner
    width is `expand * width`), on the GPU: the baseline a nested sub-model is compared with."""
    # Import mamba-ssm through the project's shim (which skips the package __init__). The stock
    # LM module still imports the Mamba-1 scan interface, which imports its CUDA extension; a
    # MAMBA_SKIP_CUDA_BUILD install lacks it and the Mamba2 LM never calls it: an empty stand-in.
    from lit_matmamba.kernels.mamba_ssm_compat import get_mamba_chunk_scan_combined

    get_mamba_chunk_scan_combined()
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    cfg = MambaConfig(
        d_model=config.d_model,
        n_layer=config.n_layer,
        vocab_size=config.vocab_size,
        d_intermediate=0,
        ssm_cfg=dict(
            layer="Mamba2",
            expand=_Expand(config.expand * width / config.d_model),
            headdim=config.headdim,
            chunk_size=config.chunk_size,
            use_mem_eff_path=False,
        ),
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=config.pad_vocab_size_multiple,
    )
    return MambaLMHeadModel(cfg, device="cuda")
