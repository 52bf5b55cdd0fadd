"""KV policies: the scheduler-side tiering bookkeeping, int8 storage, span retrieval, and whole engines under
continuous batching, chunked prefill, prefix caching and preemption (allocators back to empty)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.engine.options import engine_config
from ferry.errors import InvalidRequest
from ferry.kvcache.manager import KVCacheManager
from ferry.kvcache.policies import KV_POLICIES, KVShape, make_kv_policy
from ferry.kvcache.policies.base import resolve_budget
from ferry.plan import host_entry
from ferry.request import Request
from ferry.runner.kv import build_policy_kv
from ferry.runner.kv.int8 import Int8KV, quantize
from ferry.runner.kv.spans import SpansKV
from ferry.runner.kv.storage import BlockLayout
from tests.checkpoints import make_checkpoint, random_prompts
from tests.kv_engines import passkey_first_decode, run_greedy

SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype_bytes=2)


def spans(budget: float | None = None, sink: int = 4, window: int = 8, shape: KVShape = SHAPE):
    return make_kv_policy("spans", shape, budget=budget, sink_tokens=sink, window_tokens=window)


def req(rid: str, n: int) -> Request:
    return Request(rid, list(range(n)), SamplingParams(), 0.0)


# -- scheduler side ------------------------------------------------------------------------------

def test_spans_cold_blocks_leave_sinks_window_and_partial_block():
    p = spans(sink=4, window=8)  # 1 sink block, 2 window blocks of 4 tokens
    assert p.cold_blocks(num_computed_tokens=10, num_blocks=3) == range(1, 1)  # too short: nothing cold
    assert p.cold_blocks(num_computed_tokens=30, num_blocks=8) == range(1, 5)  # 7 full blocks: 0 sink, 5-6 window
    assert p.read_tokens(1000) == 1000 and spans(0.25).read_tokens(1000) == 250
    assert spans(0.01).read_tokens(1000) == 16  # never below the resident blocks (sink + window + partial)


@given(budget=st.sampled_from([None, 0.1, 0.25, 0.5, 1.0, 48.0, 300.0]),
       lengths=st.lists(st.integers(0, 3000), min_size=2))
def test_spans_default_window_is_a_quarter_of_the_budget_up_to_128_and_blocks_never_warm_up(budget, lengths):
    p = spans(budget, sink=4, window=None)
    ends = [p.cold_blocks(n, -(-n // 4)).stop for n in sorted(lengths)]
    assert ends == sorted(ends)  # a longer context never makes a cold block resident again
    n = max(lengths)
    assert p.window_blocks(n) == -(-max(1, min(128, resolve_budget(budget, n) // 4)) // 4)  # blocks of 4 tokens


def test_spans_default_window_leaves_short_contexts_something_to_retrieve():
    shape = KVShape(num_layers=2, num_kv_heads=2, head_dim=8, block_size=16, dtype_bytes=2)
    fixed, scaled = spans(0.25, 16, 128, shape), spans(0.25, 16, None, shape)
    assert fixed.top_k(512, fixed.sink_blocks + fixed.window_blocks(512) + 1) == 0  # the window eats the budget
    assert scaled.window_blocks(512) == 2 and scaled.top_k(512, 1 + 2 + 1) == 4  # 128 tokens: 64 resident + 4 spans
    assert scaled.window_blocks(2048) == scaled.window_blocks(4096) == fixed.window_blocks(4096) == 8  # 128 at most


def test_offload_moves_cold_blocks_to_host_and_frees_everything():
    kv = KVCacheManager(num_blocks=10, block_size=4, num_host_blocks=6, policy=spans())
    a = req("a", 30)
    table = list(kv.allocate_slots(a, 30))
    a.num_computed_tokens = 30
    kv.cache_full_blocks(a)
    kv.offload_cold(a)
    pairs = kv.take_offloads()
    assert [d for d, _ in pairs] == table[1:5] and kv.take_offloads() == []
    got = kv.block_table(a)
    assert got[0] == table[0] and got[5:] == table[5:] and all(b < 0 for b in got[1:5])
    assert [host_entry(b) for b in got[1:5]] == [h for _, h in pairs]
    assert kv.pool.num_used == 4 and kv.host.num_free == 2  # the budget now holds 6 free device blocks
    kv.free(a)
    assert kv.all_free


def test_offload_stops_when_host_is_full_and_swap_keeps_cold_spans_on_host():
    kv = KVCacheManager(num_blocks=10, block_size=4, num_host_blocks=10, policy=spans())
    a = req("a", 30)
    kv.allocate_slots(a, 30)
    a.num_computed_tokens = 30
    taken = kv.host.allocate(8)  # leave 2 host blocks: only cold blocks 1 and 2 can go
    kv.offload_cold(a)
    assert [b < 0 for b in kv.block_table(a)] == [False, True, True, False, False, False, False, False]
    kv.host.free(taken)
    assert kv.can_swap_out(a)
    out = kv.swap_out(a)  # the 6 device blocks go to host; the 2 offloaded ones stay where they are
    assert len(out) == 6 and len(a.swapped_block_ids) == 8 and kv.pool.num_used == 0
    pairs, table = kv.swap_in(a, 1)
    assert [b < 0 for b in table] == [False, True, True, True, True, False, False, False]  # cold: stay on host
    assert len(pairs) == 4 and kv.pool.num_used == 4
    kv.free(a)
    assert kv.all_free


def test_bad_kv_options_are_one_line_errors():
    for kw, msg in [({"kv_policy": "lossy"}, "kv_policy must be one of"),
                    ({"kv_policy": "int8", "kv_budget": 0.5}, "kv_budget does not apply to kv_policy=int8"),
                    ({"kv_policy": "spans", "kv_budget": 0}, "kv_budget must be > 0"),
                    ({"kv_policy": "spans", "kv_window_tokens": 0}, "kv_window_tokens")]:
        with pytest.raises(InvalidRequest, match=msg):
            engine_config("m", **kw)
    assert engine_config("m", kv_policy="spans", kv_budget="0.25").kv_options.budget == 0.25


# -- tensor side ---------------------------------------------------------------------------------

def test_int8_roundtrip_and_bytes():
    x = torch.randn(50, 2, 64) * torch.linspace(0.1, 10, 50)[:, None, None]
    q, s = quantize(x)
    err = (q.float() * s[..., None] - x).abs().amax(-1)
    assert bool((err <= s * 0.5 + 1e-6).all())  # at most half a step per element
    shape = KVShape(4, 2, 64, 16, 2)
    full, int8 = make_kv_policy("full", shape), make_kv_policy("int8", shape)
    assert 1.85 < full.device_bytes_per_block() / int8.device_bytes_per_block() < 1.9  # bf16: 128 vs 68 bytes/row
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_attention_heads": 2,
                                 "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 10})
    kv = Int8KV(int8, BlockLayout(cfg, 7, 0, 16, torch.float32, torch.device("cpu")))
    assert kv.nbytes == 7 * int8.device_bytes_per_block()  # the memory reported is the memory held


def test_spans_index_picks_the_span_holding_the_needle():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 10})
    shape = KVShape(1, 2, 16, 4, 4)
    kv = SpansKV(spans(0.5, shape=shape), BlockLayout(cfg, 12, 12, 4, torch.float32, torch.device("cpu")))
    kv.storage.kv.normal_()
    needle = torch.zeros(16)
    needle[3] = 8.0
    kv.storage.kv[0, 0, 6, 2, 1] = needle  # device block 6, slot 2, kv head 1
    kv.swap_out([(b, b) for b in range(12)])  # every block to host block of the same id, index written
    q = torch.zeros(4, 16)
    q[2:, 3] = 1.0  # query heads 2-3 (kv head 1) look for the needle direction
    picked = kv.layers[0].pick(q[None], torch.arange(12), 1, 0.25)
    assert picked.tolist() == [6]


# -- whole engines -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_ckpt_dir):
    return make_checkpoint("llama", tmp_ckpt_dir)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_spans_reading_everything_matches_full_under_batching_and_preemption(llama, mode):
    """With a budget of the whole context, spans reads every span (some from host) and must agree with full
    attention; a tight device budget forces chunked prefill, offloading, prefix hits and preemption."""
    vocab = ModelConfig.from_hf(llama).vocab_size
    prompts = random_prompts(6, [60, 90, 75, 100, 64, 80], vocab, seed=3)
    prompts[4] = prompts[1][:64]  # a prefix hit
    want, _ = run_greedy(llama, prompts, kv_cache_memory="1M")
    got, engine = run_greedy(llama, prompts, kv_cache_memory=engine_bytes(llama, 20), preemption_mode=mode,
                       kv_policy="spans", kv_budget=1.0, kv_sink_tokens=4, kv_window_tokens=8, swap_space="1M")
    assert got == want
    assert engine.kv.num_offloaded > 0 and engine.scheduler.num_preemptions > 0


def engine_bytes(path, num_blocks: int) -> int:
    cfg = ModelConfig.from_hf(path)
    shape = KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4, 4)
    p = spans(shape=shape)
    return num_blocks * p.device_bytes_per_block() + (1 << 20) // p.host_bytes_per_block() * p.index_bytes_per_host_block()


def test_int8_runs_under_preemption_and_stays_close(llama):
    vocab = ModelConfig.from_hf(llama).vocab_size
    prompts = random_prompts(5, [60, 90, 75, 100, 64], vocab, seed=5)
    want, _ = run_greedy(llama, prompts, kv_cache_memory="1M")
    got, engine = run_greedy(llama, prompts, kv_cache_memory="40K", kv_policy="int8", preemption_mode="swap")
    assert engine.scheduler.num_preemptions > 0
    same = sum(a[:3] == b[:3] for a, b in zip(got, want))
    assert same >= 4  # random weights: int8 K/V keeps the first greedy tokens of nearly every prompt


def test_spans_retrieves_the_passkey_span_on_ferry_tiny():
    """ferry-tiny at 1K tokens with a quarter of the context read per query: a span holding the passkey's digits
    (in either of its two mentions) is among those retrieved by most layers, and all the digits come out."""
    needle, first_step, correct = passkey_first_decode(kv_policy="spans", kv_budget=0.25)
    assert all(1 <= b < 1024 // 16 - 8 for b in needle)  # in cold spans, not resident ones
    assert sum(bool(needle & set(blocks)) for blocks in first_step) >= 2, (needle, first_step)
    assert correct  # every digit retrieved


def test_int8_decode_kernel_matches_torch_path():
    from ferry.runner.kv.int8 import Int8Layer
    from ferry.models.layers.attention import AttnMetadata
    from ferry.ops import paged_attention
    if not paged_attention.available():
        pytest.skip("no C++ toolchain here")
    torch.manual_seed(0)
    data = torch.randint(-127, 128, (2, 6, 4, 2, 16), dtype=torch.int8)
    scales = torch.rand(2, 6, 4, 2)
    layer = Int8Layer(data, scales)
    q = torch.randn(2, 4, 16)
    meta = AttnMetadata(positions=torch.tensor([9, 5]), slot_mapping=torch.tensor([9, 5]), block_size=4,
                        num_decodes=2, decode_block_tables=torch.tensor([[3, 1, 5], [0, 2, 0]]),
                        decode_ctx_lens=torch.tensor([10, 6]))
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)  # this step's (written to slots 9 and 5 both times)
    kernel = layer.attend(q, k, v, meta, 0.25, None)
    import ferry.runner.kv.int8 as mod
    real = mod.paged_decode_attention_available
    mod.paged_decode_attention_available = lambda: False
    try:
        meta._masks.clear()
        plain = layer.attend(q, k, v, meta, 0.25, None)
    finally:
        mod.paged_decode_attention_available = real
    torch.testing.assert_close(kernel, plain, atol=1e-4, rtol=1e-4)


FAST_TENSORS = {"full": lambda s: [s.storage.kv], "int8": lambda s: [s.data, s.scales],
                "spans": lambda s: [s.storage.kv, s.index]}


@pytest.mark.parametrize("policy", ["full", "int8", "spans"])
def test_reported_kv_memory_is_held_and_within_budget(llama, policy):
    with LLM(str(llama), dtype="float32", kv_cache_memory="1M", swap_space="1M", kv_policy=policy) as llm:
        stats = llm.engine.stats()
        held = sum(t.numel() * t.element_size() for t in FAST_TENSORS[policy](llm.engine.parts.storage))
        assert stats.kv_cache_bytes == held <= 1 << 20
        assert held > (1 << 20) - llm.engine.kv.policy.device_bytes_per_block()  # the budget is used, not wasted
        assert stats.kv_host_bytes <= 1 << 20


def test_admission_with_a_prefix_hit_counts_blocks_from_the_cached_prefix():
    """Regression: can_allocate was asked before num_computed_tokens moved to the cached prefix, so a prefix hit
    on a nearly full pool passed the check and then failed allocate_slots (a crash in the scheduler)."""
    from ferry.config import SchedulerConfig
    from ferry.scheduler.policies import FCFSPolicy
    from ferry.scheduler.scheduler import Scheduler
    kv = KVCacheManager(num_blocks=5, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, FCFSPolicy())
    a = req("a", 12)
    s.add(a)
    plan = s.schedule()
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a)  # 3 full blocks cached, held by a
    b = Request("b", list(range(8)) + [99] * 10, SamplingParams(), 0.0)  # 2-block hit, needs 3 more blocks, 2 are free
    s.add(b)
    plan = s.schedule()
    assert [r.req_id for r in plan.reqs] == ["a"] and b.num_computed_tokens == 0 and kv.block_table(b) == []


@pytest.mark.parametrize("policy", ["spans", "layer-budget"])
def test_a_request_with_its_own_kv_budget_reads_what_it_asks_for(llama, policy):
    """Under a server budget of 10%, requests asking for kv_budget=1.0 read everything and match full attention
    token for token, in the same batches as requests on the server's budget (which do not)."""
    vocab = ModelConfig.from_hf(llama).vocab_size
    prompts = random_prompts(6, [60, 90, 75, 100, 64, 80], vocab, seed=3)
    want, _ = run_greedy(llama, prompts, kv_cache_memory="1M")
    kw = {"swap_space": "1M"} if policy == "spans" else {}
    with LLM(str(llama), dtype="float32", max_num_batched_tokens=48, max_num_seqs=4, block_size=4, kv_policy=policy,
             kv_budget=0.1, kv_sink_tokens=4, kv_window_tokens=8, **kw) as llm:
        params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, kv_budget=1.0 if i % 2 else None)
                  for i in range(len(prompts))]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert llm.engine.kv.all_free
    got = [o.outputs[0].token_ids for o in outs]
    assert got[1::2] == want[1::2]
    assert got[0::2] != want[0::2]


def test_kv_budget_per_request_needs_a_policy_that_reads_it(llama):
    with pytest.raises(InvalidRequest, match="kv_budget must be > 0"):
        SamplingParams(kv_budget=0)
    with LLM(str(llama), dtype="float32", kv_policy="int8") as llm:
        with pytest.raises(InvalidRequest,
                           match="kv_budget applies to servers run with --kv-policy spans, shadow, layer-budget"):
            llm.generate(["hello"], SamplingParams(kv_budget=0.5), use_tqdm=False)
        assert llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("name", list(KV_POLICIES))
def test_every_policy_exports_and_imports_a_requests_blocks_exactly(name):
    """Migration: a request's blocks, exported to plain CPU tensors and imported into other blocks (of another
    engine's storage), hold exactly what they held, in every declared tensor; the bytes allocated are the declared
    bytes per block."""
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 10})
    policy = make_kv_policy(name, KVShape(4, 2, 16, 4, 4))
    src, dst = (build_policy_kv(policy, BlockLayout(cfg, 8, 3, 4, torch.float32, torch.device("cpu")))
                for _ in range(2))
    for kv in (src, dst):
        assert kv.nbytes == 8 * policy.device_bytes_per_block() + 3 * policy.index_bytes_per_host_block()
        assert kv.host_nbytes == 3 * policy.host_bytes_per_block()
    for t in src.blocks.device.values():
        t.copy_((torch.rand(t.shape) * 100).to(t.dtype))
    data = src.export_blocks([5, 1, 6])
    assert all(t.device.type == "cpu" for t in data.values())
    dst.import_blocks([0, 7, 2], data)
    for name_, t in dst.blocks.device.items():
        dim = len(src.blocks.specs[name_].lead)
        want = src.blocks.device[name_].index_select(dim, torch.tensor([5, 1, 6]))
        assert torch.equal(t.index_select(dim, torch.tensor([0, 7, 2])), want), name_
    assert all(torch.equal(a, b) for a, b in zip(dst.export_blocks([0, 7, 2]).values(), data.values()))


def test_every_registered_policy_has_a_tensor_half_and_flags_for_its_options():
    """Adding a policy is its two halves (each registered beside its class): the engine options and the factory
    find it through the registries."""
    from ferry.engine.options import ENGINE_OPTIONS
    from ferry.runner.kv import POLICY_KV
    flags = {o.name for o in ENGINE_OPTIONS}
    shape = KVShape(4, 2, 16, 4, 4)
    for name, cls in KV_POLICIES.items():
        assert make_kv_policy(name, shape).tensor_family in POLICY_KV, name
        assert {f"kv_{f.name}" for f in dataclasses.fields(cls.Options)} <= flags, name
    assert next(o for o in ENGINE_OPTIONS if o.name == "kv_policy").choices == tuple(KV_POLICIES)


def test_the_plan_carries_the_host_spans_a_request_reads():
    """spans decides, per scheduled request, how many host spans its queries read (the tensor side never asks)."""
    p = spans(budget=0.5)  # sinks 1 block, window 2 blocks (block size 4)
    table = [0, host_entry(0), host_entry(1), host_entry(2), host_entry(3), 5, 6, 7]  # 32 tokens, 4 blocks cold
    assert p.plan_step(31, 1, table).num_host_reads == p.top_k(32, 4)  # a decode: budget minus resident blocks
    assert p.plan_step(24, 8, table).num_host_reads == p.top_k(32, p.sink_blocks + p.window_blocks(32) + 1)
    assert p.plan_step(31, 1, list(range(8))).num_host_reads == 0  # nothing cold: read everything
    assert p.for_budget(1.0).plan_step(31, 1, table).num_host_reads == 4  # a request's own budget: all of it
