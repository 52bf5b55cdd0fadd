"""`--expert-bits auto`: per-expert formats chosen from errors measured on recorded inputs, to fit a store size.
Allocation (pure), the measurement against Gaussian inputs, the recorder, sizes refused, and a mixed-format store
decoding exactly as dequantize-then-run of the same weights."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.cli import build_parser, main
from ferry.config import ModelConfig
from ferry.errors import InvalidRequest
from ferry.eval.activations import ExpertInputRecorder, Reservoir
from ferry.experts.allocate import allocate, check_size, hull
from ferry.experts.bitwidth import Calibration, ExpertCost, Format, output_errors
from ferry.experts.convert import BITS_TABLE, check_store_size, convert_expert_store
from ferry.experts.layout import ExpertLayout, StoreIndex
from ferry.ops.quant import QuantLinear, round_activations
from tests.checkpoints import make_checkpoint, random_prompts
from tests.expert_stores import auto_plan

INT4, INT8, DENSE = Format(4, 32), Format(8), Format(0)


def _cost(key, share: float, int4_error: float, int8_error: float) -> ExpertCost:
    return ExpertCost(key, share, 64, [(INT4, 1000, int4_error), (INT8, 2000, int8_error), (DENSE, 4000, 0.0)])


def _weighted(costs: list[ExpertCost], choice: dict) -> float:
    return sum(c.share * next(e for f, _, e in c.options if f == choice[c.key]) for c in costs)


def _nbytes(costs: list[ExpertCost], choice: dict) -> int:
    return sum(next(b for f, b, _ in c.options if f == choice[c.key]) for c in costs)


def test_the_sensitive_expert_gets_the_bits():
    """Room for one upgrade: it goes to the expert whose int4 error is largest for its share, not to the others."""
    costs = [_cost((0, 0), 0.25, 0.05, 0.01), _cost((0, 1), 0.25, 0.40, 0.01), _cost((0, 2), 0.5, 0.06, 0.01)]
    choice = allocate(costs, 3000 + 1000)
    assert choice == {(0, 0): INT4, (0, 1): INT8, (0, 2): INT4}
    # an expert the text never routes to never takes bytes, however large its error
    costs.append(_cost((0, 3), 0.0, 0.9, 0.5))
    assert allocate(costs, 4000 + 2000)[(0, 3)] == INT4


def test_allocation_fits_every_size_and_loses_less_with_more_bytes():
    gen = torch.Generator().manual_seed(0)
    costs = [_cost((l, e), float(s), float(a), float(a) / 16) for (l, e), s, a in
             zip(itertools.product(range(2), range(4)), torch.rand(8, generator=gen), torch.rand(8, generator=gen))]
    previous = float("inf")
    for size in range(8000, 32000, 700):
        choice = allocate(costs, size)
        assert _nbytes(costs, choice) <= size
        err = _weighted(costs, choice)
        assert err <= previous + 1e-12
        previous = err


def test_greedy_matches_the_best_choice_on_small_cases():
    """On convex options the greedy is the exact optimum of the multiple-choice knapsack (brute force)."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        costs = [_cost((0, e), float(torch.rand(1, generator=gen)), 0.1 + float(torch.rand(1, generator=gen)),
                       0.01) for e in range(4)]
        size = 4000 + 1000 * int(torch.randint(0, 9, (1,), generator=gen))
        best = min(_weighted(costs, dict(zip([c.key for c in costs], fs)))
                   for fs in itertools.product((INT4, INT8, DENSE), repeat=4)
                   if _nbytes(costs, dict(zip([c.key for c in costs], fs))) <= size)
        assert _weighted(costs, allocate(costs, size)) == pytest.approx(best, abs=1e-12), trial


def test_hull_drops_formats_that_buy_nothing():
    c = ExpertCost((0, 0), 1.0, 8, [(Format(4, 0), 1000, 0.3), (Format(4, 64), 1000, 0.2), (Format(4, 32), 1100, 0.25),
                                    (INT8, 2000, 0.01), (DENSE, 4000, 0.0)])
    assert [f for f, _, _ in hull(c)] == [Format(4, 64), INT8, DENSE]


def test_bad_sizes_say_what_to_do(tmp_ckpt_dir):
    costs = [_cost((0, e), 0.5, 0.1, 0.01) for e in range(2)]
    with pytest.raises(InvalidRequest, match="below the smallest store.*give at least"):
        check_size(costs, 1999)
    with pytest.raises(InvalidRequest, match="full precision.*--expert-bits none"):
        check_size(costs, 8000)
    ckpt = make_checkpoint("qwen3_moe", tmp_ckpt_dir)
    with pytest.raises(InvalidRequest, match="below the smallest store"):
        check_store_size(ckpt, 10_000, "float32")
    with pytest.raises(InvalidRequest, match="--expert-bits none"):
        check_store_size(ckpt, 1 << 30, "float32")
    with pytest.raises(InvalidRequest, match="needs a plan"):
        convert_expert_store(ckpt, tmp_ckpt_dir / "no-plan", "float32", "auto")


def test_cli_reads_sizes_and_refuses_auto_without_one(tmp_ckpt_dir, capsys):
    args = build_parser().parse_args(["convert", "m", "--expert-store", "d", "--expert-bits", "auto",
                                      "--expert-store-size", "1.5G"])
    assert args.expert_store_size == int(1.5 * 2**30)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "m", "--expert-store", "d", "--expert-store-size", "lots"])
    ckpt = make_checkpoint("qwen3_moe", tmp_ckpt_dir)
    assert main(["convert", str(ckpt), "--expert-store", str(tmp_ckpt_dir / "x"), "--expert-bits", "auto"]) == 2
    assert "--expert-store-size" in capsys.readouterr().err


def _outlier_expert(D: int = 64, I: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert whose every row of gate_up has one huge weight on input channel 0 (per-row int4 then rounds the
    rest of the row to almost nothing)."""
    gen = torch.Generator().manual_seed(2)
    gate_up, down = 0.1 * torch.randn(2 * I, D, generator=gen), 0.1 * torch.randn(D, I, generator=gen)
    gate_up[:, 0] = 3.0 * torch.sign(torch.randn(2 * I, generator=gen))
    return gate_up, down


def test_recorded_inputs_rank_experts_unlike_gaussian_ones():
    """The stream's energy sits on channel 0, where the outlier expert's large weights are exactly representable:
    on real inputs it loses little at int4, on Gaussian ones (energy on every channel) a lot; a smooth expert loses
    about the same on both. The two calibrations give the extra bits to different experts."""
    D, I = 64, 32
    layout = ExpertLayout.for_shape("float32", D, I, 32)
    gen = torch.Generator().manual_seed(3)
    outlier = _outlier_expert(D, I)
    smooth = (0.1 * torch.randn(2 * I, D, generator=gen), 0.1 * torch.randn(D, I, generator=gen))
    real = 0.02 * torch.randn(64, D, generator=gen)
    real[:, 0] = 4.0 * torch.randn(64, generator=gen)
    fmt = [Format(4, 0), INT8]
    gauss = torch.randn(64, D, generator=gen)
    (o_real, _), (o_gauss, _) = (output_errors(*outlier, x, layout, fmt) for x in (real, gauss))
    (s_real, _), (s_gauss, _) = (output_errors(*smooth, x, layout, fmt) for x in (real, gauss))
    assert o_real < o_gauss / 2 and o_real < s_real and o_gauss > s_gauss

    def choose(x: torch.Tensor) -> dict:
        costs = []
        for e, (g, d) in enumerate((outlier, smooth)):
            errs = output_errors(g, d, x, layout, [Format(4, 0), INT8, DENSE])
            costs.append(ExpertCost((0, e), 0.5, 64, [(f, n, err) for f, n, err in
                                                      zip([Format(4, 0), INT8, DENSE], (1, 2, 4), errs)]))
        return allocate(costs, 3)
    assert choose(real) == {(0, 0): Format(4, 0), (0, 1): INT8}
    assert choose(gauss) == {(0, 0): INT8, (0, 1): Format(4, 0)}


def test_reservoir_keeps_a_bounded_sample_of_what_it_saw():
    r = Reservoir(5, torch.Generator().manual_seed(0))
    r.add(torch.arange(3.0)[:, None])
    assert r.rows.flatten().tolist() == [0, 1, 2]
    for start in range(3, 1000, 7):
        r.add(torch.arange(start, start + 7.0)[:, None])
    assert r.rows.shape == (5, 1) and r.seen == 3 + 7 * 143
    assert len(set(r.rows.flatten().tolist())) == 5 and max(r.rows.flatten().tolist()) > 100  # not just the first


def test_recorder_counts_every_assignment_and_samples_routed_rows():
    rec = ExpertInputRecorder(max_rows=4)
    x = torch.arange(6.0)[:, None].expand(6, 3)
    top_ids = torch.tensor([[0, 1], [1, 2], [0, 2], [0, 1], [3, 1], [0, 3]])
    rec.routed(5, x, top_ids, torch.ones(6, 2))
    cal = rec.calibration("test")
    assert cal.counts == {(5, 0): 4, (5, 1): 4, (5, 2): 2, (5, 3): 2}
    assert sorted(cal.samples[(5, 2)][:, 0].tolist()) == [1, 2]
    assert cal.share((5, 0)) == pytest.approx(4 / 12) and cal.share((5, 7)) == 0
    assert cal.layer_rows[5].shape == (4, 3)


class DequantizedLinear(QuantLinear):
    """Dequantize, then run: the weight in float32, x rounded as the kernels round it (Q8_0, ferry.ops.quant)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (round_activations(x.float()) @ self.w.T).to(x.dtype)

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.w)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.w[ids].to(dtype)


def test_a_mixed_store_decodes_as_dequantize_then_run(tmp_ckpt_dir):
    """A store of int4 (one scale per row, per 32 inputs), int8 and dense experts, offloaded through a small cache,
    gives the greedy tokens of the resident model whose experts are those records dequantized (dense: as is)."""
    ckpt = make_checkpoint("mixtral", tmp_ckpt_dir)
    plan = auto_plan(ckpt, "float32")
    assert plan.nbytes <= plan.size
    formats = [Format(4, 32), Format(8), Format(4, 0), DENSE]
    plan.choice = {k: formats[i % 4] for i, k in enumerate(sorted(plan.choice))}  # every format, in every layer
    store = tmp_ckpt_dir / "mixtral-mixed.experts"
    convert_expert_store(ckpt, store, "float32", "auto", plan)
    index = StoreIndex.load(store)
    assert {(r.bits, r.group) for recs in index.experts.values() for r in recs} == {(4, 32), (8, None), (4, 0),
                                                                                    (0, None)}
    assert index.total_nbytes == plan.nbytes == json.loads((store / BITS_TABLE).read_text())["nbytes"]
    prompts = random_prompts(4, [3, 9, 17, 30], ModelConfig.from_hf(ckpt).vocab_size, seed=5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(str(ckpt), dtype="float32", kv_cache_memory="4M", expert_store=str(store),
             expert_cache_memory=3 * index.slot_nbytes) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                            use_tqdm=False)]
    with LLM(str(ckpt), dtype="float32", kv_cache_memory="4M") as llm:
        for layer, recs in index.experts.items():
            experts = llm.engine.parts.runner.model.layers[layer].mlp.experts
            gate_up, down = [], []
            for e, rec in enumerate(recs):
                g, d = experts.gate_up[e], experts.down[e]
                if rec.bits:
                    gq, dq = index.layout.format_of(rec).quantize(g, d)
                    g, d = gq.dequantize(), dq.dequantize()
                    gate_up.append(DequantizedLinear(g))
                    down.append(DequantizedLinear(d))
                else:
                    gate_up.append(g.clone())
                    down.append(d.clone())
            del experts._parameters["gate_up"], experts._parameters["down"]  # as ferry.quant.model.install does
            experts.gate_up, experts.down = gate_up, down
        want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]
    assert got == want
