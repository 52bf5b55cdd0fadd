"""Random-weight checkpoints with real model shapes, for speed benchmarks (quality is not measured on them).

Written straight to safetensors in Hugging Face layout (so both ferry and transformers load them), with a
synthetic word-level tokenizer covering the whole vocabulary. Built once into bench/.cache/."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

CACHE = Path(__file__).resolve().parent / ".cache"

SHAPES = {
    # Qwen2.5-0.5B with the vocabulary cut to 32k (the rest of the shape is the real one)
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=32000),
}


def build(name: str, root: Path = CACHE, seed: int = 0) -> Path:
    cfg = dict(SHAPES[name], hidden_act="silu", bos_token_id=0, eos_token_id=1, dtype="float32",
               use_sliding_window=False, attention_dropout=0.0)
    path = root / name
    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = D // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    bias = cfg["model_type"] == "qwen2"

    def w(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": 1 + w(D, std=0.1)}
    for i in tqdm(range(cfg["num_hidden_layers"]), desc=f"building {name}", unit="layer"):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + w(D, std=0.1), p + "post_attention_layernorm.weight": 1 + w(D, std=0.1),
                  p + "self_attn.q_proj.weight": w(q, D), p + "self_attn.k_proj.weight": w(kv, D),
                  p + "self_attn.v_proj.weight": w(kv, D), p + "self_attn.o_proj.weight": w(D, q),
                  p + "mlp.gate_proj.weight": w(I, D), p + "mlp.up_proj.weight": w(I, D), p + "mlp.down_proj.weight": w(D, I)})
        if bias:
            t.update({p + "self_attn.q_proj.bias": w(q), p + "self_attn.k_proj.bias": w(kv), p + "self_attn.v_proj.bias": w(kv)})
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    _word_tokenizer(path, V)
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
