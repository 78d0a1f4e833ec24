"""
The fast inference path of the latent loop and the greedy answer: the same computation as model.generate
(the same prefix call, K fed-back states, greedy tokens), on a KV cache allocated once for prompt + K + answer
(transformers' StaticCache, which writes at its own in-place counter). Every latent step and every decode
step is then one call of one fixed shape:

    embeddings (B, 1, d)   the attention mask of the WHOLE cache (B, P + K + T), filled in place
    positions (3, B, 1)    the next M-RoPE position, the same on all three axes for text

so that on a GPU torch.compile can capture the step once (mode "reduce-overhead": CUDA graphs) and replay
it for every latent and decode step. On the CPU nothing is compiled, and there a static cache only costs (every
step attends over all its slots: 1.04x model.generate in bench/loop.py), so by default the CPU falls back to
model.generate itself (`static=True` forces the static cache anywhere). The cached unused slots are masked,
so the tokens are model.generate's (tests/test_fast_inference.py: identical ids, states within 1e-5, for
K = 0..4, one prompt and a left-padded batch). bench/loop.py and bench/gpu_check.py time it beside
model.generate.
"""
import torch
from transformers import StaticCache

import model as M
from model import LoopState


def text_step(backbone, embeds, mask, pos, cache):
    """One fixed-shape call of the LLM on the static cache -> hidden (B, 1, d)."""
    return backbone.model.language_model(inputs_embeds=embeds, attention_mask=mask, cache=cache,
                                         position_ids=pos, use_cache=True).last_hidden_state


def make_step(compile=None, device=None):
    """text_step, compiled with CUDA graphs where that pays (compile None: on a CUDA device only)."""
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if compile if compile is not None else on_gpu:
        return torch.compile(text_step, mode="reduce-overhead", dynamic=False)
    return text_step


@torch.no_grad()
def fast_generate(backbone, prefix, K, eos_id, max_new_tokens=32, step=text_step, static=None, readout="head"):
    """model.generate on a pre-allocated cache. -> (token ids (B, <= max_new_tokens), LoopState whose mask
    covers the whole static cache). static None: the static cache on a CUDA device, model.generate elsewhere.
    readout as in model.latent_loop ("cache": one more slot, h_K's)."""
    if not (static if static is not None else prefix["input_ids"].device.type == "cuda"):
        return M.generate(backbone, prefix, K, eos_id, max_new_tokens, readout=readout)
    if readout not in M.READOUTS:
        raise ValueError(f"readout must be one of {M.READOUTS}, not {readout!r}")
    inner = backbone.model
    B, P = prefix["input_ids"].shape
    L = P + K + int(readout == "cache" and K > 0) + max_new_tokens                   # every slot the call fills
    cache = StaticCache(config=backbone.config.text_config, max_cache_len=L)
    mask = prefix["attention_mask"].new_zeros(B, L)
    mask[:, :P] = prefix["attention_mask"]
    pos, delta = inner.get_rope_index(prefix["input_ids"], prefix["mm_token_type_ids"],
                                      image_grid_thw=prefix["image_grid_thw"],
                                      attention_mask=prefix["attention_mask"])
    out = inner(input_ids=prefix["input_ids"], attention_mask=mask[:, :P], position_ids=pos,
                pixel_values=prefix["pixel_values"], image_grid_thw=prefix["image_grid_thw"],
                mm_token_type_ids=prefix["mm_token_type_ids"], cache=cache, use_cache=True)
    st = LoopState(cache, mask, prefix["attention_mask"].sum(-1) + delta[:, 0], [out.last_hidden_state[:, -1:]])

    filled = P  # cache slots in use

    def advance(embeds):  # the next slot of the cache, at the next position
        nonlocal filled
        st.mask[:, filled] = 1
        filled += 1
        hid = step(backbone, embeds, st.mask, st.next_pos[None, :, None].expand(3, B, 1), cache)
        st.next_pos = st.next_pos + 1
        return hid

    for _ in range(K):
        st.h.append(advance(st.h[-1]))
    if readout == "cache" and K > 0:
        advance(st.h[-1])
    nxt = backbone.lm_head(st.h[-1])[:, -1].argmax(-1)
    out, done = [], torch.zeros_like(nxt, dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        out.append(nxt)
        done |= nxt == eos_id
        if done.all():
            break
        hid = advance(backbone.get_input_embeddings()(nxt[:, None]))
        nxt = backbone.lm_head(hid)[:, -1].argmax(-1)
    return torch.stack(out, dim=1), st
