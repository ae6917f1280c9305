"""Warps and pipeline stages for mamba-ssm's SSD kernels, measured per GPU model at the language
presets' autotuning keys (chunk 128, state size 128, head dims 24 and 64, bf16 autocast); keyed by
`torch.cuda.get_device_name()` and applied by `pin_ssd_configs("auto")`.

Why: mamba-ssm's autotuning lists offer these kernels few warps x stages combinations, mostly 4 or 5
stages; at the presets' keys fewer stages are faster. The tune benchmark (`lit_matmamba.bench.tune`)
times every warps x stages combination (2, 4, 8 x 1, 2, 3, 4) of the block sizes mamba-ssm's
autotuner chooses, and a configuration is listed only where it beats that choice by more than 3%.
The block sizes stay mamba-ssm's, so the tiles and the arithmetic are the same; warps and stages set
how a tile is spread over threads and how far its loads run ahead.

"NVIDIA H200": tuned at the full width of lm-130m (batch 16) and lm-1.4b (batch 8). With these pins
the graphed joint step is about 3.5% faster at lm-130m and 1 to 2% faster at lm-1.4b than with
mamba-ssm's own choices (docs/performance.md). `tests/test_ssd_configs.py` checks on a GPU that
the pinned configurations give mamba-ssm's own results at every width.

Keys hold the autotuner's key values followed by the dtypes of the kernel's tensor arguments.
"""

from __future__ import annotations

# The dtypes of each kernel's tensor arguments under bf16 autocast: the end of its autotuning key.
_DX_DTYPES = [
    "torch.bfloat16",
    "torch.float32",
    "torch.bfloat16",
    "torch.float32",
    "torch.float32",
    "torch.float32",
    "torch.bfloat16",
    "torch.bfloat16",
    "torch.bfloat16",
    "torch.float32",
    "torch.float32",
]
_SCAN_FWD_DTYPES = [
    "torch.float32",
    "torch.bfloat16",
    "torch.bfloat16",
    "torch.float32",
    "torch.float32",
    "torch.bfloat16",
    "torch.float32",
    "torch.float32",
]
_STATE_FWD_DTYPES = ["torch.bfloat16", "torch.bfloat16", "torch.float32", "torch.float32", "torch.float32"]


def _pin(key: list, dtypes: list[str], block_sizes: dict[str, int], num_warps: int, num_stages: int) -> dict:
    return dict(key=[*key, *dtypes], kwargs=block_sizes, num_warps=num_warps, num_stages=num_stages)


# Keys: (chunk size, head dim, state size) for dx; the same and IS_CAUSAL for the chunk scan;
# (head dim, state size, chunk size) for the chunk state.
TABLES: dict[str, dict[str, list[dict]]] = {
    "NVIDIA H200": {
        "_chunk_scan_chunk_state_bwd_dx_kernel": [
            _pin(
                [128, 24, 128], _DX_DTYPES, {"BLOCK_SIZE_K": 32, "BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32}, 2, 1
            ),
            _pin(
                [128, 64, 128], _DX_DTYPES, {"BLOCK_SIZE_K": 32, "BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64}, 2, 3
            ),
        ],
        "_chunk_scan_fwd_kernel": [
            _pin(
                [128, 24, 128, True],
                _SCAN_FWD_DTYPES,
                {"BLOCK_SIZE_K": 32, "BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32},
                4,
                3,
            ),
            _pin(
                [128, 64, 128, True],
                _SCAN_FWD_DTYPES,
                {"BLOCK_SIZE_K": 32, "BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64},
                4,
                1,
            ),
        ],
        "_chunk_state_fwd_kernel": [
            _pin(
                [24, 128, 128],
                _STATE_FWD_DTYPES,
                {"BLOCK_SIZE_K": 32, "BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64},
                2,
                1,
            ),
        ],
    },
}
