"""Which of the decoder's parameters are quantized, and putting their quantized linears in place.

Quantized: every linear of a decoder layer (q/k/v fused as attn.qkv, attn.o, the dense MLP's gate_up and down,
the resident experts' gate_up and down, one matrix per expert, and the shared expert's), and the lm_head at
`Scheme.head_bits` (`--quantization-lm-head`, int8 per channel unless asked: see quantize_param). In a model with
tied embeddings the head is the embedding table itself (`embed`): it is quantized once, and the same codes serve
the head's matmul (the qgemv kernel: batch 1 reads each byte once) and the embedding lookup (the rows of a step's
tokens dequantized, `QuantLinear.rows`), as llama.cpp quantizes a shared token_embd with the output tensor's type.
No float copy is kept: the lookup reads only B rows a step, so a float table would cost RAM (V x D x 2 bytes in
bfloat16, 272 MB for Qwen2.5-0.5B) and no bandwidth, and one copy keeps lookup and head consistent.
Kept in float: an untied model's embedding (a lookup: B rows a step), norms, biases, the MoE router and the shared
expert's gate (tiny, and a flipped routing decision changes a whole expert's output).

A quantized parameter is replaced on its module by the `QuantLinear` that `ferry.ops.quant.prepare` makes of its
stored form (a list of them for stacked experts), so the float tensor is never held: the model's linears reach it
through ferry.models.layers.linear.linear, which takes either. Legend: E experts, N outputs, K inputs."""
from __future__ import annotations

import torch
from torch import nn

from ferry.ops.quant import QuantizedWeight, QuantLinear, prepare
from ferry.quant.scheme import Scheme

# parameter names inside a decoder layer (layers.<i>.<name>) that are quantized
LAYER_LINEARS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down", "mlp.shared.gate_up", "mlp.shared.down",
                 "mlp.experts.gate_up", "mlp.experts.down")
HEAD, EMBED = "lm_head", "embed"

Stored = QuantizedWeight | list[QuantizedWeight]  # one matrix, or one per expert of a stacked [E, N, K]


def head_param(tied: bool) -> str:
    """The parameter that is the lm_head: the embedding table in a model with tied embeddings."""
    return EMBED if tied else HEAD


def is_quantized(name: str, scheme: Scheme | None = None, tied: bool = False) -> bool:
    """True for the parameters a quantized model holds as QuantLinear (under scheme; None: the default head)."""
    if name in (HEAD, EMBED):
        return name == head_param(tied) and (scheme is None or scheme.head_bits is not None)
    parts = name.split(".", 2)
    return len(parts) == 3 and parts[0] == "layers" and parts[2] in LAYER_LINEARS


def quantize_param(name: str, w: torch.Tensor, scheme: Scheme, tied: bool = False) -> Stored:
    """w [N, K] or stacked experts [E, N, K] -> its stored form under scheme. The head (see head_param) takes the
    scheme's head_bits, int8 by default under int4 too: measured on stories260K with its head untied (a copy of the
    embedding), int4 everywhere costs +27.1% of perplexity, int4 with the head at int8 +21.7%, with the head in
    float +21.5%. llama.cpp's quantize keeps the output tensor (or a shared token_embd) at Q6_K under Q4_0, Q8_0
    where the row is not a multiple of 256 (Qwen2.5-0.5B's 896)."""
    if name == head_param(tied):
        scheme = scheme.for_head()
    if w.dim() == 3:
        return [scheme.quantize(w[e], f"{name}[{e}]") for e in range(w.shape[0])]
    return scheme.quantize(w, name)


def shape_error(stored: Stored, want: tuple[int, ...]) -> str | None:
    """Why stored does not fit a parameter of shape want, or None."""
    if isinstance(stored, list):
        if len(want) != 3 or len(stored) != want[0]:
            return f"{len(stored)} expert matrices for a parameter of shape {want}"
        got = {q.shape for q in stored}
        return None if got == {tuple(want[1:])} else f"expert matrices of shapes {sorted(got)}, want {want[1:]}"
    if len(want) != 2 or stored.shape != tuple(want):
        return f"shape {stored.shape}, want {want}"
    return None


def install(model: nn.Module, name: str, stored: Stored) -> None:
    """Replace parameter `name` of model (still on the meta device) by the prepared linear(s) of stored."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    if attr not in module._parameters:
        raise KeyError(f"{name} is not a parameter of the model")
    del module._parameters[attr]
    setattr(module, attr, [prepare(q) for q in stored] if isinstance(stored, list) else prepare(stored))


def quantized_nbytes(model: nn.Module) -> list[tuple[str, int]]:
    """(parameter name, bytes of its codes and scales) for every quantized parameter installed on model."""
    out = []
    for path, module in model.named_modules():
        for attr, v in vars(module).items():
            linears = v if isinstance(v, list) and v and isinstance(v[0], QuantLinear) else [v]
            if isinstance(linears[0], QuantLinear):
                out.append((f"{path}.{attr}" if path else attr, sum(q.qw.nbytes for q in linears)))
    return out


def nbytes(stored: Stored) -> int:
    return sum(q.nbytes for q in stored) if isinstance(stored, list) else stored.nbytes


def describe(groups: dict[str, Stored]) -> str:
    """'int4 x 20 (group 64: 12, per channel: 8), int8 x 5 (per channel)' for the log and the convert summary."""
    count: dict[int, dict[str, int]] = {}
    for stored in groups.values():
        for q in stored if isinstance(stored, list) else [stored]:
            g = "per channel" if q.group == q.shape[1] else f"group {q.group}"
            count.setdefault(q.bits, {}).setdefault(g, 0)
            count[q.bits][g] += 1
    return ", ".join(f"int{b} x {sum(c.values())} (" + ", ".join(f"{g}: {n}" for g, n in sorted(c.items())) + ")"
                     for b, c in sorted(count.items(), reverse=True))
