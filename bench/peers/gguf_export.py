"""Hugging Face folder (Llama / Qwen2 dense, OLMoE) -> GGUF at f32, bf16 or f16, for llama.cpp.

Converts in the peers venv (numpy + the `gguf` package, no torch; safetensors are read with numpy), so the
main venv stays free of peer packages; started from the main venv it re-runs itself there. In code,
`ensure(model_dir, outtype)` returns the cached GGUF, converting when it is missing or older than the
checkpoint or this file.

    .venv/bin/python bench/peers/gguf_export.py bench/.cache/qwen2.5-0.5b --outtype bf16   # -> bench/.cache/gguf/
    .venv/bin/python -m bench.parity --smoke     # tiny llama, qwen2, olmoe: all outtypes, parity with ferry

Layout follows llama.cpp's convert_hf_to_gguf.py:
- tensor names token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v (+ .bias), attn_output, ffn_norm,
  ffn_gate, ffn_up, ffn_down}, output_norm, and output only when the embeddings are untied;
- OLMoE (`olmoe`, NEOX rope like HF, no permutation): q_norm/k_norm -> attn_{q,k}_norm, the router
  mlp.gate -> ffn_gate_inp, and each layer's experts stacked into ffn_{gate,up,down}_exps [experts, out, in]
  (convert_hf_to_gguf.py OlmoeModel); llama.cpp's olmoe has no clip_qkv, no top-k renormalisation and k_norm
  over the whole hidden size (so no GQA): such checkpoints are refused rather than converted wrongly;
- 1-D tensors (norms, biases) stay float32 whatever the outtype, as convert_hf_to_gguf.py does;
- q/k rows are permuted for `llama` (llama.cpp ropes adjacent pairs, LLAMA_ROPE_TYPE_NORM, while HF's
  rotate_half pairs dimension i with i + d/2: LlamaModel.permute); `qwen2` uses NEOX rope, which is HF's
  layout, so its weights go in unchanged (Qwen2Model does not permute);
- the vocabulary has one entry per id with score and type, special tokens as CONTROL; bench/models.py's
  synthetic word-level tokenizer becomes a Unigram ("t5") vocab so that llama.cpp tokenizes text prompts
  to the same ids (see write_vocab). Benchmarks send token ids wherever the server accepts them.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]          # bench/
CACHE = ROOT / ".cache" / "gguf"
OUTTYPES = ("f32", "bf16", "f16")
ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "OlmoeForCausalLM": "olmoe"}
LAYER_NAMES = {  # HF suffix inside model.layers.N. -> llama.cpp name inside blk.N.
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def gguf_path(model_dir: Path, outtype: str) -> Path:
    """bench/.cache/gguf/<folder>-<outtype>.gguf for the shapes built in bench/.cache, else with a hash of the
    folder's path (two checkpoints with the same folder name must not share a GGUF)."""
    src = Path(model_dir).resolve()
    if src.parent == ROOT / ".cache":
        return CACHE / f"{src.name}-{outtype}.gguf"
    import hashlib
    return CACHE / f"{src.name}-{hashlib.sha1(str(src).encode()).hexdigest()[:8]}-{outtype}.gguf"


def ensure(model_dir: str | Path, outtype: str) -> Path:
    """The cached GGUF for (model_dir, outtype), converting first (in the peers venv) if needed."""
    model_dir = Path(model_dir)
    out = gguf_path(model_dir, outtype)
    newest = max([p.stat().st_mtime for p in model_dir.glob("*") if p.is_file()] + [Path(__file__).stat().st_mtime])
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    from bench.peers.env import peer_python
    subprocess.run([peer_python(), str(Path(__file__)), str(model_dir), "--outtype", outtype, "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out


# -- reading safetensors with numpy -----------------------------------------------------------------

def _safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor of one .safetensors file (F32, BF16 or F16 stored)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf, shape, dt = raw[a:b], info["shape"], info["dtype"]
        if dt == "F32":
            x = buf.view(np.float32).reshape(shape).copy()
        elif dt == "F16":
            x = buf.view(np.float16).reshape(shape).astype(np.float32)
        elif dt == "BF16":  # bfloat16 = the top half of a float32
            x = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        else:
            raise ValueError(f"{path.name}: {name} has dtype {dt}; only F32/F16/BF16 checkpoints are supported")
        yield name, x


def read_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for f in files:
        yield from _safetensors(f)


# -- conversion ---------------------------------------------------------------------------------------

def permute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """HF rotate_half rows -> llama.cpp adjacent-pair rows, per head (convert_hf_to_gguf.py LlamaModel.permute).
    w: [num_heads * head_dim, ...] (weight or bias)."""
    return (w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf_name: str) -> str | None:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    if hf_name.startswith("model.layers."):
        idx, rest = hf_name[len("model.layers."):].split(".", 1)
        if rest in LAYER_NAMES:
            return f"blk.{idx}.{LAYER_NAMES[rest]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed by llama.cpp from rope_freq_base
    raise KeyError(f"no llama.cpp name for tensor {hf_name}")


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))


def write_rope_scaling(w, cfg: dict) -> None:
    """Unscaled rope, or YaRN (ferry-tiny's), written as llama.cpp's own converter writes them
    (conversion/base.py); any other scaling is refused rather than converted wrong."""
    import gguf
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return
    if kind != "yarn":
        raise NotImplementedError(f"rope scaling {scaling} is not converted (unscaled rope and yarn only)")
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(scaling["factor"])
    w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                     ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                     ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                     ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
        if scaling.get(key) is not None:
            add(scaling[key])


def write_hparams(w, cfg: dict, arch: str, ftype: int) -> None:
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or D // H
    w.add_name(cfg.get("_name_or_path") or arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(D)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(cfg.get("num_key_value_heads", H))
    w.add_rope_freq_base(_rope_theta(cfg))
    write_rope_scaling(w, cfg)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    if head_dim != D // H:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if cfg.get("num_experts"):
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_file_type(ftype)


def write_vocab(w, model_dir: Path, cfg: dict) -> None:
    """One vocab entry per id, from tokenizer.json (any model type that lists its vocab).

    A word-level tokenizer (bench/models.py's "w3".."w31999", whitespace split) becomes a Unigram vocab
    ("t5", LLAMA_VOCAB_TYPE_UGM) of "▁w3".."▁w31999", all with the same score: text "w5 w17" normalizes to
    "▁w5▁w17", and the only segmentation without unknown pieces is one piece per word, so llama.cpp tokenizes
    text to exactly the ids of the HF tokenizer (needed by llama-cpp-python's server, which takes text prompts
    only), and detokenizes "▁" to a space. Unigram also has no default BOS or separator token: BERT's WordPiece
    ("bert") would tokenize the same, but its default separator id (102, a word here) cannot be unset from the
    GGUF, and llama-cpp-python appends the separator to every text prompt. Any other tokenizer is written as a
    "llama" (SentencePiece) list: right for token-id prompts and for detokenizing, not for tokenizing text."""
    import gguf
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    model = tok["model"]
    vocab = model["vocab"]
    pieces: dict[int, str] = ({i: p for i, (p, _) in enumerate(vocab)} if isinstance(vocab, list)
                              else {i: p for p, i in vocab.items()})
    added = tok.get("added_tokens", [])
    special = {t["id"] for t in added if t.get("special")}
    pieces.update({t["id"]: t["content"] for t in added})
    word_level = model.get("type") == "WordLevel"
    unk = model.get("unk_token")
    n = max(cfg["vocab_size"], max(pieces) + 1)
    tokens, scores, types = [], [], []
    for i in range(n):
        p = pieces.get(i)
        if p is None:
            tokens.append(f"[PAD{i}]"); types.append(gguf.TokenType.UNUSED)
        elif p == unk:
            tokens.append(p); types.append(gguf.TokenType.UNKNOWN)
        elif i in special or (p.startswith("<") and p.endswith(">")):
            tokens.append(p); types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append("\u2581" + p if word_level else p); types.append(gguf.TokenType.NORMAL)
        scores.append(0.0 if word_level else -float(i))
    w.add_tokenizer_model("t5" if word_level else "llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
    if eos is not None:
        w.add_eos_token_id(eos)
    unk_id = next((i for i, p in pieces.items() if p == unk), None)
    if unk_id is not None:
        w.add_unk_token_id(unk_id)
    if cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(cfg["pad_token_id"])
    # prompts go in as given (token ids, or text that tokenizes to them): exactly what the other engine gets
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if word_level:
        w.add_add_space_prefix(True)  # the first word too becomes "▁w..."


def export(model_dir: Path, outtype: str, out: Path) -> Path:
    import gguf
    cfg = json.loads((model_dir / "config.json").read_text())
    archs = [a for a in cfg.get("architectures", []) if a in ARCHS]
    if not archs:
        raise NotImplementedError(f"architectures {cfg.get('architectures')}: only {sorted(ARCHS)} are converted")
    arch = ARCHS[archs[0]]
    if cfg.get("use_sliding_window") or (arch == "llama" and cfg.get("sliding_window")):
        raise NotImplementedError("sliding-window attention is not converted")
    if arch == "olmoe" and (cfg.get("clip_qkv") is not None or cfg.get("norm_topk_prob")
                            or cfg.get("num_key_value_heads", cfg["num_attention_heads"]) != cfg["num_attention_heads"]):
        raise NotImplementedError("llama.cpp's olmoe has no clip_qkv, no norm_topk_prob and no GQA")
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "bf16": gguf.GGMLQuantizationType.BF16,
             "f16": gguf.GGMLQuantizationType.F16}[outtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "f16": gguf.LlamaFileType.MOSTLY_F16}[outtype]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads", H)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    write_hparams(w, cfg, arch, ftype)
    write_vocab(w, model_dir, cfg)
    experts: dict[str, list[np.ndarray | None]] = {}  # stacked name -> per-expert arrays of one layer
    for hf_name, x in read_tensors(model_dir):
        if ".mlp.experts." in hf_name:  # model.layers.N.mlp.experts.E.gate_proj.weight
            idx, _, _, e, proj, _ = hf_name[len("model.layers."):].split(".")
            key = f"blk.{idx}.{EXPERT_NAMES[proj]}.weight"
            parts = experts.setdefault(key, [None] * cfg["num_experts"])
            parts[int(e)] = x
            if all(p is not None for p in parts):
                w.add_tensor(key, gguf.quants.quantize(np.stack(experts.pop(key)), qtype), raw_dtype=qtype)
            continue
        name = gguf_name(hf_name)
        if name is None or (name == "output.weight" and cfg.get("tie_word_embeddings", False)):
            continue
        if arch == "llama" and ".attn_q." in name:
            x = permute_qk(x, H)
        elif arch == "llama" and ".attn_k." in name:
            x = permute_qk(x, KV)
        t = gguf.GGMLQuantizationType.F32 if x.ndim <= 1 else qtype
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), t), raw_dtype=t)
    if experts:
        raise ValueError(f"incomplete experts in {model_dir}: {sorted(experts)[:3]}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?", help="Hugging Face folder: config.json, *.safetensors, tokenizer.json")
    ap.add_argument("--outtype", choices=OUTTYPES, default="bf16")
    ap.add_argument("--out", type=Path, help="default: bench/.cache/gguf/<folder>-<outtype>.gguf")
    args = ap.parse_args()
    if args.model is None:
        ap.error("model folder required")
    try:
        import gguf  # noqa: F401
    except ImportError:  # the main venv: convert in the peers venv
        sys.path.insert(0, str(ROOT.parent))
        from bench.peers.env import peer_python
        subprocess.run([peer_python(), __file__, *sys.argv[1:]], check=True)
        return
    print(export(args.model, args.outtype, args.out or gguf_path(args.model, args.outtype)))


if __name__ == "__main__":
    main()
