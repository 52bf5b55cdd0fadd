"""Load a Hugging Face folder of safetensors (read by `checkpoint.py`) into ferry's DecoderModel.

q/k/v and gate/up are fused, and experts stacked, while loading, each part read straight into its place in
the fused tensor: the peak is the weights plus one checkpoint tensor.

Public: `load_model` (the whole model), `checkpoint_names` (ferry parameter -> the checkpoint tensors it is
built from), `read_tensor` (build one parameter) and `read_experts` (one MoE layer's experts, stacked and fused
exactly as the resident model holds them: what `ferry convert --expert-store` writes), `read_weights` (every
parameter, quantized where a scheme says so: what quantizing at load and `ferry convert --quantization` share)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from ferry.config import ModelConfig, QuantConfig
from ferry.errors import InvalidRequest, ModelLoadError
from ferry.models.checkpoint import Reader, checkpoint_files
from ferry.models.decoder import DecoderModel
from ferry.quant.folder import Manifest, folder_weights, read_manifest, resolve_scheme
from ferry.quant.model import Stored, describe, head_param, install, is_quantized, nbytes, quantize_param, \
    shape_error
from ferry.quant.scheme import Scheme

log = logging.getLogger("ferry")
Weights = torch.Tensor | Stored  # a float parameter, or the stored form of a quantized one


def checkpoint_names(cfg: ModelConfig, reader: Reader) -> dict[str, list[str] | tuple[str, ...]]:
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


def _moe_names(cfg: ModelConfig, p: str, f: str, reader: Reader) -> dict:
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


def read_tensor(reader: Reader, names, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor made of the HF tensors `names`: a list is concatenated on dim 0, a tuple of lists stacked."""
    if isinstance(names, tuple):  # per-expert groups -> [E, ...]
        first = read_tensor(reader, names[0], dtype, device)
        out = torch.empty((len(names), *first.shape), dtype=dtype, device=device)
        out[0] = first
        for i, group in enumerate(names[1:], start=1):
            out[i] = read_tensor(reader, group, dtype, device)
        return out
    if len(names) == 1:
        t = reader.get(names[0])  # a fresh tensor of our own: no copy needed when it is already right
        return t if t.dtype == dtype and t.device == device else t.to(device=device, dtype=dtype)
    shapes = [reader.shape(n) for n in names]
    out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=dtype, device=device)
    row = 0
    for n, s in zip(names, shapes):
        out[row:row + s[0]] = reader.get(n)
        row += s[0]
    return out


def read_experts(cfg: ModelConfig, reader: Reader, layer: int, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")) -> dict[str, torch.Tensor]:
    """{"gate_up": [E, 2I, D], "down": [E, D, I]} of MoE layer `layer`, whatever the checkpoint's naming
    (per-expert tensors or transformers' stacked layout), in dtype."""
    names = _moe_names(cfg, f"model.layers.{layer}.", f"layers.{layer}.", reader)
    E, D, I = cfg.moe.num_experts, cfg.hidden_size, cfg.moe.intermediate_size
    out = {}
    for part, shape in (("gate_up", (E, 2 * I, D)), ("down", (E, D, I))):
        t = read_tensor(reader, names[f"layers.{layer}.mlp.experts.{part}"], dtype, device)
        if tuple(t.shape) != shape:
            raise ModelLoadError(f"layer {layer} experts' {part} has shape {tuple(t.shape)}, config.json implies "
                                 f"{shape}")
        out[part] = t
    return out


def read_weights(cfg: ModelConfig, reader: Reader, expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device, scheme: Scheme | None = None) -> Iterator[tuple[str, str, Weights]]:
    """(parameter, the checkpoint tensors it comes from, value) for every expected parameter (name -> shape) found
    in the checkpoint: a float tensor in dtype, or with a scheme, the stored form of each quantized one (read at
    the checkpoint's precision, so quantizing at load and `ferry convert` give the same codes whatever the dtype)."""
    names = checkpoint_names(cfg, reader)
    for name, hf_names in tqdm(names.items(), desc=f"loading {Path(cfg.path).name}", unit="tensor", disable=None,
                               leave=False):
        if name not in expected:  # served by an offloading expert store
            continue
        label = str(hf_names if isinstance(hf_names, list) else hf_names[0])
        if scheme is not None and is_quantized(name, scheme, cfg.tie_word_embeddings):
            w = read_tensor(reader, hf_names, torch.float32, torch.device("cpu"))
            _check_shape(name, label, tuple(w.shape), expected[name])
            yield name, label, quantize_param(name, w, scheme, cfg.tie_word_embeddings)
        else:
            yield name, label, read_tensor(reader, hf_names, dtype, device)


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_len: int,
               experts: Callable[[int], torch.nn.Module] | None = None,
               quant: QuantConfig = QuantConfig()) -> DecoderModel:
    """experts: layer -> the ExpertWeights of that MoE layer, when experts live elsewhere (an offloading
    store); their tensors are then not read from the checkpoint. quant: weight-only quantization of the linears
    (ferry/quant/); a folder written by `ferry convert --quantization` is loaded as stored."""
    folder = Path(cfg.path)
    manifest = read_manifest(folder)
    scheme = resolve_scheme(manifest, quant, head_param(cfg.tie_word_embeddings))
    if scheme is not None and device.type != "cpu":
        raise InvalidRequest(f"weight-only quantization runs on --device cpu only, not {device}")
    model = DecoderModel(cfg, max_len)
    if experts is not None:
        for i, layer in enumerate(model.layers):
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts = experts(i)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    state, quantized = {}, {}
    for name, label, value in _weights(cfg, manifest, scheme, expected, dtype, device):
        if isinstance(value, torch.Tensor):
            _check_shape(name, label, tuple(value.shape), expected[name])
            state[name] = torch.nn.Parameter(value, requires_grad=False)
        else:
            reason = shape_error(value, expected[name])
            if reason:
                raise ModelLoadError(f"{label}: {name} quantized to {reason}")
            quantized[name] = value
    missing = set(expected) - set(state) - set(quantized)
    if missing:
        raise ModelLoadError(f"no weights for {sorted(missing)[:5]}")
    for name, value in quantized.items():
        install(model, name, value)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rotary(device)
    if quantized:
        log.info("%s: %d linears quantized in place: %s; %.1f MiB", folder.name, len(quantized), describe(quantized),
                 sum(nbytes(v) for v in quantized.values()) / 2**20)
    return model.eval()


def _weights(cfg: ModelConfig, manifest: Manifest | None, scheme: Scheme | None, expected: dict[str, tuple[int, ...]],
             dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, str, Weights]]:
    """(parameter, where from, value) for every expected parameter: a converted folder's as stored, else the
    checkpoint's, quantized per scheme. A folder holding the head in float while the scheme quantizes it (version 1,
    tied: converted before the lm_head was quantized) has it quantized here, from its float32 values."""
    if manifest is None:
        yield from read_weights(cfg, Reader(checkpoint_files(Path(cfg.path))), expected, dtype, device, scheme)
        return
    head = head_param(cfg.tie_word_embeddings)
    late = scheme.head_bits is not None and manifest.head_stored(head) == "none"
    for name, label, value in folder_weights(manifest, expected, dtype, device, frozenset({head} if late else ())):
        if late and name == head:
            _check_shape(name, label, tuple(value.shape), expected[name])
            log.info("%s: quantizing its %s at load to %s (converted before the lm_head was quantized; `ferry "
                     "convert` again saves this)", manifest.folder.name, head, scheme.head_name)
            value = quantize_param(name, value, scheme, cfg.tie_word_embeddings)
        yield name, label, value


def _check_shape(name: str, label: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise ModelLoadError(f"{label} has shape {got} but config.json implies {want} for {name}")
