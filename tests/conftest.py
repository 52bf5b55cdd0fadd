"""Shared pytest fixtures.

- tmp_ckpt_dir: a session-scoped temporary folder for tiny checkpoints (tests/checkpoints.make_checkpoint).
- shared_models: <repo>/../shared/models (real small checkpoints); the test is skipped when it is missing.
"""
from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_MODELS = (REPO_ROOT / ".." / "shared" / "models").resolve()

# Never reach the Hugging Face hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tmp_ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A session-scoped folder to build tiny checkpoints into (make_checkpoint(family, tmp_ckpt_dir))."""
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def shared_models() -> pathlib.Path:
    """<repo>/../shared/models, or skip the test when that folder does not exist."""
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"shared models folder not found: {SHARED_MODELS}")
    return SHARED_MODELS


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; two threads on a loaded 2-core machine spin against each other."""
    import torch

    torch.set_num_threads(1)
