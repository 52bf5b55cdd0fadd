"""--expert-eviction / --expert-prefetch auto through the engine (ferry/experts/tuner.py): the default with a
store; token-identical to the all-in-memory run whatever it chooses and however often it switches (forced: a new
setting every decode step); the budget held and every slot back; each switch logged once at INFO and counted in
the stats; --explain; clear errors for bad values."""
from __future__ import annotations

import logging
import random

import pytest

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.errors import InvalidRequest
from ferry.experts.auto import AutoOffloadPolicy
from ferry.experts.layout import StoreIndex
from ferry.experts.samples import AutoParams, Setting, StepSample, candidate_settings
from tests.checkpoints import MOE_FAMILIES, random_prompts
from tests.expert_stores import check_store_clean, make_store

LENGTHS = [1, 6, 23, 40, 9]
MAX_TOKENS = [12, 3, 9, 12, 6]  # requests finish at different steps: the decode batch (the regime) changes
# a tiny exploration: a switch every few decode steps, regimes recognised at once, explorations back to back
FAST = AutoParams(window=1, settle=0, rounds=1, monitor=2, reexplore=2, regime_steps=1)


class RandomEveryStep:
    """A tuner policy that picks a random candidate after every decode step: more switching than auto ever asks
    for. Records what it was shown."""

    def __init__(self, settings: list[Setting], seed: int) -> None:
        self.settings, self.rng = settings, random.Random(seed)
        self.current, self.num_switches, self.samples = settings[0], 0, []

    def observe(self, sample: StepSample) -> Setting:
        self.samples.append(sample)
        new = self.rng.choice([s for s in self.settings if s != self.current])
        self.current, self.num_switches = new, self.num_switches + 1
        return new

    def describe(self) -> str:
        return ""


@pytest.fixture(scope="module")
def refs(tmp_ckpt_dir):
    cache = {}

    def get(family: str):
        """(checkpoint, store, prompts, the all-in-memory greedy tokens)."""
        if family not in cache:
            ckpt, store = make_store(family, tmp_ckpt_dir)
            prompts = random_prompts(len(LENGTHS), LENGTHS, ModelConfig.from_hf(ckpt).vocab_size, seed=11)
            cache[family] = ckpt, store, prompts, _generate(LLM(str(ckpt), kv_cache_memory="4M", dtype="float32"),
                                                                   prompts)
        return cache[family]
    return get


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    with llm:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        experts = llm.engine.parts.experts
        if experts is not None:
            check_store_clean(experts, experts.stats().budget_nbytes)
    return [list(o.outputs[0].token_ids) for o in outs]


def _budget(store, fraction: float | None) -> int:
    """fraction of every expert's bytes; None: a single expert."""
    index = StoreIndex.load(store)
    total = index.slot_nbytes * sum(len(r) for r in index.experts.values())
    return index.slot_nbytes if fraction is None else int(total * fraction)


def _llm(ckpt, store, budget: int, **options) -> LLM:
    return LLM(str(ckpt), kv_cache_memory="4M", dtype="float32", expert_store=str(store), expert_cache_memory=budget,
               max_num_batched_tokens=16, **options)  # prompts chunked: prefill steps between decode steps


def test_auto_is_the_default_with_a_store(refs):
    ckpt, store, prompts, want = refs("mixtral")
    llm = _llm(ckpt, store, _budget(store, 0.25))
    tuner = llm.engine.parts.expert_tuner
    assert tuner.auto and tuner.settings == candidate_settings("auto", "auto")
    assert llm.engine.parts.experts.prefetcher.choices  # pre-gating is there to switch to
    assert _generate(llm, prompts) == want
    assert llm.engine.stats().experts.offload_setting in {str(s) for s in tuner.settings}


def test_auto_takes_the_simplest_setting_when_every_expert_fits(refs, capsys):
    """Nothing is read twice: no measuring, no prefetcher, no planner probe (nothing printed without --explain)."""
    ckpt, store, prompts, want = refs("mixtral")
    llm = LLM(str(ckpt), kv_cache_memory="4M", dtype="float32", expert_store=str(store))
    tuner = llm.engine.parts.expert_tuner
    assert not tuner.auto and str(tuner.current) == "lru+none" and "holds all 16 experts" in tuner.why
    assert llm.engine.parts.experts.prefetcher is None
    assert _generate(llm, prompts) == want
    assert llm.engine.stats().experts.num_offload_switches == 0
    assert "expert plan" not in capsys.readouterr().err


@pytest.mark.parametrize("fraction", [0.25, None])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_switching_every_step_stays_token_exact(refs, family, fraction):
    """A random setting after every decode step, at a quarter of the experts and at a single expert's slot."""
    ckpt, store, prompts, want = refs(family)
    llm = _llm(ckpt, store, _budget(store, fraction))
    tuner = llm.engine.parts.expert_tuner
    tuner.policy = policy = RandomEveryStep(tuner.settings, seed=len(family))
    stats = llm.engine.stats
    assert _generate(llm, prompts) == want
    s = stats().experts
    assert s.num_offload_switches == len(policy.samples) >= 6  # decode-only steps (others mix in prompt chunks)
    assert s.cache_nbytes <= _budget(store, fraction) and s.num_evictions > 0
    assert len({x.num_seqs for x in policy.samples}) >= 2  # the batch shrank as requests finished
    assert all(x.lookups > 0 and x.seconds > 0 for x in policy.samples)  # decode steps only, with their counters


def test_the_auto_policy_switching_often_stays_token_exact_and_logs_each_switch_once(refs, caplog):
    """The real policy with a tiny exploration (a switch every step or two, regimes at once), and the planner's
    probe in between (it zeroes the counters the tuner reads): tokens exact, one INFO line per switch."""
    ckpt, store, prompts, want = refs("qwen3_moe")
    llm = _llm(ckpt, store, _budget(store, 0.25))
    tuner = llm.engine.parts.expert_tuner
    tuner.policy = AutoOffloadPolicy(tuner.settings, FAST, tuner._say)
    with caplog.at_level(logging.INFO, logger="ferry"):
        with llm:
            assert _generate_in(llm, prompts) == want
            llm.engine.expert_plan(4)  # empties the cache and zeroes the store's counters
            assert _generate_in(llm, prompts) == want
            s = llm.engine.stats().experts
            check_store_clean(llm.engine.parts.experts, s.budget_nbytes)
    switches = [r for r in caplog.records if r.levelno == logging.INFO and
                (" -> " in r.getMessage() or "switching from" in r.getMessage())]
    assert s.num_offload_switches == len(switches) >= 4
    assert s.offload_setting == str(tuner.current)


def _generate_in(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_explain_says_what_auto_chooses_and_why(refs, capsys):
    ckpt, store, prompts, want = refs("mixtral")
    llm = _llm(ckpt, store, _budget(store, 0.25), explain=True)
    tuner = llm.engine.parts.expert_tuner
    tuner.policy = AutoOffloadPolicy(tuner.settings, FAST, tuner._say)
    err = capsys.readouterr().err
    assert "expert plan:" in err and "expert offload: auto among lru+none, correlation+none, lru+pregate, " \
                                      "correlation+pregate (the cache holds" in err
    assert _generate(llm, prompts) == want
    err = capsys.readouterr().err
    assert "new regime, exploring" in err and "chose" in err and "ms/token" in err and "hit rate" in err
    assert "batch 4-7:" in tuner.describe() or "batch 2-3:" in tuner.describe()


def test_a_fixed_setting_is_kept_and_a_half_auto_one_explores_only_its_auto_half(refs):
    ckpt, store, _, _ = refs("mixtral")
    with _llm(ckpt, store, _budget(store, 0.25), expert_eviction="correlation", expert_prefetch="none") as llm:
        tuner = llm.engine.parts.expert_tuner
        assert not tuner.auto and str(tuner.current) == "correlation+none" and tuner.why == "as asked"
        assert llm.engine.parts.experts.prefetcher is None
    with _llm(ckpt, store, _budget(store, 0.25), expert_prefetch="pregate") as llm:
        tuner = llm.engine.parts.expert_tuner
        assert [str(s) for s in tuner.settings] == ["lru+pregate", "correlation+pregate"]


@pytest.mark.parametrize("options,match", [
    (dict(expert_prefetch="sometimes"), "expert_prefetch must be one of auto, none, correlation, pregate"),
    (dict(expert_eviction="fifo"), "expert_eviction must be one of auto, lru, correlation"),
])
def test_bad_values_are_refused_by_name(refs, options, match):
    ckpt, store, _, _ = refs("mixtral")
    with pytest.raises(InvalidRequest, match=match):
        LLM(str(ckpt), expert_store=str(store), **options)


def test_offload_options_without_a_store_are_refused(refs):
    ckpt, _, _, _ = refs("mixtral")
    with pytest.raises(InvalidRequest, match="need expert_store"):
        LLM(str(ckpt), expert_eviction="lru")
    LLM(str(ckpt), kv_cache_memory="4M", expert_eviction="auto", expert_prefetch="auto").close()  # the defaults
