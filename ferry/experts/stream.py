"""Hand the expert store each MoE layer's output added to the residual stream, the moment the layer returns,
for predictors that guess later layers' experts from it (pre-gating). Forward hooks on the decoder's modules:
the model code does not know.

NOTE: a decoder layer adds its attention output into the residual tensor in place in post_attn_norm, and its
MoE output only at the next layer's input norm; the hook on post_attn_norm keeps a reference to that tensor
(its state after attention) until the MoE hook adds the MoE output to a copy. One forward at a time."""
from __future__ import annotations

from torch import nn

from ferry.experts.predictors import PreGatePredictor
from ferry.experts.store import ExpertStore


def tap_streams(model: nn.Module, store: ExpertStore) -> list:
    """Install the hooks on every MoE layer the store serves; returns their handles."""
    handles = []
    for layer in sorted(store.index.layer_files):
        block = model.layers[layer]
        seen: dict = {}

        def keep_residual(module, args, out, seen=seen) -> None:
            seen["residual"] = args[0]  # after this call: the residual stream with the attention output added

        def after_moe(module, args, out, seen=seen, layer=layer) -> None:
            store.after_layer(layer, seen.pop("residual") + out)  # [T, D]: what the next layer's input starts from

        handles += [block.post_attn_norm.register_forward_hook(keep_residual),
                    block.mlp.register_forward_hook(after_moe)]
    return handles


def attach_predictor(model: nn.Module, store: ExpertStore) -> None:
    """Give the store's predictor what it reads from the loaded model: the MoE layers' routers and their input
    norms (pre-gating), and the residual stream after each MoE layer (hooks above)."""
    layers = sorted(store.index.layer_files)
    if isinstance(store.predictor, PreGatePredictor):
        store.predictor.set_routers({l: model.layers[l].mlp.router for l in layers},
                                    {l: (model.layers[l].post_attn_norm.weight, model.layers[l].post_attn_norm.eps)
                                     for l in layers})
    if store.predictor.needs_stream:
        tap_streams(model, store)
