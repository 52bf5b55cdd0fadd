"""ferry/quant/scheme.py: which bits and group size each matrix gets (FineQuant's adaptive granularity)."""
from __future__ import annotations

import pytest
import torch

from ferry.errors import InvalidRequest
from ferry.quant.model import is_quantized, quantize_param
from ferry.quant.scheme import Scheme, candidate_groups, relative_error


def test_candidate_groups_coarsest_first():
    assert candidate_groups(256) == [256, 128, 64, 32]
    assert candidate_groups(896) == [896, 448, 224, 32]
    assert candidate_groups(96) == [96, 32]
    assert candidate_groups(32) == [32]
    assert candidate_groups(172) == [172]  # no 32-input group fits: per channel only


def test_int4_group_follows_the_matrix_error():
    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(64, 512, generator=g)
    spiky = smooth.clone()
    spiky[:, ::50] *= 30  # an outlier every 50 inputs in every row: coarse groups lose the small weights
    s = Scheme(4, slack=0.15)
    q_smooth, q_spiky = s.quantize(smooth, "smooth"), s.quantize(spiky, "spiky")
    assert q_smooth.group > q_spiky.group
    for w, q in ((smooth, q_smooth), (spiky, q_spiky)):
        finest = relative_error(Scheme(4, group_size=32).quantize(w, "w"), w)
        assert relative_error(q, w) <= 1.15 * finest
        coarser = [c for c in candidate_groups(512) if c > q.group]  # the coarsest within the bound: not the next
        assert not coarser or relative_error(Scheme(4, group_size=coarser[-1]).quantize(w, "w"), w) > 1.15 * finest


def test_int8_is_per_channel_and_a_forced_group_applies():
    w = torch.randn(16, 128)
    assert Scheme.parse("int8").quantize(w, "w").group == 128
    assert Scheme.parse("int8", 64).quantize(w, "w").group == 64
    assert Scheme.parse("int4", 32).quantize(w, "w").group == 32
    with pytest.raises(InvalidRequest, match="does not fit w .*use one of 128, 64, 32"):
        Scheme.parse("int4", 96).quantize(w, "w")


def test_inputs_not_a_multiple_of_32_fall_back_to_int8_per_channel():
    q = Scheme.parse("int4").quantize(torch.randn(64, 172), "down")  # stories260K's down projection
    assert (q.bits, q.group) == (8, 172)
    assert Scheme.parse("int4", 32).quantize(torch.randn(64, 172), "down").bits == 8


def test_which_parameters_are_quantized():
    assert all(is_quantized(n) for n in ("lm_head", "layers.3.attn.qkv", "layers.0.attn.o", "layers.1.mlp.gate_up",
                                         "layers.1.mlp.experts.down", "layers.1.mlp.shared.down"))
    assert not any(is_quantized(n) for n in ("embed", "norm.weight", "layers.0.mlp.router", "layers.0.attn.qkv_bias",
                                             "layers.0.mlp.shared_gate", "layers.0.input_norm.weight"))


def test_the_head_is_the_embedding_of_a_tied_model_and_takes_its_own_bits():
    int4, none = Scheme.parse("int4"), Scheme.parse("int4", lm_head="none")
    assert is_quantized("embed", int4, tied=True) and not is_quantized("lm_head", int4, tied=True)
    assert is_quantized("lm_head", int4) and not is_quantized("embed", int4)
    assert not is_quantized("embed", none, tied=True) and not is_quantized("lm_head", none)
    assert (int4.head_bits, Scheme.parse("int8", lm_head="int4").head_bits) == (8, 4)
    w = torch.randn(96, 64)
    assert (quantize_param("embed", w, int4, tied=True).bits, quantize_param("lm_head", w, int4).bits) == (8, 8)
    assert quantize_param("layers.0.attn.o", w, int4).bits == 4
    with pytest.raises(InvalidRequest, match="quantization_lm_head must be int8, int4 or none"):
        Scheme.parse("int8", lm_head="fp8")
