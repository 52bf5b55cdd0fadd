"""Random-weight checkpoints with real model shapes, for speed benchmarks (quality is not measured on them).

Written straight to safetensors in Hugging Face layout (so ferry, transformers and the GGUF converter all load
them), with a synthetic word-level tokenizer covering the whole vocabulary. Built once into bench/.cache/.
Vocabularies are cut to 32k (the rest of each shape is the real one, except the MoE's expert count):

    qwen2.5-0.5b   Qwen2.5-0.5B: 24 layers, hidden 896, GQA 14/2, q/k/v biases, tied embeddings  (0.36B params)
    llama-1b       Llama-3.2-1B: 16 layers, hidden 2048, GQA 32/8, tied embeddings, plain rope     (1.0B params)
    olmoe-16e      OLMoE-1B-7B with 16 experts instead of 64 and top-2 instead of top-8 (the same 1:8
                   sparsity): 16 layers, hidden 2048, 16 heads, q/k norms, expert FFN 1024     (1.9B params;
                   the full 64 experts would not fit three engines side by side in 24 GiB)

and TINY, random checkpoints for --smoke runs (seconds to build and run with 1 thread), one shape per
architecture the GGUF exporter handles: qwen2 (NEOX rope, q/k/v biases, tied embeddings), llama (permuted q/k,
no biases, an untied lm_head) and olmoe (routed experts, q/k norms over the whole projection, untied lm_head).

`resolve(name)` takes one of these, a tiny smoke shape or a path to a Hugging Face folder.

    .venv/bin/python -m bench.models llama-1b       # build one (all of them without an argument)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

CACHE = Path(__file__).resolve().parent / ".cache"
SHARD_BYTES = 2 << 30  # checkpoints above this are written in shards (so building never holds all of it twice)

SHAPES = {
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=32000),
    "llama-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                     intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, vocab_size=32000),
    "olmoe-16e": dict(architectures=["OlmoeForCausalLM"], model_type="olmoe", hidden_size=2048,
                      intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                      num_experts=16, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=None,
                      max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, vocab_size=32000),
}


# --smoke shapes: tiny-<architecture>
TINY = {
    "tiny-qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=128,
                       intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, vocab_size=32000),
    "tiny-llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128,
                       intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, vocab_size=32000),
    "tiny-olmoe": dict(architectures=["OlmoeForCausalLM"], model_type="olmoe", hidden_size=128,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=None,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, vocab_size=32000),
}


def resolve(name: str | Path) -> Path:
    """A checkpoint folder: a shape of SHAPES or TINY (built if missing), or an existing path."""
    if str(name) in SHAPES or str(name) in TINY:
        return build(str(name))
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name}: not a shape ({', '.join([*SHAPES, *TINY])}) nor a Hugging Face folder")
    return path


def layer_tensors(cfg: dict, i: int, w) -> dict[str, torch.Tensor]:
    """HF tensors of decoder layer i; w(*shape, std=...) draws random weights."""
    D, I = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or D // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    t = {p + "input_layernorm.weight": 1 + w(D, std=0.1), p + "post_attention_layernorm.weight": 1 + w(D, std=0.1),
         p + "self_attn.q_proj.weight": w(q, D), p + "self_attn.k_proj.weight": w(kv, D),
         p + "self_attn.v_proj.weight": w(kv, D), p + "self_attn.o_proj.weight": w(D, q)}
    if cfg["model_type"] == "qwen2":
        t.update({p + "self_attn.q_proj.bias": w(q), p + "self_attn.k_proj.bias": w(kv), p + "self_attn.v_proj.bias": w(kv)})
    if cfg["model_type"] == "olmoe":  # q/k RMSNorm over the whole projection
        t.update({p + "self_attn.q_norm.weight": 1 + w(q, std=0.1), p + "self_attn.k_norm.weight": 1 + w(kv, std=0.1)})
    if "num_experts" in cfg:
        t[p + "mlp.gate.weight"] = w(cfg["num_experts"], D, std=0.5)  # router: clear top-k choices
        for e in range(cfg["num_experts"]):
            x = f"{p}mlp.experts.{e}."
            t.update({x + "gate_proj.weight": w(I, D), x + "up_proj.weight": w(I, D), x + "down_proj.weight": w(D, I)})
    else:
        t.update({p + "mlp.gate_proj.weight": w(I, D), p + "mlp.up_proj.weight": w(I, D),
                  p + "mlp.down_proj.weight": w(D, I)})
    return t


def build(name: str, root: Path = CACHE, seed: int = 0, shape: dict | None = None) -> Path:
    """root/name, built once: the shape SHAPES or TINY name, or `shape` (a config of the same keys) under that name."""
    cfg = dict(shape or {**SHAPES, **TINY}[name], hidden_act="silu", bos_token_id=0, eos_token_id=1, dtype="float32",
               use_sliding_window=False, attention_dropout=0.0)
    path = root / name
    if (path / "config.json").is_file():  # written last
        return path
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    D, V = cfg["hidden_size"], cfg["vocab_size"]
    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": w(V, D), "model.norm.weight": 1 + w(D, std=0.1)}]
    if not cfg["tie_word_embeddings"]:
        shards[0]["lm_head.weight"] = w(V, D)
    index: dict[str, str] = {}

    def flush(final: bool = False) -> None:
        nonlocal shards
        if not final and sum(t.numel() * 4 for t in shards[-1].values()) < SHARD_BYTES:
            return
        fname = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shards[-1], str(path / fname))
        index.update({k: fname for k in shards[-1]})
        shards = [{}]

    for i in tqdm(range(cfg["num_hidden_layers"]), desc=f"building {name}", unit="layer"):
        shards[-1].update(layer_tensors(cfg, i, w))
        flush()
    flush(final=True)
    files = sorted(set(index.values()))
    if len(files) == 1:  # one file: the plain name, no index
        (path / files[0]).rename(path / "model.safetensors")
    else:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    _word_tokenizer(path, V)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def _word_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


if __name__ == "__main__":
    import sys
    for n in sys.argv[1:] or list(SHAPES):
        print(build(n))
