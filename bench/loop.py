"""
Benchmark of the VITAL core (model.py): the latent loop, LoRA merging, the training step, the one-call
decoder and memory. Every figure is a ratio measured within one run (medians of interleaved repeats), so
a noisy machine moves both sides together.

    python bench/loop.py                  # small config: hidden 256, 4 layers, ~300-token prompt, B = 1 and 4
    python bench/loop.py --reps 20 --batch 1 4 8
    # Qwen3-VL-8B / Qwen3-1.7B sizes, random init
    python bench/loop.py --real --device cuda --dtype bf16 --batch 1

Targets: latent step / decode step <= 1.10; merged-LoRA inference / plain backbone <= 1.02; the fast
inference path (pipeline/fast_inference.py) / model.generate <= 1.0 (or the control row's noise floor);
train step K=4 / K=0 <= 1.5; this loop / naive recompute-everything loop (K=4 train step) <= 0.5.
"""
import argparse
import contextlib
import copy
import os
import sys
import resource
import statistics
import tempfile
import time

import numpy as np
import torch
import transformers
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import model as M
from pipeline import fast_inference as FI
from pipeline import io as IO
from embedded.tiny import CHAT_TEMPLATE, make_tiny, real_configs


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns, reps, device):
    """Run each fn once per round, rounds repeated `reps` times (after one warm-up), the order rotated every
    round so that no fn always runs first or after the same neighbour; medians in seconds."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for r in range(reps):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            times[i].append(timed(fns[i], device))
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------- models
def build(args, folder):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.real:  # the paper's sizes (§B.1, Table 9/11), random init; needs a big GPU
        cfg, dcfg, _, tok = real_configs()
        with torch.device(args.device):
            plain = transformers.Qwen3VLForConditionalGeneration(cfg).to(dtype).eval()
            dec = transformers.Qwen3ForCausalLM(dcfg)
        proc = IO.ImageOnlyQwen3VLProcessor(transformers.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2,
                                                                      temporal_patch_size=2),
                                           tok, chat_template=CHAT_TEMPLATE)
        tok.padding_side = "left"
        d_v, dtok = 1152, tok
    else:
        make_tiny(folder, hidden=256, layers=4, dec_hidden=128, dec_layers=2)
        plain, proc = IO.load_backbone(os.path.join(folder, "backbone"), dtype, args.device)
        dec, dtok = IO.load_decoder(os.path.join(folder, "decoder"), torch.float32, args.device)
        d_v = 48
    lora_bb = build_lora_copy(args, plain)
    torch.manual_seed(0)
    vital = M.VITAL(lora_bb, dec, d_v=d_v).to(args.device)
    return plain, vital, proc, dtok


def build_lora_copy(args, plain):
    bb = copy.deepcopy(plain)
    M.add_lora(bb, r=args.r, alpha=2 * args.r)
    for m in M.lora_layers(bb):  # a trained-looking adapter: B != 0
        torch.nn.init.normal_(m.lora_B, std=0.01)
    return bb


def make_inputs(proc, dtok, B, K, image_px, device, d_v):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((image_px, image_px, 3)) * 255).astype("uint8")) for _ in range(B)]
    qs = ["Analyze the visual findings of the liver in this CT image and describe its location."] * B
    ans = ["The liver lies in the upper left part of the image with smooth edges and uniform intensity."] * B
    chains = [["A large smooth bright organ is visible.", "It occupies the upper left part of the image.",
               "Its edges are smooth and well defined.", "Its intensity is uniform."]] * B
    roi = F.normalize(torch.randn(B, d_v), dim=-1)
    batch = IO.make_batch(proc, dtok, imgs, qs, ans, chains, K, roi=roi)
    return IO.batch_to(batch, device)


# ---------------------------------------------------------------- the measured pieces
def latent_vs_decode(bb, prefix, n_steps, reps, device):
    """Per-step time of a latent step (h fed back) vs a greedy decode step (embed -> LM -> lm_head -> argmax),
    both appended to a cache that already holds the same prefix."""
    emb = bb.get_input_embeddings()

    def run(kind):
        st = M.prefix_forward(bb, prefix)
        tok = bb.lm_head(st.h[-1])[:, -1].argmax(-1)

        def steps():
            nonlocal tok
            for _ in range(n_steps):
                if kind == "latent":
                    st.h.append(M._text_step(bb, st.h[-1], st))
                else:
                    tok = bb.lm_head(M._text_step(bb, emb(tok[:, None]), st))[:, -1].argmax(-1)
        return timed(steps, device)

    with torch.no_grad():
        for _ in range(2):
            run("latent"), run("decode")
        lat, dec = [], []
        for _ in range(reps):
            lat.append(run("latent"))
            dec.append(run("decode"))
    return statistics.median(lat) / n_steps, statistics.median(dec) / n_steps


def naive_loop(bb, prefix, K, answer_ids, answer_mask):
    """The baseline the cache is for: every latent step re-runs the LLM over the WHOLE sequence so far
    (vision tower run once), then one more full pass for the answer. Same maths, no KV-cache."""
    inner = bb.model
    ids, mask = prefix["input_ids"], prefix["attention_mask"]
    img = inner.get_image_features(prefix["pixel_values"], prefix["image_grid_thw"], return_dict=True)
    vis = ids == bb.config.image_token_id
    emb = inner.get_input_embeddings()(ids)
    emb = emb.masked_scatter(vis[..., None].expand_as(emb), torch.cat(img.pooler_output, 0).to(emb.dtype))
    pos, delta = inner.get_rope_index(ids, prefix["mm_token_type_ids"],
                                      image_grid_thw=prefix["image_grid_thw"], attention_mask=mask)
    B = ids.shape[0]
    start = mask.sum(-1) + delta[:, 0]
    ds = [torch.cat(f, 0) for f in img.deepstack_features]

    def full(extra):
        n = extra.shape[1]
        p = torch.cat([pos, (start[:, None] + torch.arange(n, device=ids.device))[None].expand(3, B, n)], 2)
        m = torch.cat([mask, torch.ones(B, n, dtype=mask.dtype, device=ids.device)], 1)
        vm = torch.cat([vis, torch.zeros(B, n, dtype=torch.bool, device=ids.device)], 1)
        return inner.language_model(inputs_embeds=torch.cat([emb, extra], 1), attention_mask=m,
                                    position_ids=p, visual_pos_masks=vm,
                                    deepstack_visual_embeds=ds).last_hidden_state
    h = [full(emb[:, :0])[:, -1:]]
    for _ in range(K):
        h.append(full(torch.cat(h, 1))[:, -1:])
    hid = full(torch.cat(h[:-1] + [h[-1], inner.get_input_embeddings()(answer_ids)], 1))
    T = answer_ids.shape[1]
    logits = bb.lm_head(hid[:, -T - 1:-1]).float()
    return F.cross_entropy(logits.transpose(1, 2), answer_ids.masked_fill(answer_mask == 0, -100))


def saved_activation_bytes(fn, module):
    """Bytes of tensors autograd keeps for backward during fn() (deterministic activation memory). Each
    storage counts once, and weights (saved by every matmul, but never copied) do not count."""
    seen = {p.untyped_storage().data_ptr() for p in module.parameters()}
    total = [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to measure")
    ap.add_argument("--reps", type=int, default=10, help="timed repeats per figure (medians)")
    ap.add_argument("--image-px", type=int, default=512,
                    help="square image size (512 px -> 256 visual tokens)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--real", action="store_true", help="real model sizes with random weights (GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="backbone dtype")
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="vital_bench_")
    plain, vital, proc, dtok = build(args, tmp)
    bb = vital.backbone
    d_v = vital.vp.out.out_features
    amp = (torch.autocast("cuda", dtype=torch.bfloat16)
           if args.device.startswith("cuda") and args.dtype == "bf16" else contextlib.nullcontext())
    eos = -1  # never stop early: every run generates the same number of tokens
    rows = []

    def row(name, value, target=None, unit="x"):
        ok = "" if target is None else ("PASS" if value <= target else "FAIL")
        rows.append((name, f"{value:.3f}{unit}" if unit == "x" else f"{value:.2f} {unit}",
                     "" if target is None else f"<= {target}", ok))

    for B in args.batch:
        b4 = make_inputs(proc, dtok, B, 4, args.image_px, args.device, d_v)
        b0 = make_inputs(proc, dtok, B, 0, args.image_px, args.device, d_v)
        P = b4["prefix"]["input_ids"].shape[1]
        rows.append((f"-- B = {B}, prompt {P} tokens", "", "", ""))
        with amp:
            # 1. a latent step costs one decode step
            lat, dec = latent_vs_decode(bb, b4["prefix"], 8, args.reps, args.device)
            row("latent step / greedy decode step", lat / dec, 1.10)
            row("  latent step", lat * 1e3, unit="ms")

            # 2. merged LoRA = the plain backbone at inference (same K = 4, same 8 answer tokens)
            # All three are deep copies, so that their weights sit in the same kind of memory (a model
            # loaded by from_pretrained may keep its weights memory-mapped from the safetensors file).
            # A second copy of the plain backbone is the control: plain / plain measures the noise floor.
            folded, merged, base, base2 = (copy.deepcopy(bb), copy.deepcopy(bb), copy.deepcopy(plain),
                                           copy.deepcopy(plain))
            M.fold_lora(folded)               # what evaluate.py deploys: plain modules, W + sBA inside
            M.set_lora_merged(merged, True)   # merged in place, wrappers kept (can be unmerged)
            t_merged, t_folded, t_plain, t_plain2 = interleaved(
                [lambda: M.generate(m, b4["prefix"], 4, eos, 8) for m in (merged, folded, base, base2)],
                3 * args.reps, args.device)
            del folded, merged, base, base2
            row("inference folded LoRA / plain backbone (K=4)", t_folded / t_plain, 1.02)
            row("inference merged LoRA (wrappers kept) / plain (K=4)", t_merged / t_plain, 1.02)
            row("  control: plain / a copy of plain (noise floor)", t_plain2 / t_plain)
            row("  inference K=4, 8 answer tokens", t_plain * 1e3, unit="ms")

            # 2b. the fast path (pipeline/fast_inference.py: static cache, fixed-shape steps; compiled on a GPU)
            # beside model.generate, on the plain backbone, K = 4 and 16 answer tokens
            step = FI.make_step(device=args.device)
            # (on the CPU its default is model.generate itself; the static cache alone is timed beside it)
            t_fast, t_static, t_gen = interleaved(
                [lambda: FI.fast_generate(plain, b4["prefix"], 4, eos, 16, step),
                 lambda: FI.fast_generate(plain, b4["prefix"], 4, eos, 16, step, static=True),
                 lambda: M.generate(plain, b4["prefix"], 4, eos, 16)], 3 * args.reps, args.device)
            # target: not slower, i.e. <= 1.0 or within the noise floor the control row measured in this run
            row("inference fast path / model.generate (K=4, 16 tokens)", t_fast / t_gen,
                round(max(1.0, t_plain2 / t_plain), 3))
            row("  static cache forced / model.generate", t_static / t_gen)
            row("  fast path K=4, 16 answer tokens", t_fast * 1e3, unit="ms")

            # 3. training step K=4 vs K=0, all three losses, forward + backward
            vital.train()

            def step(batch, K):
                def f():
                    vital.zero_grad(set_to_none=True)
                    vital(batch, K)["loss"].backward()
                return f

            def naive_step():
                vital.zero_grad(set_to_none=True)
                naive_loop(bb, b4["prefix"], 4, b4["answer_ids"], b4["answer_mask"]).backward()
            t4, t0, tn = interleaved([step(b4, 4), step(b0, 0), naive_step], args.reps, args.device)
            row("train step K=4 / K=0", t4 / t0, 1.5)
            row("  train step K=4", t4 * 1e3, unit="ms")
            # 4. the cached loop vs recomputing everything (naive has only L_task: the ratio favours naive)
            row("train step: this loop / naive recompute loop (K=4)", t4 / tn, 0.5)

            # 5. the decoder over all B x K steps in one call vs one call per step
            h = torch.randn(B, 4, bb.config.text_config.hidden_size, device=args.device)

            def one_call():
                M.decoder_loss(vital.decoder, vital.pj_in, h, b4["step_ids"], b4["step_mask"]).backward()

            def per_step():
                for k in range(4):
                    M.decoder_loss(vital.decoder, vital.pj_in, h[:, k:k + 1], b4["step_ids"][:, k:k + 1],
                                   b4["step_mask"][:, k:k + 1]).backward()
            t_one, t_per = interleaved([one_call, per_step], args.reps, args.device)
            row("decoder B x K in one call / one call per step", t_one / t_per)

            # 6. memory of a training step
            a4 = saved_activation_bytes(lambda: vital(b4, 4)["loss"], vital)
            a0 = saved_activation_bytes(lambda: vital(b0, 0)["loss"], vital)
            row("  saved activations, train step K=4", a4 / 2**20, unit="MiB")
            row("  saved activations K=4 / K=0", a4 / a0)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                step(b4, 4)()
                row("  peak CUDA memory, train step K=4", torch.cuda.max_memory_allocated() / 2**30,
                    unit="GiB")
            vital.eval()
    rows.append(("process peak RSS", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB",
                 "", ""))

    w = max(len(r[0]) for r in rows) + 2
    print(f"\nVITAL bench: {'real sizes' if args.real else 'small config (hidden 256, 4 layers)'}, "
          f"device {args.device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"{args.reps} reps\n")
    print(f"{'figure':<{w}}{'value':>14}  {'target':>8}  ok")
    for name, value, target, ok in rows:
        print(f"{name:<{w}}{value:>14}  {target:>8}  {ok}")


if __name__ == "__main__":
    main()
