"""Lightning training of nested models: the modules, callbacks, optimizer defaults, parallelism."""

from lit_matmamba.io import load_model

from .callbacks import GranularityCharts, MixNMatchCurve, ModelCheckpoint, PredictionWriter, ThroughputMonitor
from .module import ImageClassification, LanguageModeling, NestedModule, TokenClassification
from .optim import WarmupCosine, adamw, param_groups

__all__ = [
    "GranularityCharts",
    "ImageClassification",
    "LanguageModeling",
    "MixNMatchCurve",
    "ModelCheckpoint",
    "NestedModule",
    "PredictionWriter",
    "ThroughputMonitor",
    "TokenClassification",
    "WarmupCosine",
    "adamw",
    "load_model",
    "param_groups",
]
