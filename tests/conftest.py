"""Shared pytest fixtures.

- tmp_ckpt_dir: a session-scoped temporary folder for tiny checkpoints (tests/checkpoints.make_checkpoint).
- real_models: tests/assets/ (real trained checkpoints shipped with the repo: stories260K, the Llama 2 tokenizer;
  provenance and licences in tests/assets/README.md).
"""
from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
REAL_MODELS = REPO_ROOT / "tests" / "assets"

# Never reach the Hugging Face hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tmp_ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A session-scoped folder to build tiny checkpoints into (make_checkpoint(family, tmp_ckpt_dir))."""
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def real_models() -> pathlib.Path:
    """tests/assets/: the real checkpoints ship with the repo, so a fresh clone runs these checks (never a skip)."""
    return REAL_MODELS


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; two threads on a loaded 2-core machine spin against each other."""
    import torch

    torch.set_num_threads(1)
