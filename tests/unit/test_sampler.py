"""Unit tests of ferry.sampling: known answers, seeded determinism, statistics. Pure CPU, fast."""
from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.plan import ScheduledReq
from ferry.request import SamplingParams
from ferry.sampling import Sampler
from ferry.sampling.penalties import apply_penalties
from ferry.sampling.primitives import apply_top_k_top_p, fast_argmax, fast_topk, inverse_cdf_sample
from ferry.sampling.sampler import mix_seed

EOS = 2
NEG_INF = float("-inf")


def sreq(req_id: str = "r0", prompt=(5, 6, 7), output=(), seed_offset: int = 0, **params) -> ScheduledReq:
    params.setdefault("max_tokens", 1000)
    prompt, output = list(prompt), list(output)
    all_ids = prompt + output
    return ScheduledReq(
        req_id=req_id,
        token_ids=all_ids[-1:],
        start_pos=len(all_ids) - 1,
        block_ids=[0],
        sample=True,
        params=SamplingParams(**params),
        all_token_ids=all_ids,
        num_prompt_tokens=len(prompt),
        seed_offset=seed_offset,
    )


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of observed counts against expected probabilities (> 0)."""
    n = counts.sum().item()
    expected = probs.double() * n
    return float(((counts.double() - expected) ** 2 / expected).sum())


# chi-square critical values at p = 1e-6 (a correct sampler fails such a test once in a million runs)
CHI2_CRIT = {1: 23.93, 2: 27.63, 3: 30.66}


def empirical(sampler: Sampler, logits_row: torch.Tensor, n: int, **params) -> torch.Tensor:
    """Counts of the tokens drawn for n identical unseeded rows (in chunks)."""
    V = logits_row.numel()
    counts = torch.zeros(V, dtype=torch.long)
    chunk = 5000
    done = 0
    while done < n:
        b = min(chunk, n - done)
        reqs = [sreq(f"s{i}", **params) for i in range(b)]
        tokens, _ = sampler(logits_row.expand(b, V).contiguous(), reqs)
        counts += torch.bincount(torch.tensor(tokens), minlength=V)
        done += b
    return counts


# --- greedy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [7, 1000, 4096, 32000, 50257])
def test_greedy_is_argmax(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=g)
    logits[3, [10 % vocab, 5 % vocab]] = 100.0  # a tie: the first index wins, as torch.argmax
    logits[4, vocab - 1] = 50.0  # the max in the last (possibly partial) block
    reqs = [sreq(f"r{i}", temperature=0.0) for i in range(9)]
    tokens, lps = Sampler([EOS], seed=0)(logits, reqs)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert tokens[3] == min(10 % vocab, 5 % vocab)
    assert tokens[4] == vocab - 1
    assert lps == [None] * 9


def test_input_logits_are_not_modified():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    reqs = [
        sreq("a", temperature=0.0, repetition_penalty=1.5, min_tokens=3),
        sreq("b", temperature=0.8, top_k=5, top_p=0.9, min_p=0.1, seed=3),
        sreq("c", temperature=1.0, presence_penalty=1.0, output=[1, 2]),
        sreq("d", temperature=0.0, logprobs=3),
        sreq("e", temperature=2.0),
        sreq("f", temperature=1.0, top_p=0.5),
    ]
    Sampler([EOS], seed=0)(logits, reqs)
    assert torch.equal(logits, before)


def test_empty_batch_and_bad_shapes():
    s = Sampler([EOS])
    assert s(torch.zeros(0, 10), []) == ([], [])
    with pytest.raises(ValueError):
        s(torch.zeros(2, 10), [sreq()])


def test_half_precision_logits_are_accepted():
    logits = torch.randn(3, 100).to(torch.bfloat16)
    tokens, _ = Sampler([EOS])(logits, [sreq(f"r{i}", temperature=0.0) for i in range(3)])
    assert tokens == logits.float().argmax(-1).tolist()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    vocab=st.sampled_from([1, 3, 127, 128, 129, 512, 640, 1000, 4096, 5000]),
    levels=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_fast_argmax_and_topk_match_torch(rows, vocab, levels, seed):
    g = torch.Generator().manual_seed(seed)
    # few distinct values -> many ties; -inf entries too
    x = torch.randint(0, levels, (rows, vocab), generator=g).float()
    x[torch.rand(rows, vocab, generator=g) < 0.1] = NEG_INF
    assert torch.equal(fast_argmax(x), x.argmax(dim=-1))
    x = torch.randn(rows, vocab, generator=g)
    assert torch.equal(fast_argmax(x), x.argmax(dim=-1))
    for k in {1, min(5, vocab), min(20, vocab)}:
        values, indices = fast_topk(x, k)
        ref_values, ref_indices = torch.topk(x, k, dim=-1)
        assert torch.equal(values, ref_values)
        assert torch.equal(indices, ref_indices)  # distinct values: the same indices too


# --- top_k / top_p / min_p ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 3.0, 100.0])
def test_top_k_1_equals_greedy(temperature):
    logits = torch.randn(16, 5000, generator=torch.Generator().manual_seed(7))
    s = Sampler([EOS], seed=1)
    for step in range(5):
        reqs = [sreq(f"r{i}", temperature=temperature, top_k=1, seed=i if i % 2 else None) for i in range(16)]
        tokens, _ = s(logits, reqs)
        assert tokens == logits.argmax(-1).tolist()


def test_top_p_tiny_keeps_only_the_top_token():
    logits = torch.randn(16, 5000, generator=torch.Generator().manual_seed(8))
    s = Sampler([EOS], seed=2)
    for _ in range(5):
        tokens, _ = s(logits, [sreq(f"r{i}", temperature=5.0, top_p=1e-6) for i in range(16)])
        assert tokens == logits.argmax(-1).tolist()


PROBS4 = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS4 = PROBS4.log()


@pytest.mark.parametrize(
    "params, expected",
    [
        (dict(top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
        (dict(top_k=3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        (dict(top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # 0.5 < 0.7: one more; 0.8 >= 0.7: stop
        (dict(top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        (dict(top_p=0.4), [1, 0, 0, 0]),
        (dict(min_p=0.2), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),  # keep p >= 0.1
        (dict(min_p=0.35), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # keep p >= 0.175
        (dict(min_p=0.9), [1, 0, 0, 0]),
        (dict(top_k=3, top_p=0.8), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # top_p of the top-3 mass: 0.76
        (dict(top_k=3, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),  # 0.8/0.95 < 0.9
        (dict(top_k=3, min_p=0.35), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
    ],
)
def test_truncation_distributions(params, expected):
    """Empirical frequencies of top_k / top_p / min_p over a 4-token vocab match the renormalized
    kept probabilities; removed tokens never appear."""
    expected = torch.tensor(expected, dtype=torch.float64)
    counts = empirical(Sampler([EOS], seed=11), LOGITS4, 20000, **params)
    assert (counts[expected == 0] == 0).all(), counts
    kept = expected > 0
    if int(kept.sum()) > 1:
        stat = chi_square(counts[kept], expected[kept])
        assert stat < CHI2_CRIT[int(kept.sum()) - 1], (counts, expected)


def vllm_top_k_top_p_reference(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """vLLM's sort-based top_k / top_p mask, in float64: True where the token is kept."""
    x = logits.double()
    srt, order = x.sort(dim=-1, descending=False)
    if k > 0:
        kth = srt[..., -k].unsqueeze(-1)
        srt = srt.masked_fill(srt < kth, NEG_INF)
    cum = srt.softmax(-1).cumsum(-1)
    mask = cum <= 1 - p
    mask[..., -1] = False
    srt = srt.masked_fill(mask, NEG_INF)
    out = torch.empty_like(srt).scatter_(-1, order, srt)
    return out > NEG_INF


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vocab=st.sampled_from([4, 50, 300, 3000]),
    scale=st.sampled_from([0.01, 0.3, 1.0, 4.0]),
    k=st.integers(0, 400),
    p=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31),
)
def test_top_k_top_p_matches_vllm_reference(vocab, scale, k, p, seed):
    """Also covers nuclei larger than the first candidate tiers (small scale -> flat rows)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, vocab, generator=g) * scale
    k = k if k < vocab else 0
    probs = logits.softmax(-1)
    # skip cases within rounding of a boundary (the reference and the kernel round differently)
    desc = probs.double().sort(dim=-1, descending=True).values
    if k:
        desc[:, k:] = 0
    total = desc.sum(-1, keepdim=True)
    excl = desc.cumsum(-1) - desc
    if p < 1 and bool(((excl - p * total).abs() < 1e-5).any()):
        return
    ref = vllm_top_k_top_p_reference(logits, k, p)
    got = probs.clone()
    apply_top_k_top_p(got, [k] * 3, [p] * 3)
    kept = got > 0
    assert torch.equal(got[kept], probs[kept])  # kept probabilities are untouched
    # Same set as vLLM, except that tokens whose (float32) probability ties with the last one
    # kept are all kept (vLLM keeps an arbitrary part of such ties).
    assert bool((kept | ~ref).all())
    last_kept = torch.where(ref, probs, torch.inf).amin(dim=-1, keepdim=True)
    assert bool((probs[kept & ~ref] == last_kept.expand_as(probs)[kept & ~ref]).all())


@pytest.mark.parametrize(
    "top_p, top_k, kept",
    [
        (0.75, 0, 2),  # the mass before rank 2 is exactly 0.75: the nucleus is complete
        (0.7500001, 0, 3),
        (0.875, 0, 3),
        (0.5, 0, 1),
        (1.0, 0, 5),
        (0.5, 3, 1),  # top_k=3 keeps mass 0.875; top_p applies to it: 0.5 * 0.875 < 0.5
        (0.6, 3, 2),  # 0.6 * 0.875 > 0.5
        (0.99, 3, 3),
    ],
)
def test_top_p_exact_boundaries(top_p, top_k, kept):
    """vLLM drops a token when the ascending cumulative probability up to it is <= 1 - top_p,
    i.e. keeps rank r while the mass of the better ranks is < top_p (dyadic values: exact)."""
    probs = torch.tensor([[0.125, 0.5, 0.0625, 0.25, 0.0625]])
    got = probs.clone()
    apply_top_k_top_p(got, [top_k], [top_p])
    assert int((got > 0).sum()) == kept
    assert torch.equal(got > 0, probs >= probs.sort(descending=True).values[0, kept - 1])
    assert torch.equal(got > 0, vllm_top_k_top_p_reference(probs.log(), top_k, top_p))


def test_top_p_rows_with_mixed_settings_in_one_batch():
    g = torch.Generator().manual_seed(5)
    logits = torch.cat([torch.randn(2, 3000, generator=g) * 0.02, torch.randn(2, 3000, generator=g) * 5])
    ks, ps = [0, 2500, 0, 10], [0.9, 0.95, 1.0, 0.5]
    got = logits.softmax(-1)
    apply_top_k_top_p(got, ks, ps)
    for i in range(4):
        ref = vllm_top_k_top_p_reference(logits[i], ks[i], ps[i])
        assert torch.equal(got[i] > 0, ref)
    assert int((got[0] > 0).sum()) > 1024  # the flat row needed the full sort tier


# --- penalties ------------------------------------------------------------------------------------


def test_repetition_penalty_known_values():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 0.0]])
    # token 0 in the prompt, token 1 in the output, token 5 (logit 0) in the prompt
    apply_penalties(logits, [[0, 5, 1, 1]], [2], [2.0], [0.0], [0.0])
    assert logits.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5, 0.0]]
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    apply_penalties(logits, [[0, 1]], [1], [0.5], [0.0], [0.0])  # < 1 encourages repeats
    assert logits.tolist() == [[4.0, -1.0, 1.0]]


def test_presence_and_frequency_penalties_known_values():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, -3.0]])
    # prompt [0]; output [2, 2, 3, 4]: prompt tokens are not penalized by these two
    apply_penalties(logits, [[0, 2, 2, 3, 4]], [1], [1.0], [0.25], [0.5])
    expected = [[1.0, 1.0, 1.0 - (2 * 0.5 + 0.25), 1.0 - (0.5 + 0.25), -3.0 - 0.75]]
    assert torch.allclose(logits, torch.tensor(expected))
    logits = torch.tensor([[0.0, 0.0]])
    apply_penalties(logits, [[1, 1, 1]], [0], [1.0], [-1.0], [-0.5])  # negative: encourage
    assert torch.allclose(logits, torch.tensor([[0.0, 1.0 + 1.5]]))


def test_repetition_applies_before_presence_and_frequency():
    logits = torch.tensor([[2.0, -2.0, 3.0]])
    apply_penalties(logits, [[0, 1, 1]], [1], [2.0], [0.5], [0.25])
    # token 0 (prompt): 2/2 = 1; token 1 (output x2): -2*2 - (2*0.25 + 0.5) = -5
    assert torch.allclose(logits, torch.tensor([[1.0, -5.0, 3.0]]))


def test_penalties_ignore_out_of_range_tokens_and_keep_rows_apart():
    logits = torch.ones(3, 4)
    apply_penalties(logits, [[0, 9, -1], [1, 1], [3]], [0, 0, 1], [2.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.0])
    assert torch.allclose(
        logits,
        torch.tensor([[0.5 - 1.0, 1, 1, 1], [1, 0.0, 1, 1], [1, 1, 1, 1]]),
    )


def reference_penalties(logits, token_ids, npt, rep, pres, freq):
    out = logits.clone().tolist()
    for i, ids in enumerate(token_ids):
        V = len(out[i])
        seen = {t for t in ids if 0 <= t < V}
        for t in seen:
            x = out[i][t]
            out[i][t] = x / rep[i] if x > 0 else x * rep[i]
        counts: dict[int, int] = {}
        for t in ids[npt[i]:]:
            if 0 <= t < V:
                counts[t] = counts.get(t, 0) + 1
        for t, c in counts.items():
            out[i][t] -= freq[i] * c + pres[i]
    return torch.tensor(out)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), rows=st.integers(1, 4), vocab=st.integers(1, 12))
def test_penalties_match_reference(data, rows, vocab):
    toks = st.lists(st.integers(0, vocab - 1), max_size=15)
    token_ids = [data.draw(toks) for _ in range(rows)]
    npt = [data.draw(st.integers(0, len(t))) for t in token_ids]
    rep = [data.draw(st.sampled_from([1.0, 0.5, 1.3, 2.0])) for _ in range(rows)]
    pres = [data.draw(st.sampled_from([0.0, -1.0, 0.5, 2.0])) for _ in range(rows)]
    freq = [data.draw(st.sampled_from([0.0, -0.5, 0.25, 1.5])) for _ in range(rows)]
    logits = torch.tensor(data.draw(st.lists(st.lists(st.floats(-5, 5), min_size=vocab, max_size=vocab),
                                             min_size=rows, max_size=rows)), dtype=torch.float32)
    expected = reference_penalties(logits, token_ids, npt, rep, pres, freq)
    got = apply_penalties(logits.clone(), token_ids, npt, rep, pres, freq)
    assert torch.allclose(got, expected, atol=1e-5)
    # a non-contiguous view is handled too
    wide = torch.zeros(rows, vocab * 2)
    wide[:, ::2] = logits
    view = wide[:, ::2]
    apply_penalties(view, token_ids, npt, rep, pres, freq)
    assert torch.allclose(wide[:, ::2], expected, atol=1e-5)


def test_penalties_change_the_sampled_token():
    s = Sampler([EOS])
    # repetition: positive logit 3 -> 1.5 < 2; negative logit -1 -> -2 < -1.5
    t, _ = s(torch.tensor([[3.0, 2.0], [-1.0, -1.5]]), [
        sreq("a", prompt=[0], temperature=0.0, repetition_penalty=2.0),
        sreq("b", prompt=[0], temperature=0.0, repetition_penalty=2.0),
    ])
    assert t == [1, 1]
    # frequency counts only output tokens: prompt token 0 keeps its lead
    t, _ = s(torch.tensor([[3.0, 2.0, 2.5]]), [sreq("c", prompt=[0, 0, 0], output=[2], temperature=0.0, frequency_penalty=2.0)])
    assert t == [0]
    t, _ = s(torch.tensor([[3.0, 2.0, 2.5]]), [sreq("d", prompt=[1], output=[0, 0], temperature=0.0, frequency_penalty=0.3)])
    assert t == [2]  # 3 - 0.6 = 2.4 < 2.5
    t, _ = s(torch.tensor([[3.0, 2.0, 2.5]]), [sreq("e", prompt=[1], output=[0, 0], temperature=0.0, presence_penalty=0.3)])
    assert t == [0]  # 3 - 0.3 = 2.7 > 2.5: presence counts once


# --- min_tokens -----------------------------------------------------------------------------------


def test_min_tokens_blocks_eos_and_stop_tokens_until_reached():
    s = Sampler([EOS, 3])
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 7.0, 2.0]])  # eos 2 best, then eos 3, then stop id 4
    for n_out in range(5):
        req = sreq("m", output=[1] * n_out, temperature=0.0, min_tokens=3, stop_token_ids=[4])
        tokens, _ = s(logits, [req])
        assert tokens == ([5] if n_out < 3 else [2]), n_out
    # ignore_eos: eos is not a stop token, so it is not suppressed; stop_token_ids still are
    req = sreq("m", output=[], temperature=0.0, min_tokens=3, stop_token_ids=[2], ignore_eos=True)
    assert s(logits, [req])[0] == [3]
    req = sreq("m", output=[], temperature=0.0, min_tokens=3, ignore_eos=True)
    assert s(logits, [req])[0] == [2]
    # sampled rows never draw a suppressed token; other rows of the batch are unaffected
    reqs = [sreq("x", temperature=1.0, min_tokens=2, seed=1), sreq("y", temperature=0.0)]
    for step in range(50):
        tokens, _ = s(torch.tensor([[0.0, 0.0, 5.0, 5.0, 0.0, 0.0]] * 2), reqs)
        assert tokens[0] not in (2, 3) and tokens[1] == 2


# --- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_sorted_top_list():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 500, generator=g) * 3
    reqs = [
        sreq("a", temperature=0.0, logprobs=5, repetition_penalty=1.7, prompt=[int(logits[0].argmax())]),
        sreq("b", temperature=0.5, logprobs=0, top_k=3),
        sreq("c", temperature=1.0),
        sreq("d", temperature=2.0, logprobs=20, seed=4, presence_penalty=1.0, output=[1, 2]),
    ]
    tokens, lps = Sampler([EOS], seed=0)(logits, reqs)
    ref = torch.log_softmax(logits, dim=-1)
    assert lps[2] is None
    assert tokens[0] != int(logits[0].argmax())  # the penalty moved the choice, not the logprobs
    for i, n in ((0, 5), (1, 0), (3, 20)):
        lp = lps[i]
        assert lp is not None and lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(ref[i, tokens[i]].item(), abs=1e-6)
        assert len(lp.top) == n
        ids = [t for t, _ in lp.top]
        vals = [v for _, v in lp.top]
        assert ids == ref[i].topk(n).indices.tolist() if n else ids == []
        assert vals == sorted(vals, reverse=True)
        for t, v in lp.top:
            assert v == pytest.approx(ref[i, t].item(), abs=1e-6)
    assert lps[0].top[0][0] == int(logits[0].argmax())


# --- seeds ----------------------------------------------------------------------------------------


SEEDED_PARAMS = [
    dict(temperature=1.0),
    dict(temperature=0.8, top_k=50),
    dict(temperature=1.2, top_p=0.9),
    dict(temperature=1.0, top_k=200, top_p=0.95, min_p=0.01),
    dict(temperature=0.9, repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2),
]


def step_logits(step: int, vocab: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 + step)) * 2


def run_seeded(sampler: Sampler, params: dict, position: int, fillers: list[dict], steps: int, vocab: int = 3000):
    """Sample `steps` tokens for one seeded request placed at `position` among `fillers`."""
    out: list[int] = []
    for step in range(steps):
        reqs = []
        for j, f in enumerate(fillers):
            reqs.append(sreq(f"filler{j}", output=[step % vocab, 7], **f))
        reqs.insert(position, sreq("target", output=out, seed=1234, **params))
        g = torch.Generator().manual_seed(step)
        logits = torch.randn(len(reqs), vocab, generator=g) * 2
        logits[position] = step_logits(step, vocab)
        tokens, _ = sampler(logits, reqs)
        out.append(tokens[position])
    return out


FILLERS = [
    dict(temperature=0.7),
    dict(temperature=0.0),
    dict(temperature=1.0, seed=99, top_k=2500),  # raises the batch's top_k candidate count
    dict(temperature=1.3, top_p=0.5, min_p=0.05, logprobs=3),
    dict(temperature=1.0, seed=1234),  # the same seed, another request
    dict(temperature=0.5, repetition_penalty=1.5, min_tokens=5),
]


@pytest.mark.parametrize("params", SEEDED_PARAMS, ids=lambda p: ",".join(p))
def test_seeded_tokens_do_not_depend_on_the_batch(params):
    steps = 40
    alone = run_seeded(Sampler([EOS], seed=1), params, 0, [], steps)
    assert len(set(alone)) > steps // 4  # really random, not stuck
    first = run_seeded(Sampler([EOS], seed=2), params, 0, FILLERS, steps)
    middle = run_seeded(Sampler([EOS], seed=3), params, 3, FILLERS, steps)
    last = run_seeded(Sampler([EOS], seed=4), params, 3, FILLERS[:3], steps)
    assert alone == first == middle == last


def test_seed_offset_and_seed_select_distinct_streams():
    def stream(seed, offset, req_id="x", steps=30):
        s = Sampler([EOS])
        toks = []
        for step in range(steps):
            tokens, _ = s(step_logits(step, 3000).unsqueeze(0) * 0.1,
                          [sreq(req_id, seed=seed, seed_offset=offset, temperature=1.0)])
            toks.append(tokens[0])
        return toks

    base = stream(7, 0)
    assert stream(7, 0, req_id="another") == base  # same (seed, offset): same tokens
    assert stream(7, 1) != base
    assert stream(7, 2) != stream(7, 1)
    assert stream(8, 0) != base
    assert stream(8, 0) != stream(7, 1)
    assert mix_seed(7, 1) != mix_seed(8, 0) and mix_seed(-1, 0) != mix_seed(1, 0)


def test_n_children_in_one_batch_differ():
    s = Sampler([EOS])
    logits = step_logits(0, 3000).expand(4, 3000) * 0.1
    streams = [[] for _ in range(4)]
    for _ in range(20):
        tokens, _ = s(logits, [sreq(f"req#{i}", seed=5, seed_offset=i, temperature=1.0) for i in range(4)])
        for i, t in enumerate(tokens):
            streams[i].append(t)
    assert len({tuple(x) for x in streams}) == 4


def test_release_drops_generators_and_restarts_the_stream():
    s = Sampler([EOS])
    logits = step_logits(0, 3000).expand(3, 3000) * 0.1
    reqs = [sreq(f"r{i}", seed=i, temperature=1.0) for i in range(2)] + [sreq("u", temperature=1.0)]
    first, _ = s(logits, reqs)
    assert s.num_generators == 2
    second, _ = s(logits, reqs)
    assert second[:2] != first[:2]  # the generator kept its state
    s.release(["r0", "nope"])
    assert s.num_generators == 1
    again, _ = s(logits, reqs)
    assert again[0] == first[0]  # r0 starts over
    s.release(["r1", "u"])
    assert s.num_generators == 1  # r0 is back
    s.release(["r0"])
    assert s.num_generators == 0


# --- statistics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_distribution(temperature):
    logits = torch.tensor([1.0, 0.5, -0.5, 2.0])
    counts = empirical(Sampler([EOS], seed=21), logits, 30000, temperature=temperature)
    stat = chi_square(counts, torch.softmax(logits.double() / temperature, -1))
    assert stat < CHI2_CRIT[3], counts
    # the test can tell: the neighbouring temperatures are rejected
    for other in (temperature * 0.8, temperature * 1.25):
        assert chi_square(counts, torch.softmax(logits.double() / other, -1)) > 4 * CHI2_CRIT[3]


def test_seeded_rows_have_the_right_distribution():
    """Over many seeds, the first token of seeded requests follows softmax(logits / T)."""
    logits = torch.tensor([1.0, 0.5, -0.5, 2.0])
    n = 6000
    reqs = [sreq(f"s{i}", seed=i, temperature=0.8) for i in range(n)]
    tokens, _ = Sampler([EOS])(logits.expand(n, 4).contiguous(), reqs)
    counts = torch.bincount(torch.tensor(tokens), minlength=4)
    assert chi_square(counts, torch.softmax(logits.double() / 0.8, -1)) < CHI2_CRIT[3]


def test_long_tail_mass_is_sampled_faithfully():
    """One token of probability 0.5 and 8191 tiny ones: the tail gets its 0.5, evenly spread
    (guards the two-level sampler's block bookkeeping)."""
    V, n, head_id = 8192, 10000, 2345
    logits = torch.zeros(V)
    logits[head_id] = math.log(V - 1)  # p = 0.5
    counts = empirical(Sampler([EOS], seed=5), logits, n, temperature=1.0)
    head = counts[head_id].item()
    assert chi_square(torch.tensor([head, n - head]), torch.tensor([0.5, 0.5])) < CHI2_CRIT[1]
    # the tail is spread over blocks: each quarter of the vocab gets ~1/4 of it
    quarters = torch.stack([c.sum() for c in counts.clone().index_fill_(0, torch.tensor([head_id]), 0).chunk(4)])
    assert chi_square(quarters, torch.full((4,), 0.25)) < CHI2_CRIT[3]


@pytest.mark.parametrize("vocab", [3, 128, 300, 1000, 1024])
def test_inverse_cdf_sample_is_exact(vocab):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.rand(4, vocab, generator=g) ** 4
    probs[probs < 0.2] = 0.0
    probs[:, 0] = 0.0
    probs[:, -1] = 0.0
    probs[:, vocab // 2] = 0.5
    cdf = probs.double().cumsum(-1)
    us = [torch.full((4,), 1.0, dtype=torch.float64), torch.full((4,), 2.0**-53, dtype=torch.float64)]
    us += [1 - torch.rand(4, dtype=torch.float64, generator=g) for _ in range(300)]
    for u in us:
        got = inverse_cdf_sample(probs, u)
        ref = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
        assert torch.equal(got, ref)
        assert bool((probs.gather(1, got.unsqueeze(1)) > 0).all())


# --- cost -----------------------------------------------------------------------------------------


def best_time(fn, repeat=15):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def test_all_greedy_batch_costs_no_more_than_an_argmax():
    logits = torch.randn(64, 32000)
    reqs = [sreq(f"r{i}", temperature=0.0) for i in range(64)]
    s = Sampler([EOS])
    sampler_time = best_time(lambda: s(logits, reqs))
    argmax_time = best_time(lambda: logits.argmax(-1).tolist())
    assert sampler_time < argmax_time + 1e-3, (sampler_time, argmax_time)
