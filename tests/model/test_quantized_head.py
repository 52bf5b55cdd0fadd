"""The quantized lm_head (--quantization-lm-head, ferry/quant/model.py): its logits against dequantize-then-matmul,
a tied model's one quantized table serving both the head and the embedding lookup, the converted folder's round
trip (and a folder converted before the option), decode's head on the qgemv kernel, and sampling, logprobs and
speculative verification on top of it."""
from __future__ import annotations

import json

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.errors import InvalidRequest
from ferry.ops import qgemv
from ferry.ops.quant import KernelLinear, QuantLinear, quantize_weight
from ferry.quant.convert import convert_quantized
from ferry.quant.folder import MANIFEST
from tests.checkpoints import make_checkpoint, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen2(tmp_ckpt_dir):
    return make_checkpoint("qwen2", tmp_ckpt_dir)  # tied embeddings


def _prompts(n: int = 3) -> list[dict]:
    return [{"prompt_token_ids": p} for p in random_prompts(n, [5, 17, 30], vocab_size=300, seed=4)]


def _greedy(llm: LLM, prompts: list[dict], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _model(llm: LLM) -> torch.nn.Module:
    return llm.engine.parts.runner.model


def test_rows_of_a_quantized_table_are_its_dequantized_rows():
    w = torch.randn(50, 64)
    ids = torch.tensor([3, 0, 49, 3])
    for bits, group in ((8, 64), (4, 32), (4, 64)):
        q = quantize_weight(w, bits, group)
        want = q.dequantize(torch.float32)[ids]
        assert torch.equal(q.rows(ids, torch.float32), want)
        assert torch.equal(KernelLinear(q).rows(ids, torch.bfloat16), want.to(torch.bfloat16))


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_tied_head_logits_match_dequantize_then_matmul(qwen2, head):
    """One quantized table: the lookup gives its dequantized rows exactly, and the head's logits are the
    dequantized table's product within the kernel's Q8_0 activation rounding (tests/unit/test_ops_quant.py's
    bound: 2% of the output's norm)."""
    with LLM(str(qwen2), dtype="float32", quantization="int4", quantization_lm_head=head) as llm:
        model = _model(llm)
        assert isinstance(model.embed, QuantLinear) and model.lm_head is None
        assert "embed" not in dict(model.named_parameters())  # no float copy of the table is held
        assert model.embed.qw.bits == int(head[-1])
        V, D = model.cfg.vocab_size, model.cfg.hidden_size
        table = model.embed.dequantize(torch.empty(V, D))
        ids = torch.tensor([5, 1, 5, V - 1])
        assert torch.equal(model.embed_tokens(ids), table[ids])
        x = torch.randn(6, D)
        got = model.logits(x)
        want = model.norm(x.clone()) @ table.T
        assert got.dtype == torch.float32 and got.shape == (6, V)
        assert (got - want).norm() / want.norm() < 0.02


def test_decode_runs_the_head_on_the_qgemv_kernel(qwen2):
    if not qgemv.available():
        pytest.skip(f"no qgemv kernel here: {qgemv.unavailable_reason()}")
    with LLM(str(qwen2), dtype="bfloat16", quantization="int8") as llm:
        model = _model(llm)
        x = torch.randn(1, model.cfg.hidden_size, dtype=torch.bfloat16)
        before = qgemv.kernel_calls()
        logits = model.logits(x)
        assert qgemv.kernel_calls() == before + 1 and logits.dtype == torch.float32


def test_quantization_lm_head_none_keeps_the_float_table(qwen2):
    with LLM(str(qwen2), dtype="float32", quantization="int8", quantization_lm_head="none") as llm:
        model = _model(llm)
        assert isinstance(model.embed, torch.nn.Parameter) and model.lm_head is None
        assert len(_greedy(llm, _prompts())[0]) == 10


def test_untied_head_takes_the_option(tmp_ckpt_dir):
    llama = make_checkpoint("llama", tmp_ckpt_dir)
    for head, want in (("int4", 4), (None, 8)):
        with LLM(str(llama), dtype="float32", quantization="int8", quantization_lm_head=head) as llm:
            model = _model(llm)
            assert isinstance(model.embed, torch.nn.Parameter)  # an untied table is only looked up: float
            assert model.lm_head.qw.bits == want
    with LLM(str(llama), dtype="float32", quantization="int4", quantization_lm_head="none") as llm:
        assert isinstance(_model(llm).lm_head, torch.nn.Parameter)


def test_converted_tied_folder_round_trip(qwen2, tmp_path):
    prompts = _prompts()
    with LLM(str(qwen2), dtype="float32", quantization="int4") as at_load:
        want = _greedy(at_load, prompts)
        weight_bytes = at_load.engine.decode_weight_bytes
    convert_quantized(qwen2, tmp_path / "q", "int4")
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    assert manifest["version"] == 2 and manifest["lm_head"] == "int8"
    assert manifest["matrices"]["embed"] == {"bits": 8, "group": 64}  # the tied table is the head
    with LLM(str(tmp_path / "q"), dtype="float32") as loaded:
        assert isinstance(_model(loaded).embed, QuantLinear)
        assert _greedy(loaded, prompts) == want
        # the quantized table counts in the bytes a decode step reads (it is the head)
        assert loaded.engine.decode_weight_bytes == weight_bytes
    with pytest.raises(InvalidRequest, match="holds its lm_head at int8 .* not int4"):
        LLM(str(tmp_path / "q"), quantization="int4", quantization_lm_head="int4")


def test_folder_converted_before_the_option_still_loads(qwen2, tmp_path):
    """A version-1 folder (no lm_head entry, the tied table in float) gets its head quantized at load: the tokens of
    quantizing the checkpoint at load; asking for none keeps the float table."""
    out = tmp_path / "v1"
    convert_quantized(qwen2, out, "int8", lm_head="none")
    manifest = json.loads((out / MANIFEST).read_text())
    assert "embed" not in manifest["matrices"]
    manifest["version"] = 1
    del manifest["lm_head"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    prompts = _prompts()
    with LLM(str(qwen2), dtype="float32", quantization="int8") as at_load:
        want = _greedy(at_load, prompts)
    with LLM(str(out), dtype="float32") as old:
        assert isinstance(_model(old).embed, QuantLinear)
        assert _greedy(old, prompts) == want
    with LLM(str(out), dtype="float32", quantization="int8", quantization_lm_head="none") as float_head:
        assert isinstance(_model(float_head).embed, torch.nn.Parameter)


def test_option_errors(qwen2, tmp_path):
    with pytest.raises(InvalidRequest, match="quantization_lm_head needs quantization"):
        LLM(str(qwen2), quantization_lm_head="int8")
    with pytest.raises(InvalidRequest, match="quantization_lm_head must be one of int8, int4, none"):
        LLM(str(qwen2), quantization="int8", quantization_lm_head="int2")


def test_sampling_logprobs_and_speculation_on_a_quantized_head(qwen2):
    """Greedy with ngram drafts verified (one decode row per draft token, on the batch-invariant kernel) gives the
    tokens without them; logprobs are the head's (the greedy token is the top one); prompt logprobs read the logits
    of every prompt row."""
    repetitive = [{"prompt_token_ids": ([7, 8, 9, 10] * 6)[:k]} for k in (12, 21)] + _prompts(2)
    with LLM(str(qwen2), dtype="float32", quantization="int4") as plain:
        want = _greedy(plain, repetitive)
        out = plain.generate(repetitive[:1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3,
                                                            prompt_logprobs=2), use_tqdm=False)[0]
        sampled = _greedy(plain, repetitive, SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True))
    c = out.outputs[0]
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert lp.top[0][0] == tok and abs(lp.logprob - lp.top[0][1]) < 1e-6
    assert out.prompt_logprobs[0] is None and all(p is not None and len(p.top) == 2 for p in out.prompt_logprobs[1:])
    assert all(len(t) == 8 for t in sampled)
    with LLM(str(qwen2), dtype="float32", quantization="int4", speculative_method="ngram",
             num_speculative_tokens=4) as spec:
        assert _greedy(spec, repetitive) == want
