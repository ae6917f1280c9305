"""Ops of the nested Mamba2 model, each a Triton kernel beside a pure-PyTorch reference.

Installed as `lit_matmamba.kernels` (see pyproject.toml): a top-level package named `kernels`
would shadow the PyPI distribution of that name. Importing this package needs neither Triton
nor CUDA: kernels are imported only when a backend picks them.
"""

from .add_rmsnorm import add_rmsnorm
from .backend import BACKENDS, use_triton
from .causal_conv1d import causal_conv1d, causal_conv1d_step
from .cross_entropy import cross_entropy
from .gated_rmsnorm import gated_rmsnorm
from .mamba_ssm_compat import pin_ssd_configs
from .ssd import ssd_gated_rmsnorm, ssd_scan, ssd_step

__all__ = [
    "BACKENDS",
    "add_rmsnorm",
    "causal_conv1d",
    "causal_conv1d_step",
    "cross_entropy",
    "gated_rmsnorm",
    "pin_ssd_configs",
    "ssd_gated_rmsnorm",
    "ssd_scan",
    "ssd_step",
    "use_triton",
]
