"""
The prepared GPU check: the paper's model sizes with random weights, on one GPU, in one process.

It builds Qwen3-VL-8B (LLM 4096 x 36, ViT 1152 x 27 with deepstack 8/16/24), Qwen3-1.7B (2048 x 28) and a
SigLIP-448 encoder (MedSigLIP's shape: 1152 x 27, 32 x 32 patches) from their configs, random init, the
backbone in bf16 and the trainable decoder and heads in fp32 as train.py loads them, then prints:
  1. a training step exactly as train.py makes it (bf16 autocast, all three losses, backward, grad clip,
     fused AdamW) at K = 4: peak memory and samples/s for several batch sizes and image sizes;
  2. inference latency at batch 1 for K = 0..4 with the LoRA unmerged, merged, and folded (folded = the
     plain backbone's modules, what evaluate.py deploys), then folded on the fast path
     (pipeline/fast_inference.py: static cache, CUDA graphs), its time per token against the weight-read
     limit (weight bytes / --bandwidth-gbs), and one latent step vs one decode step;
  3. one explanation (explain.py's and pipeline/roi_encoder.py's functions: answer, decoded step sentences,
     heatmaps, the PNG panel).
A training config ending in "c" (e.g. 16x448x4c) runs with activation checkpointing (train.py --grad-ckpt).

    python bench/gpu_check.py                              # on a GPU (about 3 min on an H100/H200)
    python bench/gpu_check.py --layers 1 --device cpu --px 224 --train 1x224   # real widths, CPU dry run
    python bench/gpu_check.py --tiny                       # tiny configs, same code path (the tests run this)

Writes OUT/gpu_check.json and OUT/explain.png (--out, default runs/gpu_check).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (Qwen2VLImageProcessorPil, Qwen3ForCausalLM, Qwen3VLForConditionalGeneration,
                          SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import explain  # noqa: E402
import model as M  # noqa: E402
from pipeline import activation_checkpointing as AC  # noqa: E402
from pipeline import fast_inference as FI  # noqa: E402
from pipeline import io as IO  # noqa: E402
from pipeline import roi_encoder as RE  # noqa: E402
from embedded.tiny import CHAT_TEMPLATE, make_tiny, make_tokenizer, real_configs  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# Models: the real configs (random weights) or the tiny ones, loaded the way train.py loads them.
# ----------------------------------------------------------------------------------------------------
def build(args, folder):
    """-> backbone (frozen, + LoRA), processor, decoder (fp32, trainable), dec_tokenizer, encoder folder."""
    wdtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.tiny:
        make_tiny(folder)
        backbone, processor = IO.load_backbone(os.path.join(folder, "backbone"), wdtype, args.device)
        decoder, dec_tok = IO.load_decoder(os.path.join(folder, "decoder"), torch.float32, args.device)
        enc_dir = os.path.join(folder, "encoder")
    else:
        bcfg, dcfg, ecfg, tok = real_configs(args.layers, args.layers)
        old = torch.get_default_dtype()
        try:
            with torch.device(args.device):
                torch.set_default_dtype(wdtype)  # random init straight in the target dtype: seconds on a GPU
                backbone = Qwen3VLForConditionalGeneration(bcfg).eval()
                torch.set_default_dtype(torch.float32)
                decoder = Qwen3ForCausalLM(dcfg)
            torch.set_default_dtype(wdtype)
            enc_dir = os.path.join(folder, "encoder")  # the encoder goes through the real loading path
            SiglipVisionModel(ecfg).save_pretrained(enc_dir)
        finally:
            torch.set_default_dtype(old)
        SiglipImageProcessorPil(size={"height": 448, "width": 448}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  do_pad=False).save_pretrained(enc_dir)
        tok.padding_side = "left"
        processor = IO.ImageOnlyQwen3VLProcessor(Qwen2VLImageProcessorPil(patch_size=16, merge_size=2,
                                                temporal_patch_size=2), tok, chat_template=CHAT_TEMPLATE)
        dec_tok = make_tokenizer()
        dec_tok.padding_side = "right"
    M.add_lora(backbone, r=args.lora_r, alpha=2 * args.lora_r)
    for m in M.lora_layers(backbone):  # a trained-looking adapter (B != 0), so merging changes the weights
        torch.nn.init.normal_(m.lora_B, std=1e-3)
    return backbone, processor, decoder, dec_tok, enc_dir


def make_inputs(processor, dec_tok, B, K, px, d_v, device, seed=0):
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray((rng.random((px, px)) * 255).astype("uint8")) for _ in range(B)]
    qs = ["Analyze the visual findings of the liver in this CT image and describe its location."] * B
    ans = ["The liver lies in the upper left part of the image with smooth edges and uniform intensity."] * B
    chains = [["A large smooth bright organ is visible in the image.",
               "It occupies the upper left part of the image.", "Its edges are smooth and well defined.",
               "Its intensity is uniform compared with its surroundings."]] * B
    roi = F.normalize(torch.randn(B, d_v, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return IO.batch_to(IO.make_batch(processor, dec_tok, imgs, qs, ans, chains, K, roi=roi), device), imgs


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3, out


def peak_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (never resets)


# ----------------------------------------------------------------------------------------------------
# 1. Training steps, the recipe of train.py (autocast bf16, clip 1.0, fused AdamW on CUDA).
# ----------------------------------------------------------------------------------------------------
def train_rows(vital, processor, dec_tok, args, device, d_v):
    params = [p for p in vital.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
           else torch.autocast(device.type, enabled=False))
    rows, too_big = [], set()
    vital.train()

    def step(batch, K):
        with amp:
            out = vital(batch, K)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    for spec in args.train:
        ckpt = spec.endswith("c")  # BxPX[xK][c]: c = activation checkpointing
        B, px, K = (int(x) for x in (spec.rstrip("c") + "x4").split("x")[:3])  # K default 4
        row = dict(batch=B, px=px, K=K, ckpt=ckpt)
        AC.set_checkpointing(vital, ckpt)
        if (px, K, ckpt) in too_big:
            rows.append(dict(row, status="skipped (a smaller batch at this size ran out of memory)"))
            continue
        try:
            batch, _ = make_inputs(processor, dec_tok, B, K, px, d_v, device)
            row["prefix_tokens"] = int(batch["prefix"]["input_ids"].shape[1])
            step(batch, K)  # warm-up (and the AdamW states: they count in the peak from here on)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times, losses = [], None
            for _ in range(args.train_reps):
                t, out = timed_ms(lambda: step(batch, K), device)
                times.append(t)
                losses = {k: float(out[k].detach()) for k in ("L_task", "L_sem", "L_vis")}
            ms = statistics.median(times)
            row.update(status="ok", ms_per_step=ms, samples_per_s=B / ms * 1e3, peak_gib=peak_gib(device),
                       **losses)
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            row.update(status="out of memory", peak_gib=peak_gib(device))
            too_big.add((px, K, ckpt))
        rows.append(row)
        batch = out = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    AC.set_checkpointing(vital, False)
    opt.state.clear()  # free the optimizer states before inference
    vital.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------
# 2. Inference latency, batch 1: K = 0..4, a fixed answer length (eos never matches) so every K decodes the
#    same number of tokens; medians of interleaved repeats.
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def latency_rows(backbone, prefix, args, device, label, generate=M.generate):
    Ks = list(range(5))
    for K in Ks:
        generate(backbone, prefix, K, -1, args.answer_tokens)
    times = {K: [] for K in Ks}
    for _ in range(args.reps):
        for K in Ks:
            times[K].append(timed_ms(lambda: generate(backbone, prefix, K, -1, args.answer_tokens),
                                     device)[0])
    return {K: dict(form=label, K=K, ms=statistics.median(times[K])) for K in Ks}


@torch.no_grad()
def latent_vs_decode(backbone, prefix, device, n=8, reps=5):
    """ms of one latent step (h fed back) and of one greedy decode step, both appended to a cached prefix."""
    emb = backbone.get_input_embeddings()

    def run(kind):
        st = M.prefix_forward(backbone, prefix)
        tok = backbone.lm_head(st.h[-1])[:, -1].argmax(-1)

        def steps():
            nonlocal tok
            for _ in range(n):
                if kind == "latent":
                    st.h.append(M._text_step(backbone, st.h[-1], st))
                else:
                    tok = backbone.lm_head(M._text_step(backbone, emb(tok[:, None]), st))[:, -1].argmax(-1)
        return timed_ms(steps, device)[0] / n
    run("latent"), run("decode")
    return (statistics.median(run("latent") for _ in range(reps)),
            statistics.median(run("decode") for _ in range(reps)))


# ----------------------------------------------------------------------------------------------------
# 3. One explanation through explain.py's own functions.
# ----------------------------------------------------------------------------------------------------
def explanation(vital, processor, dec_tok, enc_dir, image, args, device):
    wdtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t = {}
    ask = SimpleNamespace(question="Where is the lesion located?", k=4, max_new_tokens=args.answer_tokens,
                          tile=160)  # what explain.py's command line gives its functions
    t["answer"], (answer, h) = timed_ms(lambda: explain.answer_and_latents(vital, processor, image, ask, device),
                                        device)
    t["sentences"], sentences = timed_ms(lambda: M.decode_latent(vital.decoder, vital.pj_in, dec_tok, h, 24),
                                         device)
    enc = RE.SiglipPatches(enc_dir, device, wdtype)
    t["heatmaps"], (heat, box, s) = timed_ms(lambda: heat_of(vital, enc, image, h), device)
    steps = [dict(k=k + 1, sentence=sentences[k], heat_img=explain.grid_to_image(heat[k], box, s))
             for k in range(4)]
    png = os.path.join(args.out, "explain.png")
    size = explain.draw_panel(png, image, answer, steps, explain.VisualWindow(heat, box, s), ask)
    return dict(ms=t, answer=answer, sentences=sentences, heat_shape=list(heat.shape),
                heat_range=[float(heat.min()), float(heat.max())], panel=png, panel_size=list(size))


def heat_of(vital, enc, image, h):
    v = M.project_latent(vital.vp, h)                                                      # (K, d_v)
    f, box, s = RE.patch_features(enc, image)
    return RE.heatmaps(f.cpu(), v.cpu(), enc.grid), box, s


# ----------------------------------------------------------------------------------------------------
def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny configs (embedded/tiny.py) instead of the real sizes")
    ap.add_argument("--layers", type=int,
                    help="LLM layers of backbone and decoder (default: the real 36 and 28)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp32"],
                    help="frozen weights + autocast (default bf16 on CUDA)")
    ap.add_argument("--lora-r", type=int, help="LoRA rank (default 64; 8 with --tiny)")
    ap.add_argument("--train", nargs="*",
                    help="training configs BxPX[xK][c] (K default 4, c: activation checkpointing; default: "
                         "4x448x0 1x448 2x448 4x448 8x448 1x1024 2x1024 4x1024 8x448x4c 32x448x4c 4x1024x4c "
                         "16x1024x4c; --tiny: 2x96x0 2x96 2x96x4c)")
    ap.add_argument("--train-reps", type=int, default=3,
                    help="timed training steps per config (after 1 warm-up)")
    ap.add_argument("--px", type=int, help="image side for latency and explanation (default 448; --tiny 96)")
    ap.add_argument("--answer-tokens", type=int, default=16, help="answer tokens decoded per latency sample")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per latency figure")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800,
                    help="the card's memory bandwidth in GB/s, for the weight-read limit (H200 4800, H100 SXM 3350)")
    ap.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json and explain.png")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.lora_r = args.lora_r or (8 if args.tiny else 64)
    args.train = args.train if args.train is not None else (
        ["2x96x0", "2x96", "2x96x4c"] if args.tiny
        else ["4x448x0", "1x448", "2x448", "4x448", "8x448", "1x1024", "2x1024", "4x1024", "8x448x4c",
              "32x448x4c", "4x1024x4c", "16x1024x4c"])
    args.px = args.px or (96 if args.tiny else 448)
    return args


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="vital_gpu_check_") as tmp:
        backbone, processor, decoder, dec_tok, enc_dir = build(args, tmp)
        d_v = SiglipVisionConfig.from_pretrained(enc_dir).hidden_size
        vital = M.VITAL(backbone, decoder, d_v).to(device)
        build_s = time.time() - t0
        n_train = sum(p.numel() for p in vital.parameters() if p.requires_grad)
        res = dict(device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                           else f"CPU ({torch.get_num_threads()} threads)"),
                   sizes="tiny" if args.tiny else f"real widths, {args.layers or 'all'} LLM layers",
                   dtype=args.dtype, torch=torch.__version__, build_s=build_s,
                   params=dict(backbone=IO.count_params(backbone), trainable=n_train,
                               lora=sum(p.numel() for m in M.lora_layers(backbone)
                                        for p in (m.lora_A, m.lora_B))))
        print(f"built in {build_s:.0f} s on {res['device']}: "
              f"backbone {res['params']['backbone'] / 1e9:.2f}B, "
              f"trainable {n_train / 1e6:.1f}M (LoRA {res['params']['lora'] / 1e6:.1f}M), d_v {d_v}",
              flush=True)
        res["train"] = train_rows(vital, processor, dec_tok, args, device, d_v)
        for r in res["train"]:
            print("train", json.dumps(r), flush=True)
        vital.eval()
        b1, imgs = make_inputs(processor, dec_tok, 1, 0, args.px, d_v, device, seed=1)
        prefix = b1["prefix"]
        res["prefix_tokens"] = int(prefix["input_ids"].shape[1])
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
               else torch.autocast(device.type, enabled=False))
        with amp:  # inference under the same autocast as evaluate.py on a GPU
            lat = latency_rows(backbone, prefix, args, device, "LoRA unmerged (training form)")
            M.set_lora_merged(backbone, True)
            lat_m = latency_rows(backbone, prefix, args, device, "LoRA merged, wrappers kept")
            res["latent_step_ms"], res["decode_step_ms"] = latent_vs_decode(backbone, prefix, device)
        # explain.py runs without autocast: bf16 backbone, fp32 pj_in / projector (it must cast h, not raise)
        res["explain"] = explanation(vital, processor, dec_tok, enc_dir, imgs[0], args, device)
        with amp:
            M.fold_lora(backbone)
            lat_f = latency_rows(backbone, prefix, args, device,
                                 "LoRA folded = plain backbone modules (deployed)")
            step = FI.make_step(device=device)  # CUDA graphs on a GPU, plain on the CPU
            lat_x = latency_rows(backbone, prefix, args, device, "folded, fast path (static cache"
                                 + (", CUDA graphs)" if device.type == "cuda" else ")"),
                                 lambda *a: FI.fast_generate(*a, step=step))
        res["latency"] = [r[K] for r in (lat, lat_m, lat_f, lat_x) for K in r]
        res["weight_bytes"] = sum(t.numel() * t.element_size() for t in backbone.parameters())
        res["total_s"] = time.time() - t0
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1)
    report(res, args)
    return res


def report(res, args):
    print(f"\nVITAL GPU check: {res['device']}, {res['sizes']}, {res['dtype']}, torch {res['torch']}; "
          f"{res['total_s']:.0f} s in all ({res['build_s']:.0f} s building)")
    print(f"\n1. training step (train.py's recipe: autocast, 3 losses, backward, clip, AdamW), "
          f"median of {args.train_reps}")
    print(f"{'batch':>5} {'px':>5} {'K':>2} {'ckpt':>4} {'tokens':>6} {'ms/step':>8} {'samples/s':>9} "
          f"{'peak GiB':>8}  status")
    for r in res["train"]:
        print(f"{r['batch']:>5} {r['px']:>5} {r['K']:>2} {'yes' if r.get('ckpt') else 'no':>4} "
              f"{r.get('prefix_tokens', ''):>6} "
              f"{r.get('ms_per_step', float('nan')):>8.0f} {r.get('samples_per_s', float('nan')):>9.2f} "
              f"{r.get('peak_gib', float('nan')):>8.1f}  {r['status']}")
    print("   ckpt = activation checkpointing (train.py --grad-ckpt); train.py --plan models these peaks")
    print(f"\n2. inference latency, batch 1, {res['prefix_tokens']}-token prompt ({args.px} px), "
          f"{args.answer_tokens} answer tokens, median of {args.reps}")
    forms = list(dict.fromkeys(r["form"] for r in res["latency"]))
    print(f"{'form':<50}" + "".join(f"{'K=' + str(K):>9}" for K in range(5)) + f"{'K4/K0':>7}")
    for form in forms:
        ms = [r["ms"] for r in res["latency"] if r["form"] == form]
        print(f"{form:<50}" + "".join(f"{m:>7.1f}ms" for m in ms) + f"{ms[4] / ms[0]:>7.2f}")
    limit = res["weight_bytes"] / (args.bandwidth_gbs * 1e9) * 1e3
    fast = [r["ms"] for r in res["latency"] if "fast path" in r["form"]]
    print(f"   weight-read limit: {res['weight_bytes'] / 2**30:.1f} GiB of weights / {args.bandwidth_gbs:g} GB/s = "
          f"{limit:.2f} ms per token; fast path at K = 4: {fast[4] / (4 + args.answer_tokens):.2f} ms per latent "
          f"or answer token, prefix included ({fast[4] / (4 + args.answer_tokens) / limit:.1f}x the limit)")
    print(f"   one latent step {res['latent_step_ms']:.2f} ms, "
          f"one greedy decode step {res['decode_step_ms']:.2f} ms "
          f"(ratio {res['latent_step_ms'] / res['decode_step_ms']:.2f})")
    e = res["explain"]
    print(f"\n3. one explanation: answer {e['ms']['answer']:.0f} ms, "
          f"step sentences {e['ms']['sentences']:.0f} ms, "
          f"heatmaps {e['ms']['heatmaps']:.0f} ms; heatmap {e['heat_shape']}, panel {e['panel']}")


if __name__ == "__main__":
    main()
