"""lit-matmamba: nested (Matryoshka) Mamba2 models in plain PyTorch, trained with Lightning."""

from .models import MatMambaConfig, MatMambaLM, MatMambaVision

__version__ = "0.1.0"
__all__ = ["MatMambaConfig", "MatMambaLM", "MatMambaVision"]
