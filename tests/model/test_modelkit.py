"""The training kit (modelkit/): a 20-step smoke run of the training loop (not training) whose exported
checkpoint loads in ferry and in transformers and gives the same greedy tokens; RoPE scaling trains what
transformers runs."""
from __future__ import annotations

import pytest

from ferry import LLM, SamplingParams
from tests.checkpoints import hf_greedy


@pytest.mark.parametrize("name", ["ferry-tiny", "ferry-tiny-moe", "ferry-tiny-draft"])
def test_training_loop_smoke(name, tmp_path):
    from modelkit.train import train

    from modelkit.precision import native_bf16

    summary = train(name, tmp_path / name, smoke=True, threads=1)
    assert summary["steps"] == 20 and [r["step"] for r in summary["log"]] == [10, 20]
    # bf16 autocast only where the CPU has bf16 instructions: emulated bf16 made this test time out on AVX2 CPUs
    assert summary["compute_dtype"] == ("bfloat16" if native_bf16() else "float32")
    assert all(r["loss"] == r["loss"] for r in summary["log"])  # no NaN
    with LLM(str(tmp_path / name), dtype="float32") as llm:
        text = "The os module provides a portable way of using operating system dependent functionality."
        prompts = [llm.tokenizer.encode(text, add_special_tokens=False)[:n] for n in (3, 12)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    ref, _ = hf_greedy(tmp_path / name, prompts, 5)
    assert [o.outputs[0].token_ids for o in outs] == ref



def test_training_runs_in_float32_where_bf16_would_be_emulated():
    """With torch's AVX2 kernels (as on a CPU without AVX-512 / bf16 instructions) modelkit does not autocast."""
    import os
    import subprocess
    import sys

    code = "from modelkit.precision import train_dtype; print(train_dtype())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.float32"

def test_rope_scaling_trains_what_transformers_runs(tmp_path):
    """modelkit builds RoPE with ferry's tables: a YaRN model's logits equal transformers' on the exported checkpoint."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from modelkit.model import CausalLM, Spec
    from modelkit.train import YARN

    torch.manual_seed(0)
    spec = Spec(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                max_position_embeddings=4608, rope_scaling=YARN)
    model = CausalLM(spec).eval()
    (tmp_path / "m").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "m" / "config.json").write_text(json.dumps({**spec.hf_config(), "torch_dtype": "float32"}))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 2500))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert spec.hf_config()["rope_scaling"]["rope_type"] == "yarn"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_recipe_in_parts_continues_from_its_own_export(tmp_path, capsys):
    """`train ferry-tiny` runs part 1, then each Stage from the previous export (smoke: 20 steps each)."""
    from modelkit.train import RECIPES, main

    assert RECIPES["ferry-tiny"].stages, "ferry-tiny's recipe has a second part"
    main(["ferry-tiny", "--smoke", "--threads", "1", "--out", str(tmp_path / "m")])
    printed = capsys.readouterr().out
    assert "ferry-tiny: 20 steps" in printed and "ferry-tiny part 2: 20 steps" in printed
    with LLM(str(tmp_path / "m"), dtype="float32") as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_split_pad_rows_keep_the_answer_mask_and_move_the_needle_forward():
    import random
    from dataclasses import replace

    from ferry.eval.tasks import Haystack
    from modelkit.train import RECIPES, Phase, make_batch

    class Tok:  # one token per character: rows and answer masks read back as text
        eos = 0

        def encode(self, s: str) -> list[int]:
            return [ord(c) for c in s]

    hay = Haystack([ord(c) for c in "the quick brown fox jumps over the lazy dog. " * 20])
    first, tails = {}, []
    for split in (False, True):
        recipe = replace(RECIPES["ferry-tiny"], task_frac=1.0, repeat_frac=0.0, tasks=("passkey",), split_pad=split)
        first[split] = []
        for seed in range(40):
            x, y, mask, kinds = make_batch(recipe, Tok(), hay, random.Random(seed), Phase(300, 1, 1))
            text, answer = "".join(map(chr, x[0].tolist())), "".join(chr(t) for t in y[0][mask[0]].tolist())
            assert kinds == ["passkey"] and x.shape == y.shape == mask.shape == (1, 300)
            assert answer.strip().isdigit() and f"The pass key is {answer.strip()}." in text
            first[split].append(text.index("The pass key is"))
            tails.append(300 - 1 - int(mask[0].nonzero()[-1]))  # tokens after the answer's last (its eos, filler)
    # without the split every needle sits after the whole filler (~18 tokens here); with it, some sit before
    assert min(first[True]) < min(first[False])
    assert max(tails[:40]) == 1 and max(tails[40:]) > 5  # filler after the answer's end-of-sequence only when split
