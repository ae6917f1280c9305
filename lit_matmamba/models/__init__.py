"""Plain-PyTorch MatMamba models: no Lightning here, so they run anywhere (a notebook, a server)."""

from .backbone import Block, InferenceCache, MatMambaStack, NestedModel
from .config import PRESETS, MatMambaConfig, Width
from .lm import MatMambaLM
from .mixer import MatMambaMixer, MixerState
from .nested_linear import direct_weight_grads, nested_linear
from .vision import ClassifierHead, MatMambaVision

__all__ = [
    "PRESETS",
    "Block",
    "ClassifierHead",
    "InferenceCache",
    "MatMambaConfig",
    "MatMambaLM",
    "MatMambaMixer",
    "MatMambaStack",
    "MatMambaVision",
    "MixerState",
    "NestedModel",
    "direct_weight_grads",
    "nested_linear",
    "Width",
]
