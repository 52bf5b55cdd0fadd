"""Tiny random checkpoints for --smoke runs (seconds to build and run with 1 thread).

bench/models.py builds the real shapes; these reuse its writer with two extra shapes, one per architecture
the GGUF exporter handles: qwen2 (NEOX rope, q/k/v biases, tied embeddings) and llama (permuted q/k, no
biases, an untied lm_head, which models.build does not write, so it is added here)."""
from __future__ import annotations

from pathlib import Path

from bench import models

TINY = {
    "tiny-qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=128,
                       intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, vocab_size=32000),
    "tiny-llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128,
                       intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, vocab_size=32000),
}


def build_tiny(name: str) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    models.SHAPES.setdefault(name, TINY[name])
    path = models.build(name)
    if not TINY[name]["tie_word_embeddings"]:
        f = path / "model.safetensors"
        t = load_file(str(f))
        if "lm_head.weight" not in t:
            g = torch.Generator().manual_seed(1)
            t["lm_head.weight"] = torch.randn(t["model.embed_tokens.weight"].shape, generator=g) * 0.02
            save_file(t, str(f))
    return path
