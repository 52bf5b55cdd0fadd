"""Every instruction-set path of every kernel, on this machine: each level the CPU has (the lower ones forced with
FERRY_ISA) gives the portable path's results within float tolerance (fused: bit for bit), gemv is batch-invariant
on every path, and greedy decoding stays token-exact against transformers at float32 under each forced level."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from ferry.ops import cpu, fused, gemv, paged_attention
from ferry.ops.cpu import Isa
from tests.unit.test_ops import _check, _data
from tests.unit.test_ops_isa import _fused_outputs, forced_isa

pytestmark = pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None,
                                reason="no C++ compiler or ninja: no kernel can be built")

LEVELS = [level for level in Isa if level <= cpu.detected()]  # every path this CPU can run
DTYPES = [torch.float32, torch.bfloat16]
# (K, N): K below, at and off the vector widths (8, 16, 32 lanes: tails), N off every row-block size.
SHAPES = [(1, 1), (7, 3), (33, 17), (100, 13), (257, 29), (896, 67)]


def _gemv_outputs(dtype: torch.dtype) -> list[torch.Tensor]:
    out = []
    for k, n in SHAPES:
        x, w, b = _data(16, k, n, dtype, bias=n % 2 == 1)
        for m in range(1, 17):
            y = gemv.KERNEL.ext().linear_small_m(x[:m], w, b)
            _check(y, x[:m], w, b)
            out.append(y)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_gemv_every_path_gives_the_portable_paths_results(dtype):
    results = {}
    for level in LEVELS:
        with forced_isa(level.label):
            assert gemv.available() and gemv.KERNEL.ext().isa_level() == int(level), gemv.unavailable_reason()
            results[level] = _gemv_outputs(dtype)
    for level in LEVELS[1:]:
        for got, want in zip(results[level], results[Isa.PORTABLE]):
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            else:  # one bf16 rounding of the output each: neighbours at most
                torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2**-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_gemv_row_results_do_not_depend_on_the_batch(dtype):
    """Row i of linear(x[:m]) is bit-identical to linear(x[i:i+1]) for every m <= MAX_M on every path (speculative
    decoding's verify step must give what single decode steps give)."""
    rows = gemv.MAX_M[dtype]
    for level in LEVELS:
        with forced_isa(level.label):
            for k, n in [(33, 17), (896, 67), (896, 1000)]:  # the last one: N above one row block per thread
                x, w, b = _data(rows, k, n, dtype, bias=True)
                alone = [gemv.linear(x[i:i + 1], w, b) for i in range(rows)]
                calls = gemv.kernel_calls()
                for m in range(1, gemv.MAX_M[dtype] + 1):
                    y = gemv.linear(x[:m], w, b)
                    for i in range(m):
                        assert torch.equal(y[i], alone[i][0]), (level.label, k, n, m, i)
                assert gemv.kernel_calls() == calls + gemv.MAX_M[dtype]  # the kernel ran, not F.linear


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_every_path_is_bit_identical_to_the_portable_one(dtype, monkeypatch):
    results = {}
    for level in LEVELS:
        with forced_isa(level.label):
            assert fused.available() and fused.KERNEL.loaded().__name__.endswith(f"_{level.label}")
            results[level] = _fused_outputs(dtype)
    for level, got in results.items():  # built with -ffp-contract=off: the vector width changes no bit
        for a, b in zip(got, results[Isa.PORTABLE]):
            assert torch.equal(a, b), level.label
    monkeypatch.setattr(fused, "_usable", lambda t: False)  # the torch sequence each kernel replaces
    for a, b in zip(results[Isa.PORTABLE], _fused_outputs(dtype)):  # float32 RMSNorm sums squares in another order
        tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
        torch.testing.assert_close(a.float(), b.float(), **tol)


def _attention_outputs(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    B, H, K, Dh, bs, nb = 4, 12, 3, 36, 4, 40  # Dh off the vector widths
    k_cache, v_cache = (torch.randn(nb, bs, K, Dh, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor([1, 9, 23, 36])
    tables = torch.randperm(nb, generator=g)[:B * 9].view(B, 9)
    q = torch.randn(B, H, Dh, generator=g)
    outs = [paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, window, 0.2)
            for window in (None, 10)]
    depth = torch.randint(0, 4, (nb, bs), generator=g, dtype=torch.uint8)
    depth.view(-1)[tables[torch.arange(B), (lens - 1) // bs] * bs + (lens - 1) % bs] = 3  # each query sees itself
    outs += paged_attention.paged_decode_attention_depth(q, k_cache, v_cache, tables, lens, depth, 1, None, 0.2, True)
    k8, v8 = (torch.randint(-127, 128, (nb, bs, K, Dh), generator=g, dtype=torch.int8) for _ in range(2))
    k_scale, v_scale = (torch.rand(nb, bs, K, generator=g) / 64 for _ in range(2))
    outs.append(paged_attention.paged_decode_attention_int8(q, k8, v8, k_scale, v_scale, tables, lens, None, 0.2))
    return outs


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_paged_attention_every_path_gives_the_torch_results(dtype, monkeypatch):
    results = {}
    for level in LEVELS:
        with forced_isa(level.label):
            assert paged_attention.KERNEL.ext().__name__.endswith(f"_{level.label}")
            results[level] = _attention_outputs(dtype)
    monkeypatch.setattr(paged_attention, "_native", lambda q: None)
    want = _attention_outputs(dtype)
    for level, got in results.items():
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=5e-6, rtol=1e-5, msg=lambda m: f"{level.label}: {m}")


_GREEDY_UNDER_LEVEL = """
import sys
from ferry import LLM, SamplingParams
from ferry.ops import cpu, gemv
from ferry.config import ModelConfig
from tests.checkpoints import hf_greedy, random_prompts
path, want_level = sys.argv[1], sys.argv[2]
assert cpu.isa().label == want_level, cpu.describe()
prompts = random_prompts(3, [1, 9, 30], ModelConfig.from_hf(path).vocab_size, seed=7)
want = hf_greedy(path, prompts, 6)[0]
llm = LLM(path, dtype="float32", kv_cache_memory="8M")
outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
got = [list(o.outputs[0].token_ids) for o in outs]
assert got == want, (got, want)
assert gemv.kernel_calls() > 0, "decode never ran the gemv kernel"
print("ok", cpu.describe())
"""


@pytest.mark.parametrize("level", [lv for lv in (Isa.PORTABLE, Isa.AVX2) if lv < cpu.detected()],
                         ids=lambda lv: lv.label)
def test_greedy_matches_transformers_at_float32_under_a_forced_level(level, tmp_ckpt_dir):
    """One short greedy comparison per forced lower path, in a subprocess (the level is read once per process);
    the whole model suite runs under FERRY_ISA=avx2 / portable too (see the report of issue 19)."""
    from tests.checkpoints import make_checkpoint

    path = make_checkpoint("llama", tmp_ckpt_dir)
    env = {**os.environ, cpu.ENV: level.label}
    run = subprocess.run([sys.executable, "-c", _GREEDY_UNDER_LEVEL, str(path), level.label], env=env,
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")
