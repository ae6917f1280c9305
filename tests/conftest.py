"""Shared test setup.

Without a GPU the Triton kernels run under the Triton interpreter. Triton reads TRITON_INTERPRET
when it is first imported, and importing Lightning (tests/test_cli.py) can import it early, so the
variable is set here, before any test module is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel forgets to write then fails the
    comparison with the reference instead of passing as plausible garbage. Kernel modules allocate
    through `backend.empty_output`, looked up on the module at each call, so one patch reaches all."""
    from lit_matmamba.kernels import backend

    def empty_nan(shape, like, dtype):
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)

    monkeypatch.setattr(backend, "empty_output", empty_nan)


def fit_one_step(module, datamodule, path):
    """Train `module` one optimizer step on the CPU on `datamodule` (no validation, logging or
    automatic checkpoints), then save the checkpoint at `path`; returns `path`. A plain function
    (`from conftest import fit_one_step`), shared by the tests of the commands that read checkpoints."""
    import lightning as L

    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=path.parent,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(path)
    return path
