"""GPU benchmarks, each an importable function and a subcommand of `python main.py bench`:

  speed    stock mamba-ssm against the nested model at every granularity, and the joint step
  decode   tokens/s of graphed decoding at every granularity against stock mamba-ssm's generate
  memory   peak memory of the joint step against the widest width's own training step
  profile  a kernel table of one joint step (or one inference forward)
  kernels  every Triton kernel against its PyTorch reference on the GPU: errors and timings
  tune     warps and stages of mamba-ssm's SSD kernels at a preset's calls -> a table to pin

Each needs a CUDA GPU; `scripts/install_gpu.sh` sets a GPU machine up. docs/performance.md holds
the current figures, each with the command that produced it.
"""

from __future__ import annotations


def main(argv: list[str], prog: str = "python main.py bench") -> None:
    """`python main.py bench {speed,decode,memory,profile,kernels,tune} [--help] ...`."""
    import argparse

    import torch
    from jsonargparse import CLI, DefaultHelpFormatter

    from .decode import decode
    from .kernels import kernels
    from .memory import memory
    from .profile import profile
    from .speed import speed
    from .tune import tune

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the command list above as written."""

    if not torch.cuda.is_available() and not {"-h", "--help", "--print_config"} & set(argv):
        raise SystemExit(f"{prog}: every benchmark runs on a CUDA GPU, and torch sees none here")
    CLI(
        [speed, decode, memory, profile, kernels, tune],
        args=argv,
        prog=prog,
        description=__doc__,
        formatter_class=Formatter,
    )
