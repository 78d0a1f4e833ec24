"""
The memory of one training step on one GPU, as a model: what `train.py --plan` prints, at the paper's model
sizes (built on the meta device, nothing loaded). bench/memory.py checks it against measured peaks.

Where a step's memory goes (train.py's recipe: frozen backbone in bf16, LoRA + decoder + heads in fp32 under
bf16 autocast, AdamW, DDP over the trainable tensors only):
  fixed     frozen weights (2 B each), trainable weights + gradients + AdamW's two moments (16 B each),
            DDP's all-reduce buckets (another copy of the gradients, none with gradient_as_bucket_view),
            autocast's bf16 copies of the fp32 weights that matmuls keep for backward
  activations  what autograd keeps for backward, counted tensor by tensor below from the ops (a frozen
            linear keeps nothing: its input is only needed for its own weight's gradient)
  peak      gradients are set to None between steps, so the step's peak is the larger of the end of the
            forward (all activations and weight copies) and the start of the backbone's backward (the
            decoder's activations freed, all gradients allocated), plus backward's temporaries for one
            layer over the prefix (with checkpointing: also the replayed layer's activations)

    python train.py --plan --phase 3                         # the paper's setting (6 GPUs, batch 8, K = 4)
    python train.py --plan --phase 3 --grad-ckpt --batch-size 32   # what checkpointing buys
"""
import math
import os
from dataclasses import dataclass

import torch
import transformers

from embedded.tiny import real_configs
import model as M

GiB = 2 ** 30
# Lengths the plan assumes besides the image (chosen, generous for the paper's data: the prompt template and
# a question are ~40 tokens, an answer one or two sentences, a reasoning step one sentence + EOS).
TEXT_TOKENS, ANSWER_TOKENS, STEP_TOKENS = 48, 48, 40
LARGEST_IMAGE = 1024  # px: BiomedParse's images (MSD slices are 512)
# The H200 run of bench/gpu_check.py (README "Real scale"): batch, prefix tokens, answer tokens, step tokens,
# peak GiB; K = 4, no checkpointing, one GPU (no DDP).
H200 = [(1, 237, 20, 12, 48.6), (8, 237, 20, 12, 66.7), (1, 1002, 20, 12, 56.3), (4, 1002, 20, 12, 86.4)]


@dataclass
class Dims:
    """Widths of the three trained paths (backbone text layers, decoder layers) and their vocabularies."""
    d: int; f: int; q: int; kv: int; heads: int; layers: int; vocab: int           # backbone LLM  # noqa
    D: int; F: int; qd: int; kvd: int; heads_d: int; layers_d: int; vocab_d: int  # decoder       # noqa
    r: int; d_v: int                                                                # LoRA, targets # noqa


def dims(cfg, dcfg, r, d_v):
    t = cfg.text_config
    return Dims(t.hidden_size, t.intermediate_size, t.num_attention_heads * t.head_dim,
                t.num_key_value_heads * t.head_dim, t.num_attention_heads, t.num_hidden_layers, t.vocab_size,
                dcfg.hidden_size, dcfg.intermediate_size, dcfg.num_attention_heads * dcfg.head_dim,
                dcfg.num_key_value_heads * dcfg.head_dim, dcfg.num_attention_heads, dcfg.num_hidden_layers,
                dcfg.vocab_size, r, d_v)


def param_counts(cfg, dcfg, r, d_v):
    """Parameter counts of VITAL built on the meta device (no memory): frozen, trainable, and the trainable
    matrices (what autocast copies to bf16) of the decoder layers, the decoder head, LoRA and pj_in + VP."""
    with torch.device("meta"):
        bb = transformers.Qwen3VLForConditionalGeneration(cfg)
        M.add_lora(bb, r, 2 * r)
        vital = M.VITAL(bb, transformers.Qwen3ForCausalLM(dcfg), d_v)
    n = lambda ps: sum(p.numel() for p in ps)
    dec = vital.decoder
    dec_mm = n(p for layer in dec.model.layers for p in layer.parameters() if p.ndim == 2)
    return dict(frozen=n(p for p in vital.parameters() if not p.requires_grad),
                trainable=n(p for p in vital.parameters() if p.requires_grad), dec_matmul=dec_mm,
                dec_head=dec.lm_head.weight.numel(),
                lora=n(p for name, p in bb.named_parameters() if ".lora_" in name),
                heads=n(p for name, p in vital.named_parameters()
                        if p.ndim == 2 and name.startswith(("pj_in.", "vp."))))


def per_token_layer(m: Dims, a, mask):
    """Bytes one backbone text layer keeps for backward per token, without checkpointing. a: activation
    bytes (2 under bf16 autocast), mask: dropout-mask bytes (1 on CUDA, a on CPU). RMSNorm (frozen gain)
    keeps its fp32 input; q_norm/k_norm likewise; a LoRA keeps its dropout mask, the bf16 input of A and
    B's input (r); attention keeps q and its output (K/V: see kv_copies); the MLP keeps gate, SiLU(gate)
    and up."""
    lora = 5 * ((mask + a) * m.d + a * m.r) + (mask + a) * m.q + (mask + a) * m.f + 2 * a * m.r
    return 2 * 4 * m.d + lora + 4 * m.q + 4 * m.kv + 2 * a * m.q + 4 * m.heads + 3 * a * m.f


def per_token_dec_layer(m: Dims, a):
    """Bytes one (fully trained) decoder layer keeps per token: its residual stream is fp32 (its embedding
    is fp32), every matmul keeps its bf16 input (its weight needs a gradient), each RMSNorm its fp32 input
    and normalised value; attention q, k, v and output; the MLP gate, SiLU(gate), up and their product."""
    return (2 * 8 * m.D + 5 * a * m.D + (a + 4 + a + 2 * a) * m.qd + (4 + a + 2 * a) * m.kvd + 4 * m.heads_d
            + 4 * a * m.F)


def activations(m: Dims, B, P, K, T, L, ckpt, a=2, mask=1):
    """Bytes a micro-batch of B samples keeps for backward (and the backward's transient). P prefix tokens,
    K latent steps, T answer tokens, L tokens per step sentence. -> dict of named terms."""
    S = P + K + T                                            # tokens through every backbone layer
    calls = [(P, P)] + [(1, P + k) for k in range(1, K + 1)] + [(T, P + K + T)]    # (new, seen) per call
    layer = per_token_layer(m, a, mask)
    out = {}
    if ckpt:  # a layer keeps its input and its new K/V chunk; the decoder layers their fp32 input and K/V
        out["backbone layers"] = B * S * m.layers * (a * m.d + 2 * a * m.kv)
        out["decoder layers"] = B * K * L * m.layers_d * (4 * m.D + 2 * a * m.kvd)
    else:     # every call's attention also keeps the whole cache it attended to (DynamicCache concatenates)
        out["backbone layers"] = (B * S * m.layers * layer
                                  + B * m.layers * 2 * a * m.kv * sum(s for _, s in calls))
        out["decoder layers"] = B * K * L * m.layers_d * per_token_dec_layer(m, a)
    out["attention masks"] = B * a * sum(t * s for t, s in calls)
    out["final norms, logits"] = B * (4 * m.d * S + 4 * m.vocab * T                      # log-softmax fp32
                                      + K * L * (8 * m.D + a * m.D + 4 * m.vocab_d))
    out["pj_in, projector"] = B * K * (7 * a * m.d + 4 * m.d_v)
    # while backward walks one layer over the prefix: its gradient temporaries (MLP and residual stream),
    # and with checkpointing the replayed layer's activations too
    out["backward transient"] = B * P * ((layer if ckpt else 0) + 3 * a * m.f + 4 * a * m.d)
    return out


def step_peak(counts, act, ckpt, a=2):
    """Peak of a step above the weights and AdamW moments (gradients are set to None between steps): the
    larger of (1) the end of the forward: every activation and weight copy, no gradient yet, and (2) the
    start of the backbone's backward: the decoder and heads are done (their activations and copies freed,
    every gradient allocated), the backbone's activations all still held. -> (bytes, which)."""
    end_of_forward = (sum(v for k, v in act.items() if k != "backward transient")
                      + weight_copies(counts, ckpt, a))
    backbone_backward = (act["backbone layers"] + act["attention masks"] + act["backward transient"]
                         + 4 * counts["trainable"] + (0 if ckpt or a == 4 else a * counts["lora"]))
    return max((end_of_forward, "end of forward"), (backbone_backward, "backbone backward"))


def weight_copies(counts, ckpt, a=2):
    """autocast's bf16 copies of fp32 trainable matrices, kept for backward by their matmuls. Checkpointed
    layers cast theirs again on replay, so only the decoder head, pj_in and the projector remain."""
    if a == 4:
        return 0
    return a * (counts["dec_head"] + counts["heads"] + (0 if ckpt else counts["dec_matmul"] + counts["lora"]))


def image_tokens(max_pixels, side=LARGEST_IMAGE, factor=32):
    """Visual tokens of a square image of `side` px under the cap (the processor's smart_resize rule)."""
    s = round(side / factor) * factor
    if max_pixels and s * s > max_pixels:
        s = max(factor, math.floor(side / math.sqrt(side * side / max_pixels) / factor) * factor)
    return (s // factor) ** 2


def budget(counts, m, B, K, P, T, L, ckpt, world, bucket_view=True, a=2, mask=1):
    """-> (named GiB figures that add up to one GPU's peak, the activation terms in bytes, the peak's
    moment)."""
    act = activations(m, B, P, K, T, L, ckpt, a, mask)
    peak, when = step_peak(counts, act, ckpt, a)
    rows = {"frozen weights (bf16)": counts["frozen"] * a / GiB,
            "trainable weights (fp32)": counts["trainable"] * 4 / GiB,
            "AdamW moments (2 x fp32)": counts["trainable"] * 8 / GiB,
            "DDP buckets": (counts["trainable"] * 4 if world > 1 and not bucket_view else 0) / GiB,
            f"step peak ({when}): gradients, activations, copies": peak / GiB}
    return rows, act, when


def plan_inputs(args):
    """(cfg, dcfg, r, d_v, names) for --plan: the --backbone/--decoder configs if they are real folders,
    else the paper's (embedded/tiny.real_configs)."""
    from transformers import AutoConfig
    cfg, dcfg, _, _ = real_configs()
    names = "Qwen3-VL-8B + Qwen3-1.7B (the paper's configs)"
    folders = [getattr(args, k, None) for k in ("backbone", "decoder")]
    if all(f and os.path.isfile(os.path.join(f, "config.json")) for f in folders) and args.preset != "tiny":
        cfg, dcfg = (AutoConfig.from_pretrained(f) for f in folders)
        names = f"{folders[0]} + {folders[1]}"
    return cfg, dcfg, args.lora_r or 64, 1152, names


def total_gib(counts, m, B, K, P, ckpt, world):
    return sum(budget(counts, m, B, K, P, ANSWER_TOKENS, STEP_TOKENS, ckpt, world)[0].values())


def largest_batch(counts, m, K, P, ckpt, world, cap, most=1024):
    """The largest per-GPU batch whose plan keeps 10% of `cap` free (0: not even one sample)."""
    B = 0
    while B < most and total_gib(counts, m, B + 1, K, P, ckpt, world) <= 0.9 * cap:
        B += 1
    return B


def phase_k(args, cap):
    """The largest K of a phase whose schedule admits latent_steps <= cap (None: all; the paper's data has
    at most 4 steps), under --max-k."""
    K = cap if cap is not None else 4
    return K if args.max_k is None else min(K, args.max_k)


def print_plan(args, curriculum=None):
    """train.py --plan: the per-GPU budget of this command at real size (its phase's largest K), the other
    phases of its curriculum in one line each, and the model against the H200 run.
    curriculum: [(the phase's latent_steps cap or None, epochs), ...] (train.CURRICULA[--curriculum])."""
    cfg, dcfg, r, d_v, names = plan_inputs(args)
    m, counts = dims(cfg, dcfg, r, d_v), param_counts(cfg, dcfg, r, d_v)
    K = phase_k(args, args.phase_max_k)
    side = min(LARGEST_IMAGE, int(math.sqrt(args.max_pixels))) if args.max_pixels else LARGEST_IMAGE
    P = image_tokens(args.max_pixels, side) + TEXT_TOKENS
    B, world, cap, ck = args.batch_size, args.plan_world, args.plan_gib, args.grad_ckpt
    rows, act, when = budget(counts, m, B, K, P, ANSWER_TOKENS, STEP_TOKENS, ck, world)
    total = sum(rows.values())
    print(f"train.py --plan: one GPU's memory in a training step; {names}, LoRA r = {r}, d_v = {d_v}, "
          "bf16 autocast")
    print(f"  phase {args.phase}: batch {B} per GPU x {args.grad_accum} accumulation x {world} GPUs = "
          f"{B * args.grad_accum * world} samples per optimizer step; K = {K}; images <= {side} x {side} px "
          f"= {image_tokens(args.max_pixels, side)} visual tokens (--max-pixels {args.max_pixels or 'off'})")
    print(f"  prefix {P} tokens, answer {ANSWER_TOKENS}, step sentences {STEP_TOKENS} (assumed); activation "
          f"checkpointing {'on' if ck else 'off'}; {counts['frozen']:,} frozen and {counts['trainable']:,} "
          "trained parameters")
    for name, gib in rows.items():
        print(f"  {name:<62} {gib:7.2f} GiB")
    print(f"    (gradients {counts['trainable'] * 4 / GiB:.2f}; activations of the batch: "
          + ", ".join(f"{k} {v / GiB:.2f}" for k, v in act.items() if v >= GiB / 100)
          + f"; bf16 weight copies {weight_copies(counts, ck) / GiB:.2f} at the end of the forward)")
    head = 1 - total / cap
    print(f"  {'total':<62} {total:7.2f} GiB of {cap:g} GiB: {100 * head:.0f}% headroom, "
          + ("fits (>= 10% headroom)" if head >= 0.10 else "DOES NOT FIT with 10% headroom"))
    phases = []
    for p, (hi, _) in enumerate(curriculum or [], 1):
        k = phase_k(args, hi)
        t = sum(budget(counts, m, B, k, P, ANSWER_TOKENS, STEP_TOKENS, ck, world)[0].values())
        phases.append(dict(phase=p, K=k, total=t, headroom=1 - t / cap))
    if phases:
        print(f"  every phase of --curriculum {args.curriculum} with these flags: " + "; ".join(
            f"phase {x['phase']} (K = {x['K']}) {x['total']:.1f} GiB, {100 * x['headroom']:.0f}% headroom"
            for x in phases))
    for c in (False, True):
        p = {px: image_tokens(px * px, px) + TEXT_TOKENS for px in (448, LARGEST_IMAGE)}
        g = {px: (total_gib(counts, m, 9, K, n, c, world) - total_gib(counts, m, 1, K, n, c, world)) / 8
             for px, n in p.items()}  # the mean over 8 more samples
        fit = {px: largest_batch(counts, m, K, n, c, world, cap) for px, n in p.items()}
        print(f"  checkpointing {'on ' if c else 'off'}: +{g[448]:.2f} GiB per 448-px sample, "
              f"+{g[LARGEST_IMAGE]:.2f} per {LARGEST_IMAGE}-px one (no cap) at K = {K}; the largest batch "
              f"with 10% headroom: {fit[448]} at 448 px, {fit[LARGEST_IMAGE]} at {LARGEST_IMAGE} px")
    print("  the model against the H200 run of bench/gpu_check.py (README; one GPU, K = 4, no "
          "checkpointing):")
    ref, h200 = (dims(*real_configs()[:2], 64, 1152), param_counts(*real_configs()[:2], 64, 1152)), []
    for b, p, t, l, got in H200:
        want = sum(budget(ref[1], ref[0], b, 4, p, t, l, False, 1)[0].values())
        h200.append(dict(batch=b, prefix=p, model=want, measured=got))
        print(f"    batch {b} x {'448' if p < 500 else '1024'} px ({p} prefix tokens): model "
              f"{want:5.1f} GiB, measured {got:5.1f} GiB ({100 * (want - got) / got:+.0f}%)")
    return dict(rows=rows, total=total, headroom=head, activations=act, peak_at=when, phases=phases,
                h200=h200)
