"""Weight-only int8/int4 models (ferry/quant): the integration loses nothing beyond the quantization itself (a
quantized model decodes the tokens of the float model holding the dequantized weights), `ferry convert
--quantization` loads back to the same tokens, a broken folder is a clear error, and it runs with a KV policy
other than full, with MoE models (resident experts and an expert store), ending with every block free."""
from __future__ import annotations

import json

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.errors import InvalidRequest, ModelLoadError
from ferry.experts.layout import StoreIndex
from ferry.ops.quant import QuantLinear, ReferenceLinear
from ferry.quant import model as quant_model
from ferry.quant.convert import convert_quantized
from ferry.quant.folder import MANIFEST, WEIGHTS
from tests.checkpoints import make_checkpoint, random_prompts
from tests.expert_stores import make_store
from tests.kv_engines import run_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tmp_ckpt_dir):
    return make_checkpoint("llama", tmp_ckpt_dir)


@pytest.fixture(scope="module")
def converted(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "llama-int4"
    convert_quantized(llama, out, "int4")
    return out


def _prompts(n: int = 3) -> list[dict]:
    return [{"prompt_token_ids": p} for p in random_prompts(n, [5, 17, 30], vocab_size=300, seed=3)]


def _greedy(llm: LLM, prompts: list[dict]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _quantized_linears(model: torch.nn.Module) -> dict[str, QuantLinear | list[QuantLinear]]:
    """parameter name -> the QuantLinear(s) that replaced it."""
    out = {}
    for path, module in model.named_modules():
        for attr, v in vars(module).items():
            if isinstance(v, QuantLinear) or (isinstance(v, list) and v and isinstance(v[0], QuantLinear)):
                out[f"{path}.{attr}" if path else attr] = v
    return out


def _load_dequantized(float_model: torch.nn.Module, quantized: dict) -> None:
    """Writes each quantized linear's dequantized weight into the float model's parameter of the same name."""
    params = dict(float_model.named_parameters())
    for name, q in quantized.items():
        p = params[name]
        for i, ql in enumerate(q if isinstance(q, list) else [q]):
            dst = p.data[i] if isinstance(q, list) else p.data
            dst.copy_(ql.dequantize(torch.empty(dst.shape, dtype=torch.float32)))


@pytest.mark.parametrize("family,method", [("llama", "int4"), ("llama", "int8"), ("qwen2_moe", "int4"),
                                           ("mixtral", "int8"), ("qwen2", "int4")])
def test_quantized_model_decodes_as_the_float_model_of_its_dequantized_weights(tmp_ckpt_dir, family, method,
                                                                              monkeypatch):
    """The integration is lossless beyond the weights' own rounding: with every quantized linear on the
    dequantize-then-matmul oracle (the kernel, which also rounds activations to Q8_0, is checked against that
    oracle in tests/unit/test_ops_quant.py), the model decodes exactly as the float model holding the dequantized
    weights."""
    monkeypatch.setattr(quant_model, "prepare", ReferenceLinear)
    folder = make_checkpoint(family, tmp_ckpt_dir)
    prompts = _prompts()
    with LLM(str(folder), dtype="float32", quantization=method) as q, LLM(str(folder), dtype="float32") as f:
        qmodel, fmodel = q.engine.parts.runner.model, f.engine.parts.runner.model
        quantized = _quantized_linears(qmodel)
        names = {n.split(".", 2)[-1] for n in quantized if n.startswith("layers.")}
        assert {"attn.qkv", "attn.o"} <= names and ("mlp.down" in names or "mlp.experts.down" in names)
        assert ("embed" if qmodel.cfg.tie_word_embeddings else "lm_head") in quantized  # the head, tied or not
        assert not any(n in dict(qmodel.named_parameters()) for n in quantized)  # the float tensors are gone
        _load_dequantized(fmodel, quantized)
        assert _greedy(q, prompts) == _greedy(f, prompts)


def test_quantized_weights_hold_a_fraction_of_the_float_bytes(llama):
    with LLM(str(llama), dtype="float32") as f, LLM(str(llama), dtype="float32", quantization="int4") as q:
        fbytes = sum(p.nbytes for n, p in f.engine.parts.runner.model.named_parameters() if n != "embed")
        qmodel = q.engine.parts.runner.model
        floats = sum(p.nbytes for n, p in qmodel.named_parameters() if n != "embed")
        stored = sum(ql.qw.nbytes for v in _quantized_linears(qmodel).values() for ql in (v if isinstance(v, list)
                                                                                          else [v]))
    assert floats + stored < 0.3 * fbytes  # int4 + a float16 scale per 32 inputs, against float32


def test_convert_then_load_gives_the_tokens_of_quantizing_at_load(llama, converted):
    prompts = _prompts()
    with LLM(str(llama), dtype="float32", quantization="int4") as at_load:
        want = _greedy(at_load, prompts)
    with LLM(str(converted), dtype="float32") as loaded:
        assert _greedy(loaded, prompts) == want
    with LLM(str(converted), dtype="float32", quantization="int4") as same:  # the folder's own scheme: fine
        assert _greedy(same, prompts) == want
    manifest = json.loads((converted / MANIFEST).read_text())
    assert manifest["matrices"]["lm_head"]["bits"] == 8  # an untied head stays int8 under int4
    assert manifest["bits"] == 4 and manifest["source"]["nbytes"] > 0 and len(manifest["source"]["sha256"]) == 64
    assert (converted / "tokenizer.json").is_file() and (converted / "config.json").is_file()


def test_convert_moe_round_trip_with_forced_group(tmp_ckpt_dir, tmp_path):
    folder = make_checkpoint("qwen2_moe", tmp_ckpt_dir)
    convert_quantized(folder, tmp_path / "q", "int4", group_size=32)
    groups = {e["group"] for e in json.loads((tmp_path / "q" / MANIFEST).read_text())["matrices"].values()}
    assert groups == {32}
    prompts = _prompts()
    with LLM(str(folder), dtype="float32", quantization="int4", quantization_group_size=32) as a, \
            LLM(str(tmp_path / "q"), dtype="float32") as b:
        assert _greedy(a, prompts) == _greedy(b, prompts)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,message", [
    ("truncate", "truncated or was modified"),
    ("version", "format version 99"),
    ("drop-entry", "no entry for layers.0.attn.o"),
    ("wrong-group", "layers.0.attn.qkv.scales is torch.float16"),
    ("malformed", "is malformed"),
    ("missing-weights", "is missing"),
])
def test_a_damaged_folder_is_a_clear_error(converted, tmp_path, damage, message):
    folder = _copy(converted, tmp_path / "q")
    manifest = json.loads((folder / MANIFEST).read_text())
    if damage == "truncate":
        with open(folder / WEIGHTS, "r+b") as f:
            f.truncate((folder / WEIGHTS).stat().st_size - 100)
    elif damage == "version":
        manifest["version"] = 99
    elif damage == "drop-entry":
        del manifest["matrices"]["layers.0.attn.o"]
    elif damage == "wrong-group":
        manifest["matrices"]["layers.0.attn.qkv"]["group"] = 64 if manifest["matrices"]["layers.0.attn.qkv"][
            "group"] == 32 else 32
    elif damage == "missing-weights":
        (folder / WEIGHTS).unlink()
    if damage != "truncate":
        (folder / MANIFEST).write_text("{not json" if damage == "malformed" else json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=message) as e:
        LLM(str(folder), dtype="float32")
    assert "ferry convert" in str(e.value)


def test_a_folder_truncated_with_its_size_updated_names_the_file(converted, tmp_path):
    folder = _copy(converted, tmp_path / "q")
    size = (folder / WEIGHTS).stat().st_size - 64
    with open(folder / WEIGHTS, "r+b") as f:
        f.truncate(size)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["weights_nbytes"] = size
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=WEIGHTS):
        LLM(str(folder), dtype="float32")


def test_option_errors(llama, converted, tmp_path):
    with pytest.raises(InvalidRequest, match="already quantized to int4"):
        LLM(str(converted), quantization="int8")
    with pytest.raises(InvalidRequest, match="converted with group size chosen per matrix, not 64"):
        LLM(str(converted), quantization="int4", quantization_group_size=64)
    with pytest.raises(InvalidRequest, match="needs quantization"):
        LLM(str(llama), quantization_group_size=32)
    with pytest.raises(InvalidRequest, match="multiple of 32"):
        LLM(str(llama), quantization="int4", quantization_group_size=48)
    with pytest.raises(InvalidRequest, match="quantization must be one of int8, int4"):
        LLM(str(llama), quantization="int3")
    with pytest.raises(InvalidRequest, match="does not fit lm_head .* use one of 64, 32"):  # K = 64
        LLM(str(llama), quantization="int4", quantization_group_size=128)
    with pytest.raises(InvalidRequest, match="already quantized"):
        convert_quantized(converted, tmp_path / "again", "int4")
    with pytest.raises(InvalidRequest, match="not empty"):
        convert_quantized(llama, converted, "int4")


def test_convert_cli(llama, tmp_path, capsys):
    from ferry.cli import main

    assert main(["convert", str(llama), "--quantization", "int8", "--out", str(tmp_path / "q8")]) == 0
    assert "int8 x" in capsys.readouterr().err
    assert main(["convert", str(llama)]) == 2
    assert "give one of the two" in capsys.readouterr().err
    assert main(["convert", str(llama), "--quantization", "int4"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "q8"), "--expert-store", str(tmp_path / "s")]) == 2
    assert "quantized folder" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "q8"), "--prompt", "Once upon", "--max-tokens", "4"]) == 0
    assert main(["generate", str(llama), "--prompt", "Once upon", "--max-tokens", "4", "--quantization", "int4",
                 "--quantization-group-size", "32", "--dtype", "bfloat16"]) == 0
    assert main(["generate", str(tmp_path / "q8"), "--prompt", "Hi", "--quantization", "int4"]) == 2
    assert "already quantized to int8" in capsys.readouterr().err


def test_with_a_kv_policy_and_the_blocks_come_back(llama):
    prompts = random_prompts(6, [9, 40, 23], vocab_size=300, seed=5)
    want, _ = run_greedy(llama, prompts, quantization="int4")  # asserts every block is free again
    got, _ = run_greedy(llama, prompts, quantization="int4", kv_cache_memory="1M", swap_space="1M",
                        kv_policy="spans", kv_budget=1.0, kv_sink_tokens=4, kv_window_tokens=8)
    assert got == want  # spans reading every span is exact
    low_rank, _ = run_greedy(llama, prompts, quantization="int4", kv_cache_memory="1M", swap_space="1M",
                             kv_policy="shadow", kv_budget=0.5)  # its key basis reads the dequantized k projection
    assert [len(t) for t in low_rank] == [10] * len(prompts)


def test_moe_with_an_expert_store_keeps_its_own_bits(tmp_ckpt_dir):
    """The rest of the model is int8; the experts come from the store as it was converted (float32 here), read
    on demand through a cache of two experts: the same tokens as with every expert cached."""
    ckpt, store = make_store("qwen2_moe", tmp_ckpt_dir)
    prompts = random_prompts(3, [7, 19], vocab_size=300, seed=6)
    cached, _ = run_greedy(ckpt, prompts, quantization="int8", expert_store=str(store))
    streamed, engine = run_greedy(ckpt, prompts, quantization="int8", expert_store=str(store),
                                  expert_cache_memory=2 * StoreIndex.load(store).slot_nbytes)
    assert streamed == cached
    stats = engine.view().experts
    assert stats.hits < stats.lookups  # experts were read from disk
