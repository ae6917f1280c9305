"""Deploy many models from one: commands that ship and choose sub-models of a trained nested model.

  export     a standalone model of one width (mamba-ssm's format for a language model of one
             width; the project's own for Mix'n'Match widths, custom heads and vision)
  generate   text from a language model at any width (greedy, or sampled)
  search     the per-layer widths with the best validation metric under a budget of parameters,
             FLOPs or measured latency, and the Pareto frontier around them
  lm_eval    lm-evaluation-harness with this package's model adapter registered as `matmamba`

Each is a `main.py` subcommand with `--help`; the functions behind them are importable. Every
command reads a training checkpoint or an exported directory through `lit_matmamba.io.load`.
"""
