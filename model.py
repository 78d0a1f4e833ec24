"""
VITAL model: a frozen Qwen3-VL backbone with hand-written LoRA that reasons for K steps in continuous
hidden states, plus the two training-time scaffolds that supervise every step (paper §3, §B).

    image + question --(Qwen3-VL prefix forward)--> h_0, KV-cache            §3.2 prefix encoding
    h_k = LM(inputs_embeds = h_{k-1}; same cache), k = 1..K                  §3.2 eq. (1), recurrent loop
    answer tokens on the same cache; lm_head(h_K) predicts the first one     §3.2 eq. (2)
    training only:  decoder([pj_in(h_k), r_k]) reconstructs sentence r_k     §3.3 L_sem
                    VP(h_k) regresses the frozen MedSigLIP ROI feature       §3.3 L_vis
    L = L_task + lambda_sem * L_sem + lambda_vis * L_vis                     §3.5 eq. (7)

The loop is ONE function (`latent_loop`) used by training, evaluation and explanation: there is no
teacher forcing and no parallel shortcut, so training and inference run the identical path.
Everything here is hand-written on purpose where the paper's idea lives (LoRA, the loop, the heads,
the losses); the backbone, decoder, encoder, tokenizers and processors are plain `transformers` classes
loaded with `from_pretrained(folder)`.

Commands:
    python model.py info runs/tiny             # parameter counts of a model folder set
(The tiny models of the same classes, for the tests and the demo, are written by demo/tiny.py.)
"""
import argparse
import functools
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
import numpy as np
from PIL import Image
from transformers import (AutoTokenizer, DynamicCache, Qwen2VLImageProcessorPil, Qwen3ForCausalLM,
                          Qwen3VLForConditionalGeneration, Qwen3VLProcessor, SiglipImageProcessorPil,
                          SiglipVisionModel)
from transformers.utils import is_accelerate_available

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------------
# 1. LoRA (Hu et al. 2021), hand-written. Paper §4.1/§B.2: r = 64 (174.6M params on 36 layers), alpha =
#    128 (chosen), dropout 0.05 on the LoRA input only, all attention and MLP projections of the LLM.
#
#        x ──► W (frozen) ─────────────┐
#        │                             + ──► y          A: (r, in)  kaiming-uniform(a=sqrt(5))
#        └─► dropout ─► A ─► B ─► *s ──┘                B: (out, r) zeros
#                                                       =>  y == W x at init
# ----------------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r=64, alpha=128, dropout=0.05):
        super().__init__()
        self.base = base  # frozen; keeps its dtype (bf16 on GPU)
        dev = base.weight.device
        # LoRA weights live in fp32 whatever the base dtype: they are what the optimiser updates.
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        if self.merged:  # W already holds W + s*BA: exactly one matmul, as in the plain backbone
            return F.linear(x, self.base.weight, self.base.bias)
        y = self.base(x)
        z = self.dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(z, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    def delta_weight(self):  # s * B @ A in fp32, shape of W
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self):
        if self.merged:
            raise RuntimeError("LoRA already merged")
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))  # add in fp32, cast back to the base dtype
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("LoRA is not merged")
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False


def add_lora(backbone, r=64, alpha=128, dropout=0.05):
    """Freeze every backbone weight, then wrap q,k,v,o,gate,up,down of each LLM decoder layer (never the
    vision tower) in a LoRALinear. Returns the number of wrapped projections."""
    backbone.requires_grad_(False)
    n = 0
    for layer in backbone.model.language_model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                if isinstance(getattr(block, name, None), nn.Linear):
                    setattr(block, name, LoRALinear(getattr(block, name), r, alpha, dropout))
                    n += 1
    return n


def lora_layers(module):
    return [m for m in module.modules() if isinstance(m, LoRALinear)]


def set_lora_merged(module, merged: bool):
    """Explicit switch: merge (W <- W + sBA, for inference) or unmerge (training) every LoRA layer."""
    for m in lora_layers(module):
        if m.merged != merged:
            m.merge() if merged else m.unmerge()


def fold_lora(module):
    """Deployment: merge, then put each base nn.Linear (now holding W + sBA) back in its wrapper's place.
    The model is then module-for-module the plain backbone: zero extra parameters, memory or latency.
    One-way: the A/B matrices are dropped (keep adapter.safetensors to train further)."""
    set_lora_merged(module, True)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.base)


# ----------------------------------------------------------------------------------------------------
# 2. Loading checkpoints from local folders. Real runs: Qwen3-VL-8B-Instruct, Qwen3-1.7B, MedSigLIP-448.
#    Tests and the demo: tiny models of the SAME classes written by demo/tiny.py and read back here.
# ----------------------------------------------------------------------------------------------------
class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without its video processor (which needs torchvision): images and text only.
    Token expansion of <|image_pad|> and mm_token_type_ids (needed by M-RoPE) come from the parent."""
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _check_folder(path, model_types, what):
    cfg = os.path.join(str(path), "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"{what}: no model folder at '{path}' (missing {cfg})")
    with open(cfg) as f:
        mt = json.load(f).get("model_type")
    if mt not in model_types:
        raise ValueError(f"{what}: '{path}' holds a '{mt}' model, expected one of {model_types}")


# The image pixel cap every stage applies (train.py --max-pixels): 448 x 448 = 200,704 pixels = 196 visual
# tokens (one per 32 x 32 pixels). Why 448: it is the resolution of the ROI targets (MedSigLIP-448), so the
# backbone sees the detail the targets were made from; MSD's 512 x 512 slices lose little; BiomedParse's
# 1024 x 1024 images would otherwise cost ~1,000 tokens and ~4x the activation memory each; and with it the
# default batch fits an 80 GB card (train.py --plan). Qwen3-VL's own processor allows up to ~16.7 M pixels.
MAX_PIXELS = 448 * 448


def _from_pretrained(cls, path, dtype, device):
    """cls.from_pretrained with the weights read straight onto `device`. With 6 ranks, loading on the host
    and then calling .to(device) would hold 6 full host copies at once (6 x 17 GB for Qwen3-VL-8B); with
    device_map={"": device} transformers materialises each tensor on the rank's own device. On CPU the host
    is the target, so the plain call is kept (same weights, bit for bit, and no accelerate needed)."""
    device = torch.device(device)
    if device.type == "cpu":
        return cls.from_pretrained(path, dtype=dtype)
    if not is_accelerate_available():  # transformers needs accelerate for device_map
        print(f"[model] accelerate is not installed: loading {path} on the host, then moving it to {device}")
        return cls.from_pretrained(path, dtype=dtype).to(device)
    return cls.from_pretrained(path, dtype=dtype, device_map={"": device})


def load_backbone(path, dtype=torch.float32, device="cpu", max_pixels=MAX_PIXELS):
    """Qwen3-VL backbone + its image-only processor (prefixes are LEFT-padded: h_0 is the last column)."""
    _check_folder(path, ("qwen3_vl",), "backbone")
    model = _from_pretrained(Qwen3VLForConditionalGeneration, path, dtype, device).eval()
    return model, load_processor(path, max_pixels)


def load_processor(path, max_pixels=MAX_PIXELS):
    """The backbone folder's image-only processor. max_pixels caps its resize (never raises the folder's
    own cap; None or 0: the folder's)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    if max_pixels:
        image_processor.size["longest_edge"] = min(image_processor.size["longest_edge"], max_pixels)
    return ImageOnlyQwen3VLProcessor(image_processor, tokenizer, chat_template=chat_template(path, tokenizer))


def chat_template(path, tokenizer):
    """The chat template: the tokenizer's own, else the folder's chat_template.json (where processor
    checkpoints such as Qwen3-VL-8B-Instruct keep it) or chat_template.jinja, else None (build_prefix's
    apply_chat_template then raises)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    for name in ("chat_template.json", "chat_template.jinja"):
        file = os.path.join(str(path), name)
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f)["chat_template"] if name.endswith(".json") else f.read()
    return None


def load_decoder(path, dtype=torch.float32, device="cpu"):
    """Auxiliary text decoder (Qwen3-1.7B in the paper): its own embeddings, head and tokenizer."""
    _check_folder(path, ("qwen3",), "decoder")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    return _from_pretrained(Qwen3ForCausalLM, path, dtype, device), tokenizer


def load_encoder(path, dtype=torch.float32, device="cpu"):
    """Frozen SigLIP vision tower (MedSigLIP-448) + image processor; used for ROI targets and explain."""
    _check_folder(path, ("siglip_vision_model", "siglip"), "encoder")
    model = _from_pretrained(SiglipVisionModel, path, dtype, device).eval().requires_grad_(False)
    return model, SiglipImageProcessorPil.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------
# 3. The prompt contract (owned here; every stage imports it). Student view = raw image + question, with its
#    options when the item is asked closed-ended (`ask`). Prefix: chat-formatted user turn, generation prompt
#    open, LEFT-padded, so that h_0 is column -1.
#    Answer: right-padded, ends with <|im_end|>. Step sentences r_k: decoder tokens, each ending in EOS.
# ----------------------------------------------------------------------------------------------------
def load_image(path):
    """The student view of an image file, the same pixels for every stage (training, evaluation, ROI
    features, explanation) -> RGB PIL image. Grey 8-bit -> 3 identical channels; 16-bit or float grey is
    scaled min-max to 8 bits first (PIL's own convert would clip it); RGBA drops its alpha."""
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I") or im.mode == "F":
            a = np.asarray(im, dtype=np.float32)
            lo, hi = float(a.min()), float(a.max())
            im = Image.fromarray(((a - lo) / max(hi - lo, 1e-8) * 255).round().astype(np.uint8))
        return im.convert("RGB")


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def ask(question, choices=None):
    """The text of the user turn. Without choices: the question unchanged (explain.py's free question). With
    choices (§B.4: every QA pair is asked closed-ended): the question, the options one a line as "(A) text",
    then one instruction line. train.py, evaluate.py and the demo all ask through here, so an item is asked
    with the identical text in training and evaluation."""
    if not choices:
        return question
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices: the options are lettered A-Z, at most {len(LETTERS)}")
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\nAnswer with one of the options."


def build_prefix(processor, images, questions):
    """-> BatchFeature(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    for i, im in enumerate(images):
        if im is None:
            raise ValueError(f"prompt {i} has no image: VITAL answers questions about an image")
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q in questions]
    images = [im.convert("RGB") for im in images]
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


def tokenize_answers(tokenizer, answers):
    """-> (ids, mask), (B, T) right-padded; every answer ends with <|im_end|> so generation can stop."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seqs = [tokenizer(a, add_special_tokens=False)["input_ids"] + [end] for a in answers]
    return _pad_right(seqs, tokenizer.pad_token_id)


def tokenize_steps(dec_tokenizer, chains, K):
    """Reasoning sentences for the decoder -> (ids, mask), (B, K, L); missing steps are all padding."""
    eos = dec_tokenizer.eos_token_id
    seqs = []
    for chain in chains:
        for k in range(K):
            seqs.append(dec_tokenizer(chain[k], add_special_tokens=False)["input_ids"] + [eos]
                        if k < len(chain) else [])
    ids, mask = _pad_right(seqs, dec_tokenizer.pad_token_id)
    return ids.view(len(chains), K, -1), mask.view(len(chains), K, -1)


def make_batch(processor, dec_tokenizer, images, questions, answers, chains=None, K=0, roi=None, glob=None):
    """Everything VITAL.forward needs for one K-bucket of samples (images are PIL images)."""
    batch = dict(prefix=build_prefix(processor, images, questions))
    batch["answer_ids"], batch["answer_mask"] = tokenize_answers(processor.tokenizer, answers)
    if chains is not None and dec_tokenizer is not None and K > 0:
        batch["step_ids"], batch["step_mask"] = tokenize_steps(dec_tokenizer, chains, K)
    if roi is not None:
        batch["roi"] = roi
    if glob is not None:
        batch["global"] = glob
    return batch


def batch_to(batch, device):
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def _pad_right(seqs, pad_id):
    T = max([len(s) for s in seqs] + [1])
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------
# 4. The recurrent latent loop on one KV-cache (§3.2). transformers traps (found by probing the pinned
#    transformers 5.24; test_cached_loop_equals_one_full_forward in tests/test_model.py guards them):
#    pass explicit M-RoPE position_ids AND the full 2-D attention mask (past + new columns) on every call;
#    never pass pixel values after the prefix; the cache argument is `cache=`.
# ----------------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    cache: DynamicCache
    mask: torch.Tensor      # (B, S) attention mask over everything in the cache
    next_pos: torch.Tensor  # (B,) the next free M-RoPE position (same on all three axes for text)
    h: list                 # [h_0, ..., h_K], each (B, 1, d), post-final-norm (what feeds lm_head)


def _text_step(backbone, embeds, st: LoopState, valid=None):
    """Append `embeds` (B, T, d) to the cache at positions next_pos + [0, T); return hidden (B, T, d)."""
    B, T, _ = embeds.shape
    valid = torch.ones(B, T, dtype=st.mask.dtype, device=embeds.device) if valid is None else valid
    st.mask = torch.cat([st.mask, valid.to(st.mask.dtype)], dim=1)                         # (B, S+T)
    pos = st.next_pos[:, None] + torch.arange(T, device=embeds.device)                    # (B, T)
    out = backbone.model.language_model(inputs_embeds=embeds, attention_mask=st.mask, cache=st.cache,
                                        position_ids=pos[None].expand(3, B, T), use_cache=True)
    st.next_pos = st.next_pos + T
    return out.last_hidden_state


def prefix_forward(backbone, prefix):
    """The only call that sees pixels: vision tower + deepstack + LLM over the padded prompt -> h_0."""
    inner = backbone.model
    pos, delta = inner.get_rope_index(prefix["input_ids"], prefix["mm_token_type_ids"],
                                      image_grid_thw=prefix["image_grid_thw"],
                                      attention_mask=prefix["attention_mask"])                # (3,B,P), (B,1)
    cache = DynamicCache(config=backbone.config.text_config)
    out = inner(input_ids=prefix["input_ids"], attention_mask=prefix["attention_mask"], position_ids=pos,
                pixel_values=prefix["pixel_values"], image_grid_thw=prefix["image_grid_thw"],
                mm_token_type_ids=prefix["mm_token_type_ids"], cache=cache, use_cache=True)
    next_pos = prefix["attention_mask"].sum(-1) + delta[:, 0]                                # max pos + 1
    return LoopState(cache, prefix["attention_mask"], next_pos, [out.last_hidden_state[:, -1:]])


def latent_loop(backbone, prefix, K, feed=None):
    """Prefix, then K single-position steps with inputs_embeds = h_{k-1} on the same cache (eq. 1).
    Gradients flow through the cache and the fed-back states: nothing is detached.
    feed: the loop's one intervention point, for probes only (evaluate.py --probe). feed(k, st) returns
    the (B, 1, d) input embedding of latent step k = 1..K, with st.h = [h_0, ..., h_{k-1}] so far;
    None is the method itself: h_{k-1} = st.h[-1]."""
    st = prefix_forward(backbone, prefix)
    for k in range(1, K + 1):
        x = st.h[-1] if feed is None else feed(k, st)                                      # (B, 1, d)
        st.h.append(_text_step(backbone, x, st))                                            # h_k: (B, 1, d)
    return st


def answer_logits(backbone, st: LoopState, answer_ids, answer_mask):
    """Teacher-forced answer on the same cache: logits (B, T, V) where position j predicts token j.
    Token 0 comes from lm_head(h_K) (eq. 2); token j > 0 from the hidden state of answer token j-1."""
    emb = backbone.get_input_embeddings()(answer_ids)                                       # (B, T, d)
    hid = _text_step(backbone, emb, st, valid=answer_mask)                                 # (B, T, d)
    return backbone.lm_head(torch.cat([st.h[-1], hid[:, :-1]], dim=1))


@torch.no_grad()
def generate(backbone, prefix, K, eos_id, max_new_tokens=32, feed=None):
    """Greedy answer after K latent steps (inference: scaffolds neither loaded nor used); `feed` as in
    latent_loop. Returns (token ids (B, <=max_new_tokens) with eos/padding after the end, the LoopState)."""
    st = latent_loop(backbone, prefix, K, feed)
    nxt = backbone.lm_head(st.h[-1])[:, -1].argmax(-1)                                      # (B,)
    out, done = [], torch.zeros_like(nxt, dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        out.append(nxt)
        done |= nxt == eos_id
        if done.all():
            break
        hid = _text_step(backbone, backbone.get_input_embeddings()(nxt[:, None]), st)
        nxt = backbone.lm_head(hid)[:, -1].argmax(-1)
    return torch.stack(out, dim=1), st


# ----------------------------------------------------------------------------------------------------
# 4b. Activation checkpointing that keeps the cache right (train.py --grad-ckpt; tests/test_ckpt.py).
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


# ----------------------------------------------------------------------------------------------------
# 5. Training-time scaffolds (§3.3, §B.2): visual projector, pj_in, auxiliary text decoder.
# ----------------------------------------------------------------------------------------------------
class VisualProjector(nn.Module):
    """VP(h) = LN_out(W2(h' + Dropout(GELU(W1 h')))), h' = LN_in(h)   (eq. 5; 21.51M at d=4096, d_v=1152).
    `kind` gives the Table 13 ablations: linear | mlp | mlp_ln | res_mlp_ln (default) | transformer."""
    KINDS = ("linear", "mlp", "mlp_ln", "res_mlp_ln", "transformer")

    def __init__(self, d, d_v, kind="res_mlp_ln", dropout=0.1):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"projector kind '{kind}' is not one of {self.KINDS}")
        self.kind = kind
        if kind == "linear":
            self.out = nn.Linear(d, d_v)
            return
        norm = kind != "mlp"
        self.ln_in = nn.LayerNorm(d) if norm and kind != "transformer" else nn.Identity()
        if kind == "transformer":  # self-attention over the single latent token + its MLP (Table 13 e)
            self.block = nn.TransformerEncoderLayer(d, max(1, d // 128), dim_feedforward=d, dropout=dropout,
                                                    activation="gelu", batch_first=True, norm_first=True)
        else:
            self.fc = nn.Linear(d, d)
            self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d, d_v)
        self.ln_out = nn.LayerNorm(d_v) if norm else nn.Identity()
        if norm:
            # (chosen) start LN_out's gain at 1/sqrt(d_v) so that ||VP(h)|| ~ 1 like the L2-normalised
            # targets; LN_out then "re-scales to the feature space" from step 0 instead of from norm ~34.
            nn.init.constant_(self.ln_out.weight, 1 / math.sqrt(d_v))

    def forward(self, h):  # (..., d) -> (..., d_v)
        if self.kind == "linear":
            return self.out(h)
        if self.kind == "transformer":
            x = self.block(h.reshape(-1, 1, h.shape[-1])).reshape(h.shape)
        else:
            x = self.ln_in(h)
            y = self.drop(F.gelu(self.fc(x)))
            x = x + y if self.kind == "res_mlp_ln" else y  # residual in d space only for res_mlp_ln
        return self.ln_out(self.out(x))


def decoder_loss(decoder, pj_in, h, step_ids, step_mask):
    """L_sem (eq. 4) for all B x K steps in ONE decoder call.
    Step k's input is [pj_in(h_k), embed(r_k[:-1])]: position 0 predicts r_k's first token.
    h: (B, K, d); step_ids/mask: (B, K, L). Per-step token-mean CE, averaged over valid steps (fp32)."""
    B, K, L = step_ids.shape
    x0 = pj_in(h.reshape(B * K, 1, -1))                                                    # (BK, 1, d_dec)
    emb = decoder.get_input_embeddings()(step_ids.reshape(B * K, L)[:, :-1])               # (BK, L-1, d_dec)
    inp = torch.cat([x0.to(emb.dtype), emb], dim=1)                                         # (BK, L, d_dec)
    attn = torch.cat([torch.ones_like(step_mask.reshape(B * K, L)[:, :1]),
                      step_mask.reshape(B * K, L)[:, :-1]], 1)
    logits = decoder(inputs_embeds=inp, attention_mask=attn).logits.float()                 # (BK, L, V)
    m = step_mask.reshape(B * K, L).float()
    ce = F.cross_entropy(logits.transpose(1, 2), step_ids.reshape(B * K, L), reduction="none")  # (BK, L)
    ntok = m.sum(-1)
    valid = ntok > 0
    per_step = (ce * m).sum(-1) / ntok.clamp(min=1)
    return per_step[valid].mean()


def visual_targets(roi, glob, K, per_step=False):
    """Shared target (default, §3.3): every step regresses v_roi. Per-step ablation (§C.5, eq. 8):
    v_k = (1 - a_k) v_global + a_k v_roi with a_k = k / K, coarse-to-fine. -> (B, K, d_v)."""
    if not per_step:
        return roi[:, None].expand(-1, K, -1)
    a = torch.arange(1, K + 1, device=roi.device, dtype=roi.dtype)[None, :, None] / K
    return (1 - a) * glob[:, None] + a * roi[:, None]


# ----------------------------------------------------------------------------------------------------
# 6. VITAL: backbone (+LoRA) and optional scaffolds; forward returns the joint loss of eq. (7).
# ----------------------------------------------------------------------------------------------------
class VITAL(nn.Module):
    def __init__(self, backbone, decoder=None, d_v=None, projector="res_mlp_ln", lambda_sem=1.0,
                 lambda_vis=0.1, vp_dropout=0.1):
        super().__init__()
        self.backbone = backbone
        d = backbone.config.text_config.hidden_size
        # A scaffold whose weight is 0 is not built at all (nothing to train, nothing to synchronise).
        self.decoder = decoder if (decoder is not None and lambda_sem > 0) else None
        self.pj_in = nn.Linear(d, self.decoder.config.hidden_size) if self.decoder is not None else None
        self.vp = VisualProjector(d, d_v, projector, vp_dropout) if (d_v and lambda_vis > 0) else None
        self.lambda_sem, self.lambda_vis = lambda_sem, lambda_vis

    def forward(self, batch, K, per_step_target=False, vis_all_steps=False):
        """batch: prefix (BatchFeature), answer_ids/mask (B,T), step_ids/mask (B,K,L), roi/global (B,d_v).
        Returns dict(loss, L_task, L_sem, L_vis, h) with h = (B, K, d) latent states h_1..h_K.
        L_sem (eq. 4) averages the valid steps only: a step without a sentence (all-padding step_mask) has
        nothing to decode. L_vis (eq. 6) averages the same valid steps by default; vis_all_steps=True counts
        all K steps of every sample, since its target needs no sentence (train.py --depth phase: a chain
        shorter than the batch's K still regresses v_roi at its later steps)."""
        st = latent_loop(self.backbone, batch["prefix"], K)
        logits = answer_logits(self.backbone, st, batch["answer_ids"], batch["answer_mask"]).float()
        tgt = batch["answer_ids"].masked_fill(batch["answer_mask"] == 0, -100)          # padding never counts
        L_task = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100)
        zero = logits.new_zeros(())
        h = torch.cat(st.h[1:], dim=1) if K > 0 else logits.new_zeros(logits.shape[0], 0, 1)  # (B, K, d)
        L_sem = L_vis = zero
        if K > 0 and self.decoder is not None:
            L_sem = decoder_loss(self.decoder, self.pj_in, h, batch["step_ids"], batch["step_mask"])
        if K > 0 and self.vp is not None:
            valid = ((batch["step_mask"].sum(-1) > 0).float() if "step_mask" in batch and not vis_all_steps
                     else h.new_ones(h.shape[:2]))                                        # (B, K) weights
            tgt_v = visual_targets(batch["roi"].float(), batch.get("global", batch["roi"]).float(), K,
                                   per_step_target)
            l1 = (self.vp(h).float() - tgt_v).abs().mean(-1)                              # (B, K), L1 (eq. 6)
            L_vis = (l1 * valid).sum() / valid.sum().clamp(min=1)
        loss = L_task + self.lambda_sem * L_sem + self.lambda_vis * L_vis
        return dict(loss=loss, L_task=L_task, L_sem=L_sem, L_vis=L_vis, h=h)

    def trainable_state_dict(self):
        """Only what training changes: LoRA A/B (adapter) and the scaffolds, keys without wrappers."""
        adapter = {n: p.detach() for n, p in self.backbone.named_parameters() if ".lora_" in n}
        scaffold = {n: p.detach() for n, p in self.named_parameters() if not n.startswith("backbone.")}
        return adapter, scaffold


@torch.no_grad()
def decode_latent(decoder, pj_in, dec_tokenizer, h, max_new_tokens=40):
    """Text window (§3.3): read a latent h (N, d) out as a sentence through pj_in + decoder (greedy)."""
    # pj_in is trained in fp32 while h comes from a bf16 backbone on a GPU: compute in pj_in's dtype
    x = pj_in(h.reshape(-1, 1, h.shape[-1]).to(pj_in.weight.dtype)).to(decoder.dtype)     # (N, 1, d_dec)
    ids = decoder.generate(inputs_embeds=x,
                           attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=x.device),
                           max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=dec_tokenizer.eos_token_id, pad_token_id=dec_tokenizer.pad_token_id)
    return [s.strip() for s in dec_tokenizer.batch_decode(ids, skip_special_tokens=True)]


@torch.no_grad()
def project_latent(vp, h):
    """Visual window (§3.3): VP(h) in the frozen encoder's feature space, L2-normalised. (N, d_v)."""
    return F.normalize(vp(h.to(vp.out.weight.dtype)).float(), dim=-1)  # h may be bf16, vp fp32


# ----------------------------------------------------------------------------------------------------
# 7. Save / load: safetensors for tensors, JSON for metadata, atomic folder writes, PEFT export.
# ----------------------------------------------------------------------------------------------------
class CheckpointError(Exception):
    """A checkpoint folder that is missing or lacks a field; the stages print it as one line."""


def read_ckpt_config(folder):
    """config.json of a checkpoint folder runs/<name>/phase<p>/ (it must hold adapter.safetensors too)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at '{folder}' (missing config.json; train.py writes "
                              "runs/<name>/phase<p>/)")
    if not os.path.isfile(os.path.join(folder, "adapter.safetensors")):
        raise CheckpointError(f"checkpoint '{folder}' has no adapter.safetensors")
    with open(path) as f:
        return json.load(f)


def ckpt_field(config, folder, *keys):
    """First present value of `keys` in a checkpoint config ('args.x' reads config['args']['x'])."""
    for k in keys:
        v = config
        for part in k.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v is not None:
            return v
    raise CheckpointError(f"{folder}/config.json: no field {' or '.join(repr(k) for k in keys)}")


def save_checkpoint(folder, vital: VITAL, config: dict, extra_files=None):
    """Write adapter.safetensors, scaffold.safetensors and config.json into folder atomically: everything
    goes to folder.tmp first and is renamed into place only when complete.
    extra_files: {name: writer(path)}."""
    tmp, old = folder.rstrip("/") + ".tmp", folder.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    adapter, scaffold = vital.trainable_state_dict()
    save_file({k: v.contiguous().cpu() for k, v in adapter.items()}, os.path.join(tmp, "adapter.safetensors"))
    if scaffold:
        save_file({k: v.contiguous().cpu() for k, v in scaffold.items()},
                  os.path.join(tmp, "scaffold.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, allow_nan=False)
    for name, writer in (extra_files or {}).items():
        writer(os.path.join(tmp, name))
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_into(module, tensors, path):
    own = dict(module.named_parameters())
    for k, v in tensors.items():
        if k not in own:
            raise ValueError(f"{path}: tensor '{k}' has no place in this model (another architecture?)")
        if own[k].shape != v.shape:
            raise ValueError(f"{path}: '{k}' has shape {tuple(v.shape)}, "
                             f"this model expects {tuple(own[k].shape)} "
                             "(checkpoint of another width or LoRA rank?)")
        with torch.no_grad():
            own[k].copy_(v)
    return len(tensors)


def load_checkpoint(folder, vital: VITAL, scaffolds=True):
    """Load adapter (+ scaffolds) saved by save_checkpoint into an already-built VITAL. Returns config."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no checkpoint at '{folder}' (missing config.json)")
    with open(cfg_path) as f:
        config = json.load(f)
    adapter = load_file(os.path.join(folder, "adapter.safetensors"))
    expected = {n for n, _ in vital.backbone.named_parameters() if ".lora_" in n}
    if set(adapter) != expected:
        missing = sorted(expected - set(adapter))[:3] or sorted(set(adapter) - expected)[:3]
        raise ValueError(f"{folder}/adapter.safetensors does not match this backbone's LoRA layers "
                         f"(e.g. {missing})")
    _load_into(vital.backbone, adapter, f"{folder}/adapter.safetensors")
    sc_path = os.path.join(folder, "scaffold.safetensors")
    if scaffolds and os.path.isfile(sc_path):
        _load_into(vital, load_file(sc_path), sc_path)
    return config


def export_peft(folder, vital: VITAL, base_model_path=""):
    """PEFT-format copy of the adapter: adapter_model.safetensors + adapter_config.json."""
    layers = lora_layers(vital.backbone)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for n, p in vital.backbone.named_parameters():
        if ".lora_" in n:
            mod, which = n.rsplit(".", 1)  # "...q_proj", "lora_A"
            tensors[f"base_model.model.{mod}.{which}.weight"] = p.detach().contiguous().cpu()
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    cfg = dict(peft_type="LORA", task_type=None, r=layers[0].r, lora_alpha=layers[0].alpha,
               lora_dropout=layers[0].dropout.p, bias="none", fan_in_fan_out=False, inference_mode=True,
               init_lora_weights=True, base_model_name_or_path=base_model_path,
               target_modules=(r".*language_model\.layers\.\d+\.(self_attn|mlp)\.("
                               + "|".join(LORA_TARGETS) + ")"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, allow_nan=False)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def main():
    ap = argparse.ArgumentParser(description="VITAL model utilities")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="print parameter counts of backbone/decoder/encoder under a folder")
    i.add_argument("folder", help="folder with backbone/, decoder/, encoder/")
    args = ap.parse_args()
    bb, _ = load_backbone(os.path.join(args.folder, "backbone"))
    dec, _ = load_decoder(os.path.join(args.folder, "decoder"))
    enc, _ = load_encoder(os.path.join(args.folder, "encoder"))
    n_lora = add_lora(bb)
    print(f"backbone {count_params(bb) / 1e6:.2f}M (LoRA layers {n_lora}), "
          f"decoder {count_params(dec) / 1e6:.2f}M, encoder {count_params(enc) / 1e6:.2f}M")


if __name__ == "__main__":
    main()
