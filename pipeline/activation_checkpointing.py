"""
Cache-safe activation checkpointing of the text decoder layers (train.py --grad-ckpt): the same gradients
as without it, several times fewer saved activations, each layer's forward run twice. The latent loop of
model.py appends to one KV-cache, which transformers' own checkpointing does not handle (see below).
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------------
# Activation checkpointing that keeps the cache right (train.py --grad-ckpt; tests/test_ckpt.py).
#     Without it every decoder layer keeps its inner tensors for backward (RMSNorm inputs in fp32, LoRA
#     dropout masks and inputs, q and the attention output, 3 x d_ff MLP tensors) for every prefix token:
#     ~2.6 GiB per 448-px sample at real size, K = 4. With it a layer keeps only its input and the K/V it
#     adds (~0.17 GiB per sample, bench/memory.py) and recomputes the rest in backward.
#     transformers' own checkpointing hands every layer cache=None: the loop would attend to nothing.
#     The trap: DynamicCache.update APPENDS, so a layer replayed in backward on the live cache would append
#     its K/V a second time and attend to the later steps. So the cache is handled OUTSIDE the replay:
#
#        this layer's past K/V chunks ──┐                                ┌──► its new K/V chunk (kept)
#        hidden_in ─────────────────────┴──► [ layer(hidden, _Slot(past)) ] ─┴──► hidden_out
#                                             checkpointed: replayed in backward from the same inputs
#
#     The replay reads the same chunks (tensors, not the live cache) and writes into its own _Slot only.
#     Keeping chunks rather than the concatenated cache also drops the full K/V copy that every step
#     would otherwise keep for backward. Dropout masks replay identically (the RNG state is restored).
# ----------------------------------------------------------------------------------------------------
class _Slot:
    """The cache one checkpointed layer call sees: that layer's past K/V chunks (read-only) + its own."""

    def __init__(self, past_k, past_v):
        self.past_k, self.past_v, self.new = past_k, past_v, None

    def update(self, k, v, *args, **kwargs):  # what the attention calls: cache.update(k, v, layer_idx)
        self.new = (k, v)                                                               # (B, H_kv, T, hd)
        return torch.cat(self.past_k + [k], dim=-2), torch.cat(self.past_v + [v], dim=-2)


def _checkpointed_layer(layer, forward, hidden_states, *args, cache=None, **kwargs):
    """A decoder layer's forward under torch.utils.checkpoint with the cache outside the replayed region.
    The live DynamicCache keeps its usual content (the next call's mask reads its length); the K/V
    chunks the backward needs are listed on it as `cache.ckpt_chunks[layer_idx]`."""
    if not torch.is_grad_enabled():  # inference: no backward, nothing to replay
        return forward(hidden_states, *args, cache=cache, **kwargs)
    if cache is None:                # a call without a cache (nothing appended): a plain checkpoint
        return checkpoint(lambda h: forward(h, *args, **kwargs), hidden_states, use_reentrant=False)
    idx = layer.self_attn.layer_idx
    live = cache.layers[idx]
    ks, vs = cache.__dict__.setdefault("ckpt_chunks", {}).get(idx, ([], []))
    if sum(k.shape[-2] for k in ks) != live.get_seq_length():  # filled without checkpointing: start there
        ks, vs = ([live.keys], [live.values]) if live.get_seq_length() else ([], [])
    n = len(ks)

    def run(h, *past):  # everything it reads is an argument: the replay sees exactly the same inputs
        slot = _Slot(list(past[:n]), list(past[n:]))
        return forward(h, *args, cache=slot, **kwargs), *slot.new

    out, k, v = checkpoint(run, hidden_states, *ks, *vs, use_reentrant=False)
    cache.ckpt_chunks[idx] = (ks + [k], vs + [v])
    with torch.no_grad():  # the live cache, as an uncheckpointed call would have left it (no graph)
        if not live.is_initialized:
            live.lazy_initialization(k, v)
        live.keys, live.values = torch.cat(ks + [k], dim=-2), torch.cat(vs + [v], dim=-2)
    return out


def set_checkpointing(vital, on=True):
    """Checkpoint (on) or not (off) every text decoder layer of the backbone and of the auxiliary decoder.
    The vision tower needs none: it is frozen and its input needs no gradient, so it saves nothing."""
    layers = list(vital.backbone.model.language_model.layers)
    layers += list(vital.decoder.model.layers) if getattr(vital, "decoder", None) is not None else []
    for layer in layers:
        if on:  # an instance attribute shadows the class's forward; the module tree and weights are unchanged
            layer.forward = functools.partial(_checkpointed_layer, layer, type(layer).forward.__get__(layer))
        else:
            layer.__dict__.pop("forward", None)

