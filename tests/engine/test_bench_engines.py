"""bench/engines: ferry and transformers in their own worker processes, the float32 parity gate of the suite."""
from __future__ import annotations

import pytest

from bench import models
from bench.engines import start
from bench.engines.worker import WorkerError
from bench.parity import check


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.build("tiny-qwen2", root=tmp_path_factory.mktemp("bench"))


def test_parity_gate_passes_for_ferry_and_transformers(tiny):
    r = check(tiny, ["ferry", "transformers"], threads=1, num_prompts=2, max_tokens=6)
    assert r["ok"], r
    assert r["engines"]["transformers"]["exact"]


def test_worker_ops_and_errors(tiny):
    with start("ferry", tiny, "float32", 1, kv_cache_memory="64M") as w:
        g = w.call("generate", prompts=[[5, 6, 7], [8, 9]], max_tokens=[3, 5])
        assert g["output_tokens"] == 8 and g["seconds"] > 0
        assert w.call("decode", prompt=list(range(3, 19)), max_tokens=4)["tok_s"] > 0
        assert w.call("memory")["hwm_bytes"] > 0
        with pytest.raises(WorkerError):  # an error in the engine is reported, and the worker keeps going
            w.call("generate", prompts=[[5]], max_tokens=[])
        assert w.call("prefill", prompt=[5] * 20)["tok_s"] > 0
