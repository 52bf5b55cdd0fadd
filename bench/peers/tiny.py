"""Tiny random checkpoints for --smoke runs (seconds to build and run with 1 thread).

bench/models.py builds the real shapes; these reuse its writer with one shape per architecture the GGUF
exporter handles: qwen2 (NEOX rope, q/k/v biases, tied embeddings), llama (permuted q/k, no biases, an untied
lm_head) and olmoe (routed experts, q/k norms over the whole projection, untied lm_head)."""
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
    "tiny-olmoe": dict(architectures=["OlmoeForCausalLM"], model_type="olmoe", hidden_size=128,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=None,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, vocab_size=32000),
}


def build_tiny(name: str) -> Path:
    models.SHAPES.setdefault(name, TINY[name])
    return models.build(name)
