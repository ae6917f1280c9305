"""How the row-wise norm kernels (add + RMSNorm, gated RMSNorm) cut (M, D) into tiles and programs.

A program holds a (BLOCK_M, BLOCK_N) tile: BLOCK_N is D (or a norm group) padded to a power of 2,
and short rows are batched into BLOCK_M rows so that a program keeps enough loads in flight. The
backward runs a few waves of programs that each walk a contiguous range of rows and sum their rows'
weight gradient, so that the partial sums reduced afterwards stay few.
"""

from __future__ import annotations

import math

import torch
import triton

# Backward programs per streaming multiprocessor.
_WAVES = 4


def num_warps(elements: int) -> int:
    """Warps for a tile: 8 up to 8192 elements (<= 32 per thread and array), 16 above (a row of
    16384, which the backward would otherwise spill)."""
    return min(max(elements // 256, 1), 8 if elements <= 8192 else 16)


def block_m(block_n: int, rows: int, tile: int) -> int:
    """Rows of a tile of about `tile` elements, no more than the rows there are (padded to a power of 2)."""
    return max(1, min(tile // block_n, triton.next_power_of_2(max(rows, 1))))


def backward_rows_per_program(
    rows: int, block_m: int, device: torch.device, programs_per_row: int = 1
) -> int:
    """Rows each backward program walks (a multiple of block_m): `_WAVES` programs per SM in all,
    `programs_per_row` of them side by side over a row (e.g. one per norm group)."""
    # Under TRITON_INTERPRET=1 (CPU): 4 programs, so that tests cover several tiles per program.
    slots = (
        _WAVES * torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 4
    )
    programs = max(1, math.ceil(slots / programs_per_row))
    return block_m * max(1, math.ceil(rows / (programs * block_m)))
