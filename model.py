"""
VITAL, the method (paper §3, §B): a frozen Qwen3-VL backbone with hand-written LoRA reasons for K steps in
continuous hidden states on one KV-cache, then answers; two training-time scaffolds supervise every step.

    image + question --(Qwen3-VL prefix forward)--> h_0, KV-cache            §3.2 prefix encoding
    h_k = LM(inputs_embeds = h_{k-1}; same cache), k = 1..K                  §3.2 eq. (1), recurrent loop
    answer tokens on the same cache; lm_head(h_K) predicts the first one     §3.2 eq. (2)
    training only:  decoder([pj_in(h_k), r_k]) reconstructs sentence r_k     §3.3 L_sem
                    VP(h_k) regresses the frozen MedSigLIP ROI feature       §3.3 L_vis
    L = L_task + lambda_sem * L_sem + lambda_vis * L_vis                     §3.5 eq. (7)

Read top to bottom: 1. LoRA, 2. the latent loop (`latent_loop`, used by training, evaluation and
explanation alike: no teacher forcing, no parallel shortcut), 3. the scaffolds, 4. VITAL's forward and
joint loss, 5. reading a latent back out (the text and visual windows). This file imports torch and
transformers only. Loading model folders, the prompt contract, batching and checkpoint files live in
pipeline/io.py; the cache-safe activation checkpointing (train.py --grad-ckpt) in pipeline/activation_checkpointing.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache

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
# 2. The recurrent latent loop on one KV-cache (§3.2). transformers traps (found by probing the pinned
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


READOUTS = ("head", "cache")


def latent_loop(backbone, prefix, K, feed=None, readout="head"):
    """Prefix, then K single-position steps with inputs_embeds = h_{k-1} on the same cache (eq. 1).
    Gradients flow through the cache and the fed-back states: nothing is detached.
    feed: the loop's one intervention point, for probes only (evaluate.py --probe). feed(k, st) returns
    the (B, 1, d) input embedding of latent step k = 1..K, with st.h = [h_0, ..., h_{k-1}] so far;
    None is the method itself: h_{k-1} = st.h[-1].
    readout: how the answer reads h_K. "head" (eq. 2, the paper's): lm_head(h_K) predicts the first answer
    token, and h_K itself never enters the cache, so the later answer tokens see only h_0..h_{K-1}'s positions.
    "cache" (an option, train.py --readout cache): h_K is also written to the cache as one more position
    (its output is discarded; the first token is still lm_head(h_K)), so every answer token can attend to it."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, not {readout!r}")
    st = prefix_forward(backbone, prefix)
    for k in range(1, K + 1):
        x = st.h[-1] if feed is None else feed(k, st)                                      # (B, 1, d)
        st.h.append(_text_step(backbone, x, st))                                            # h_k: (B, 1, d)
    if readout == "cache" and K > 0:
        _text_step(backbone, st.h[-1], st)                                                   # h_K at position K+1
    return st


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


def answer_logits(backbone, st: LoopState, answer_ids, answer_mask):
    """Teacher-forced answer on the same cache: logits (B, T, V) where position j predicts token j.
    Token 0 comes from lm_head(h_K) (eq. 2); token j > 0 from the hidden state of answer token j-1."""
    emb = backbone.get_input_embeddings()(answer_ids)                                       # (B, T, d)
    hid = _text_step(backbone, emb, st, valid=answer_mask)                                 # (B, T, d)
    return backbone.lm_head(torch.cat([st.h[-1], hid[:, :-1]], dim=1))


@torch.no_grad()
def generate(backbone, prefix, K, eos_id, max_new_tokens=32, feed=None, readout="head"):
    """Greedy answer after K latent steps (inference: scaffolds neither loaded nor used); `feed` and `readout`
    as in latent_loop. Returns (token ids (B, <=max_new_tokens) with eos/padding after the end, the LoopState)."""
    st = latent_loop(backbone, prefix, K, feed, readout)
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
# 3. Training-time scaffolds (§3.3, §B.2): visual projector, pj_in, auxiliary text decoder.
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
    v_k = (1 - a_k) v_global + a_k v_roi with a_k = k / K, coarse-to-fine. -> (B, K, d_v).
    roi (B, S, d_v) instead of (B, d_v): a target per step (the walk's hops: the lesion move k lands on,
    train.py --visual-target hop); steps past S keep the last one."""
    if per_step and roi.ndim == 2:
        a = torch.arange(1, K + 1, device=roi.device, dtype=roi.dtype)[None, :, None] / K
        return (1 - a) * glob[:, None] + a * roi[:, None]
    steps = roi if roi.ndim == 3 else roi[:, None]  # the shared target: one step that every step keeps
    return torch.cat([steps[:, :K], steps[:, -1:].expand(-1, max(0, K - steps.shape[1]), -1)], dim=1)


# ----------------------------------------------------------------------------------------------------
# 4. VITAL: backbone (+LoRA) and optional scaffolds; forward returns the joint loss of eq. (7).
# ----------------------------------------------------------------------------------------------------
class VITAL(nn.Module):
    def __init__(self, backbone, decoder=None, d_v=None, projector="res_mlp_ln", lambda_sem=1.0,
                 lambda_vis=0.1, vp_dropout=0.1, pause_steps=0, readout="head"):
        super().__init__()
        self.backbone = backbone
        self.readout = readout  # how the answer reads h_K (latent_loop); the checkpoint's config.json records it
        d = backbone.config.text_config.hidden_size
        # The pause arm (an ablation, not the method; train.py --feedback pause): latent step k is fed a learned
        # constant pause[k-1] instead of h_{k-1}: the same K positions and curriculum, no recurrence through the
        # state. Inference needs it too, so it is saved with the adapter.
        self.pause = (nn.Parameter(torch.randn(pause_steps, d) * backbone.get_input_embeddings().weight.float().std())
                      if pause_steps else None)  # at the scale of the token embeddings
        # A scaffold whose weight is 0 is not built at all (nothing to train, nothing to synchronise).
        self.decoder = decoder if (decoder is not None and lambda_sem > 0) else None
        self.pj_in = nn.Linear(d, self.decoder.config.hidden_size) if self.decoder is not None else None
        self.vp = VisualProjector(d, d_v, projector, vp_dropout) if (d_v and lambda_vis > 0) else None
        self.lambda_sem, self.lambda_vis = lambda_sem, lambda_vis

    def forward(self, batch, K, per_step_target=False, vis_all_steps=False):
        """batch: prefix (BatchFeature), answer_ids/mask (B,T), step_ids/mask (B,K,L), roi/global (B,d_v) (roi
        (B,S,d_v): a target per step, visual_targets).
        Returns dict(loss, L_task, L_sem, L_vis, cos_vis, h) with h = (B, K, d) latent states h_1..h_K and
        cos_vis the mean cosine of VP(h_k) to its target (logged, not trained).
        L_sem (eq. 4) averages the valid steps only: a step without a sentence (all-padding step_mask) has
        nothing to decode. L_vis (eq. 6) averages the same valid steps by default; vis_all_steps=True counts
        all K steps of every sample, since its target needs no sentence (train.py --depth phase: a chain
        shorter than the batch's K still regresses v_roi at its later steps)."""
        st = latent_loop(self.backbone, batch["prefix"], K, self.feed(), self.readout)
        logits = answer_logits(self.backbone, st, batch["answer_ids"], batch["answer_mask"]).float()
        tgt = batch["answer_ids"].masked_fill(batch["answer_mask"] == 0, -100)          # padding never counts
        L_task = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100)
        zero = logits.new_zeros(())
        h = torch.cat(st.h[1:], dim=1) if K > 0 else logits.new_zeros(logits.shape[0], 0, 1)  # (B, K, d)
        L_sem = L_vis = cos_vis = zero
        if K > 0 and self.decoder is not None:
            L_sem = decoder_loss(self.decoder, self.pj_in, h, batch["step_ids"], batch["step_mask"])
        if K > 0 and self.vp is not None:
            valid = ((batch["step_mask"].sum(-1) > 0).float() if "step_mask" in batch and not vis_all_steps
                     else h.new_ones(h.shape[:2]))                                        # (B, K) weights
            tgt_v = visual_targets(batch["roi"].float(), batch.get("global", batch["roi"]).float(), K,
                                   per_step_target)
            v = self.vp(h).float()
            l1 = (v - tgt_v).abs().mean(-1)                                               # (B, K), L1 (eq. 6)
            L_vis = (l1 * valid).sum() / valid.sum().clamp(min=1)
            with torch.no_grad():  # for the log only: how well VP(h_k) points at its target
                cos_vis = (F.cosine_similarity(v, tgt_v, dim=-1) * valid).sum() / valid.sum().clamp(min=1)
        loss = L_task + self.lambda_sem * L_sem + self.lambda_vis * L_vis
        return dict(loss=loss, L_task=L_task, L_sem=L_sem, L_vis=L_vis, cos_vis=cos_vis, h=h)

    def feed(self):
        """latent_loop's input for step k: None (h_{k-1}, the method) or the pause arm's constants."""
        return None if self.pause is None else pause_feed(self.pause)

    def trainable_state_dict(self):
        """Only what training changes: LoRA A/B (+ the pause arm's constants: the adapter, what inference
        loads) and the scaffolds, keys without wrappers."""
        adapter = {n: p.detach() for n, p in self.backbone.named_parameters() if ".lora_" in n}
        if self.pause is not None:
            adapter["pause"] = self.pause.detach()
        scaffold = {n: p.detach() for n, p in self.named_parameters()
                    if not n.startswith("backbone.") and n != "pause"}
        return adapter, scaffold


def pause_feed(pause):
    """latent_loop's `feed` of the pause arm: step k's input embedding is the learned constant pause[k-1]."""
    def feed(k, st):
        if k > pause.shape[0]:
            raise ValueError(f"the pause arm learned {pause.shape[0]} step embeddings; K = {k} needs more "
                             "(train with --feedback pause --max-k K)")
        return pause[k - 1].to(st.h[-1].dtype).expand(st.h[-1].shape[0], 1, -1)
    return feed


# ----------------------------------------------------------------------------------------------------
# 5. Reading a latent back out (§3.3): the scaffolds re-attached after training, as explain.py does.
# ----------------------------------------------------------------------------------------------------
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

