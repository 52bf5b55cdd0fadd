"""Load a Hugging Face folder of safetensors into ferry's DecoderModel.

Only safetensors are read (pickle checkpoints are refused: unpickling runs arbitrary code). Weights are
copied into anonymous memory: left mmapped, idle pages get dropped from the page cache and re-read from
disk on the next request. q/k/v and gate/up are fused, and experts stacked, while loading."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tqdm import tqdm

from ferry.config import ModelConfig
from ferry.errors import ModelLoadError
from ferry.models.decoder import DecoderModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (KeyError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{index} is malformed ({e}); it must map tensor names to shard files") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelLoadError(f"{folder} is missing shard files listed in model.safetensors.index.json: {missing}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles)}); ferry loads safetensors only, because "
            "unpickling can run arbitrary code. Convert it, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, safe_serialization=True)")
    raise ModelLoadError(f"{folder} has no *.safetensors weights")


class _Reader:
    """Name -> tensor across shard files, read on demand."""

    def __init__(self, files: list[Path]) -> None:
        self.where: dict[str, Path] = {}
        self.handles = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ModelLoadError(f"cannot read {f}: {e}; the file is not valid safetensors (truncated?)") from None
            self.handles[f] = h
            for k in h.keys():
                self.where[k] = f

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ModelLoadError(f"tensor {name!r} is missing from the checkpoint")
        try:
            return self.handles[self.where[name]].get_tensor(name)
        except Exception as e:
            raise ModelLoadError(f"cannot read tensor {name!r} from {self.where[name]}: {e}") from None


def _hf_names(cfg: ModelConfig, reader: _Reader) -> dict[str, list[str] | tuple[str, ...]]:
    """ferry parameter name -> the HF tensor names it is built from (a list is concatenated on dim 0,
    a tuple of per-expert lists is stacked)."""
    m: dict = {"embed": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        m["lm_head"] = ["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, f = f"model.layers.{i}.", f"layers.{i}."
        m[f + "input_norm.weight"] = [p + "input_layernorm.weight"]
        m[f + "post_attn_norm.weight"] = [p + "post_attention_layernorm.weight"]
        m[f + "attn.qkv"] = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if cfg.qkv_bias:
            m[f + "attn.qkv_bias"] = [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        m[f + "attn.o"] = [p + "self_attn.o_proj.weight"]
        if cfg.o_bias:
            m[f + "attn.o_bias"] = [p + "self_attn.o_proj.bias"]
        if cfg.qk_norm != "none":
            m[f + "attn.q_norm.weight"] = [p + "self_attn.q_norm.weight"]
            m[f + "attn.k_norm.weight"] = [p + "self_attn.k_norm.weight"]
        if cfg.moe is not None and cfg.moe.sparse_layers[i]:
            m.update(_moe_names(cfg, p, f, reader))
        else:
            m[f + "mlp.gate_up"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
            m[f + "mlp.down"] = [p + "mlp.down_proj.weight"]
            if cfg.mlp_bias:
                m[f + "mlp.gate_up_bias"] = [p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"]
                m[f + "mlp.down_bias"] = [p + "mlp.down_proj.bias"]
    return m


def _moe_names(cfg: ModelConfig, p: str, f: str, reader: _Reader) -> dict:
    E = cfg.moe.num_experts
    if cfg.family == "mixtral":
        b = p + "block_sparse_moe."
        gate_up = tuple([b + f"experts.{e}.w1.weight", b + f"experts.{e}.w3.weight"] for e in range(E))
        down = tuple([b + f"experts.{e}.w2.weight"] for e in range(E))
        router = b + "gate.weight"
    else:
        b = p + "mlp."
        if reader.has(b + "experts.gate_up_proj"):  # already stacked (transformers' fused layout)
            gate_up, down = [b + "experts.gate_up_proj"], [b + "experts.down_proj"]
        else:
            gate_up = tuple([b + f"experts.{e}.gate_proj.weight", b + f"experts.{e}.up_proj.weight"] for e in range(E))
            down = tuple([b + f"experts.{e}.down_proj.weight"] for e in range(E))
        router = b + "gate.weight"
    m = {f + "mlp.router": [router], f + "mlp.experts.gate_up": gate_up, f + "mlp.experts.down": down}
    if cfg.moe.shared_intermediate_size:
        s = p + "mlp.shared_expert."
        m[f + "mlp.shared.gate_up"] = [s + "gate_proj.weight", s + "up_proj.weight"]
        m[f + "mlp.shared.down"] = [s + "down_proj.weight"]
        m[f + "mlp.shared_gate"] = [p + "mlp.shared_expert_gate.weight"]
    return m


def _build(reader: _Reader, names, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(names, tuple):  # per-expert groups -> [E, ...]
        return torch.stack([_build(reader, group, dtype, device) for group in names])
    parts = [reader.get(n) for n in names]
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return t.to(device=device, dtype=dtype, copy=True)  # copy: anonymous memory, not the file's mmap


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_len: int,
               experts: Callable[[int], torch.nn.Module] | None = None) -> DecoderModel:
    """experts: layer -> the ExpertWeights of that MoE layer, when experts live elsewhere (an offloading
    store); their tensors are then not read from the checkpoint."""
    folder = Path(cfg.path)
    reader = _Reader(checkpoint_files(folder))
    model = DecoderModel(cfg, max_len)
    if experts is not None:
        for i, layer in enumerate(model.layers):
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts = experts(i)
    expected = dict(model.named_parameters())
    state = {}
    names = _hf_names(cfg, reader)
    for name, hf_names in tqdm(names.items(), desc=f"loading {folder.name}", unit="tensor", disable=None, leave=False):
        if name not in expected:  # served by `experts`
            continue
        t = _build(reader, hf_names, dtype, device)
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise ModelLoadError(f"{hf_names if isinstance(hf_names, list) else hf_names[0]} has shape "
                                 f"{tuple(t.shape)} but config.json implies {want} for {name}")
        state[name] = torch.nn.Parameter(t, requires_grad=False)
    missing = set(expected) - set(state)
    if missing:
        raise ModelLoadError(f"no weights for {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rotary(device)
    return model.eval()

