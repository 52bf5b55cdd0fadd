"""Fixtures of the engine tests: a tiny random Llama checkpoint and one float32 LLM over it per module."""
import pytest

from ferry import LLM
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_ckpt_dir):
    return make_checkpoint("llama", tmp_ckpt_dir)


@pytest.fixture(scope="module")
def llm(llama):
    return LLM(str(llama), dtype="float32", kv_cache_memory="4M")
