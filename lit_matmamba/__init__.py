"""lit-matmamba: nested (Matryoshka) Mamba2 models in plain PyTorch, trained with Lightning."""

__version__ = "0.1.0"
