"""Warps and pipeline stages for mamba-ssm's SSD kernels, measured per GPU model at the language
presets' autotuning keys (chunk 128, state size 128, head dims 24 and 64, bf16 autocast), applied by
`mamba_ssm_compat.use_tuned_configs` the first time the fused mixer core runs on such a GPU.

Why: mamba-ssm's autotuning lists offer these kernels few warps x stages combinations, mostly 4 or 5
stages; at the presets' keys fewer stages were faster. `scripts/gpu_ssd_tune.py` times every warps x
stages combination (2, 4, 8 x 1, 2, 3, 4) of the block sizes mamba-ssm's autotuner chose, and a
configuration is listed only where it beat that choice by more than 3%. The block sizes stay
mamba-ssm's, so the tiles and the arithmetic are the same; warps and stages set how a tile is spread
over threads and how far its loads run ahead.

"NVIDIA H200": seventh run (BENCHMARKS.md), call 2: `gpu_ssd_tune.py --widths full` with
`--preset lm-130m --batch 16` and `--preset lm-1.4b --batch 8`. The graphed joint step with these
pinned against without, alone: lm-130m 187.4 and 187.3 ms against 194.2 ms; lm-1.4b 415.5 against
425.1 ms. In the full benchmark (call 3 against calls 1 and 2): lm-1.4b 407.3 against 412.3 ms,
lm-130m 187.5 against 194.4 ms. Checked against mamba-ssm's own configurations at each width by
`test_tuned_ssd_configs_match_mamba_ssms_own` (tests/test_gpu_path.py).

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
