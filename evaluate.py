"""
VITAL stage 4: evaluation (paper §4.1-4.3, §B.4, §C.6).

The deployed model is the frozen backbone with the LoRA MERGED into its weights and then unwrapped, so
it has exactly the plain backbone's modules and parameter count: the scaffolds (pj_in, decoder, visual
projector) stay on disk (§3.5 "zero extra latency, memory, parameters"; the report checks it). Every
question runs the same latent loop as training (model.latent_loop) with ONE fixed K (default 4, Table 3)
and a greedy answer, read out as the checkpoint was trained to (config.json args.readout, train.py --readout;
eq. 2 for one from before the flag); `--k sample` (each test item's own latent_steps, batched by K) is a diagnostic.

Protocol (§B.4: every QA pair is asked as a closed-ended question): with `--protocol options` (default) an
item that has choices is asked with them in the prompt, pipeline.io.ask: the question, "(A) text" one option a
line, then "Answer with one of the options." (the text train.py --options-rate shows); `--protocol free`
asks the bare question. The same prompt serves the main evaluation, --latency, --collapse, --probe and
--pointing.

Metrics (§B.4; the rules in pipeline/vqa_metrics.py): closed-ended accuracy (the prediction mapped to one choice by
its letter, its exact text, then token-F1: the fallback, whose share the report gives), open-ended token-F1,
multiple-choice accuracy (closed accuracy over the items that have choices).

Benchmark JSONL schema (one object a line; what tools/convert_benchmarks.py writes and `--bench` reads):
  {"id": str, "image": path (absolute, or relative to the JSONL), "question": str, "answer": str,
   "answer_type": "closed" | "open", "choices": [str, ...] (optional), "answer_index": int (with choices)}

Reads:  a checkpoint folder runs/<name>/phase<p>/ (config.json + adapter.safetensors: the checkpoint
        layout in pipeline/io.py section 5), DATA/samples.jsonl (test split: choices + answer_index),
        benchmark JSONL files.
Writes: OUT/predictions.jsonl (one line per item with its score and matched_by), OUT/metrics.json (with the
        protocol), OUT/table.md (shaped like a Table 1 row), with --latency OUT/latency.json, with --collapse
        OUT/collapse.json + OUT/collapse.png (inter-step cosine similarity of h_1..h_K, eq. 9, over the
        in-domain test split only), with --probe OUT/probes.json + OUT/probe_predictions.jsonl ("do the
        latents matter?": section 6), with --pointing OUT/pointing.json (section 7), with --text-window
        OUT/text_window.json (section 8: the decoded step k against the chain's step k, pipeline/text_window.py).

Probes (--probe; in-domain test items with choices, same checkpoint, same items, same batches), closed-ended
accuracy when what the loop feeds back as latent step k's input embedding is replaced (model.latent_loop's
`feed`): normal (h_{k-1}, the method), zero (a zero vector), h0 (h_0 at every step: no recurrence), shuffled
(the normal chain h_0..h_{K-1} of another item of the batch); and the normal loop at K = 0..4.

Pointing game (--pointing; the checkpoint's visual projector re-attached by pipeline/scaffolds.py, as for explain.py):
for each latent step, the share of test items whose heatmap cos(VP(h_k), patch feature) peaks on a patch
that the target's mask touches, dilated by one patch; beside it the chance level, the share of the image's
patches that count. With --k sample each item runs its own latent_steps and step k is scored over the items that
have a step k (a walk or order item's step k against the lesion that step reads).

Commands:
    python evaluate.py --ckpt runs/tiny-vital/phase3 --data data/phantom --out runs/tiny-vital/eval
    python evaluate.py --ckpt runs/vital/phase3 --data data/vital --bench data/benchmarks/vqa-rad.jsonl \\
        data/benchmarks/pmc-vqa.jsonl --out runs/vital/eval --latency --collapse
    python evaluate.py --ckpt runs/demo/vital/phase3 --data runs/demo/data --out runs/demo/eval_probe \\
        --k 4 --probe
The benchmark files come from their published test files through tools/convert_benchmarks.py
(VQA-RAD, PathVQA, SLAKE, PMC-VQA, GEMeX-RMCoT; its docstring has the commands), e.g.
    python tools/convert_benchmarks.py --format slake --src Slake1.0/test.json \\
        --out data/benchmarks/slake.jsonl
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file
from safetensors import safe_open

import model as M
from pipeline import io as IO
from pipeline import roi_encoder as RE
from pipeline import scaffolds as SC
from pipeline import text_window as TW
from pipeline.io import open_image
from pipeline.vqa_metrics import aggregate, mcnemar_p, score_item, table_md


class EvalError(Exception):
    """A problem with an input file or a checkpoint, reported as one message naming the file and field."""


# ----------------------------------------------------------------------------------------------------
# 1. Items: the in-domain test split of samples.jsonl and benchmark JSONL files (schema above).
# ----------------------------------------------------------------------------------------------------
def read_items_file(flag, path, writer):
    """An item file, read and parsed once -> [(line number, object)]. Each problem is one EvalError naming
    the flag or the line; `writer` says what makes the file."""
    if not os.path.isfile(path):
        raise EvalError(f"{flag}: {path}: no such file ({writer})")
    try:
        rows = IO.read_jsonl(path, EvalError)
    except UnicodeDecodeError as e:
        raise EvalError(f"{flag}: {path} is not a UTF-8 text JSONL file ({e})") from None
    for n, r in rows:
        if not isinstance(r, dict):
            raise EvalError(f"{path} line {n}: not a JSON object")
    return rows


def check_item(path, n, it, need):
    for field in need:
        if field not in it:
            raise EvalError(f"{path} line {n}: missing field '{field}'")
    if it.get("answer_type") not in ("closed", "open"):
        raise EvalError(f"{path} line {n}: field 'answer_type' must be 'closed' or 'open', "
                        f"got {it.get('answer_type')!r}")
    problem = IO.choices_problem(it)
    if problem:
        raise EvalError(f"{path} line {n}: {problem}")


def set_prompt(it, protocol):
    """it["prompt"]: what the model is asked (--protocol). `options`: an item that has choices with them
    (pipeline.io.ask, the text train.py shows); `free`: the bare question (the choice mapping does the rest)."""
    it["prompt"] = IO.ask(it["question"], it.get("choices") if protocol == "options" else None)
    return it


def read_test_split(data, protocol="options"):
    """In-domain test items (§B.4: every question closed-ended through its choices, except a caption,
    prepare_data.py --captions, which has none and is scored open-ended by token-F1); benchmark = source;
    each with its `prompt` (set_prompt)."""
    path = os.path.join(data, "samples.jsonl")
    items = []
    for n, r in read_items_file("--data", path, "prepare_data.py writes it"):
        if r.get("split") != "test":
            continue
        closed = r.get("question_type") != "caption"
        r = dict(r, answer_type="closed" if closed else "open",
                 benchmark=f"in-domain/{r.get('source', 'unknown')}")
        check_item(path, n, r, ("id", "image", "question", "answer", "latent_steps") +
                   (("choices", "answer_index") if closed else ()))
        r["image_path"] = os.path.join(os.path.dirname(os.path.abspath(path)), r["image"])
        items.append(set_prompt(r, protocol))
    if not items:
        raise EvalError(f"{path}: no item with split 'test' (prepare_data.py --test-frac)")
    return items


def read_benchmark(path, protocol="options"):
    """A benchmark JSONL (schema in the docstring); benchmark name = file stem; each item with its `prompt`."""
    name = os.path.splitext(os.path.basename(path))[0]
    rows = read_items_file(f"--bench {path}", path, "tools/convert_benchmarks.py writes them")
    if not rows:
        raise EvalError(f"--bench {path}: {path} holds no item")
    items = []
    for n, r in rows:
        check_item(path, n, r, ("image", "question", "answer", "answer_type"))
        r = dict(r, id=str(r.get("id", f"{name}-{n}")), benchmark=name)
        r["image_path"] = r["image"] if os.path.isabs(r["image"]) else \
            os.path.join(os.path.dirname(os.path.abspath(path)), r["image"])
        items.append(set_prompt(r, protocol))
    return items


# ----------------------------------------------------------------------------------------------------
# 2. The inference model: backbone + merged LoRA, unwrapped; nothing else is loaded.
# ----------------------------------------------------------------------------------------------------
def weight_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def load_inference_model(ckpt, backbone_path=None, device="cpu", dtype=torch.float32):
    """-> (backbone, processor, config, overhead report). Only adapter.safetensors is read."""
    config = IO.read_ckpt_config(ckpt)
    # train.py --pretrain: the checkpoint is the backbone itself, no LoRA
    pretrained = bool(config.get("args", {}).get("pretrain"))
    path = backbone_path or (os.path.join(ckpt, "backbone") if pretrained else
                             IO.ckpt_field(config, ckpt, "backbone_path", "args.backbone"))
    backbone, processor = IO.load_backbone(path, dtype=dtype, device=device)
    plain = dict(params=IO.count_params(backbone), bytes=weight_bytes(backbone))
    r = alpha = None
    if not pretrained:
        r, alpha = IO.ckpt_field(config, ckpt, "arch.lora")  # [r, alpha], as train.py checks warm starts
        M.add_lora(backbone, r, alpha, 0.0)
        # VITAL without decoder/VP: no scaffolds (and the pause arm's constants, if it is one: latent_feed)
        IO.load_checkpoint(ckpt, M.VITAL(backbone, pause_steps=IO.pause_rows(ckpt)), scaffolds=False)
        M.fold_lora(backbone)
    backbone.eval()
    deployed = dict(params=IO.count_params(backbone), bytes=weight_bytes(backbone))
    sc = os.path.join(ckpt, "scaffold.safetensors")
    report = dict(plain_backbone=plain, deployed=deployed, extra_params=deployed["params"] - plain["params"],
                  extra_bytes=deployed["bytes"] - plain["bytes"], lora=dict(r=r, alpha=alpha),
                  scaffold_bytes_left_on_disk=os.path.getsize(sc) if os.path.isfile(sc) else 0, backbone=path)
    return backbone, processor, config, report


# ----------------------------------------------------------------------------------------------------
# 3. Prediction: batches of one K, greedy answers.
# ----------------------------------------------------------------------------------------------------
def latent_feed(ckpt, device):
    """What latent step k is fed at inference: None (h_{k-1}, the method) or, for a checkpoint of the pause arm
    (train.py --feedback pause), its learned constants."""
    if not IO.pause_rows(ckpt):
        return None
    return M.pause_feed(load_file(os.path.join(ckpt, "adapter.safetensors"))["pause"].to(device))


def predict(backbone, processor, items, K, args, device):
    """Greedy answers for items that all run at the same K, args.batch_size at a time -> list of strings."""
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i in range(0, len(items), args.batch_size):
        chunk = items[i:i + args.batch_size]
        prefix = IO.build_prefix(processor, [open_image(r["image_path"], EvalError) for r in chunk],
                                [r["prompt"] for r in chunk]).to(device)
        ids, _ = M.generate(backbone, prefix, K, eos, args.max_new_tokens, getattr(args, "feed", None),
                            getattr(args, "readout", "head"))
        out += [s.strip() for s in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


def k_groups(items, k):
    """-> [(K, [item index])]: one group at K = k, or with k = 'sample' one group per latent_steps."""
    ks = [k] * len(items) if k != "sample" else [r.get("latent_steps") for r in items]
    if None in ks:
        bad = items[ks.index(None)]
        raise EvalError(f"--k sample needs latent_steps on every item; {bad['benchmark']} item "
                        f"{bad['id']} has none (benchmark files do not): evaluate them with a fixed --k")
    return [(K, [i for i, kk in enumerate(ks) if kk == K]) for K in sorted(set(ks))]


def latent_batches(vital, processor, items, K, batch_size, device):
    """The loop over the items in batches of one K (K = 'sample': grouped by latent_steps; a group of no step is
    skipped) -> per batch (its K, the items' indices, their images, h_1..h_K (B, K, d)), with the checkpoint's feed."""
    for Kg, idx in k_groups(items, K):
        for c in range(0, len(idx) if Kg > 0 else 0, batch_size):
            rows = idx[c:c + batch_size]
            images = [open_image(items[j]["image_path"], EvalError) for j in rows]
            prefix = IO.build_prefix(processor, images, [items[j]["prompt"] for j in rows]).to(device)
            yield Kg, rows, images, torch.cat(M.latent_loop(vital.backbone, prefix, Kg, vital.feed()).h[1:], dim=1)


def run_items(backbone, processor, items, k, args, device):
    """Score every item; `k` is an int (the same K for all) or 'sample' (grouped by latent_steps)."""
    rows = [None] * len(items)
    for K, idx in k_groups(items, k):
        preds = predict(backbone, processor, [items[i] for i in idx], K, args, device)
        for i, p in zip(idx, preds):
            it = items[i]
            rows[i] = dict(id=it["id"], benchmark=it["benchmark"], image=it["image_path"],
                           question=it["question"], answer=it["answer"], answer_type=it["answer_type"],
                           choices=it.get("choices"), answer_index=it.get("answer_index"), K=K, prediction=p,
                           **score_item(it, p))
    return rows


# ----------------------------------------------------------------------------------------------------
# 4. Latency (§4.3, Figure 4): per sample (B = 1), K = 0..4 on the same inputs, warm-up, medians.
#    total = prefix + K latent steps ("loop") + greedy answer; the answer part depends on its length,
#    which is how a K > 0 can be faster than K = 0 (shorter answers).
# ----------------------------------------------------------------------------------------------------
def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1000, out


@torch.no_grad()
def latency(backbone, processor, items, args, device):
    """Each sample alone (B = 1). Warm-up of every K first, then the K values are timed round-robin
    within each repeat, so that a slow start or clock drift does not favour the K timed last."""
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prefixes = [IO.build_prefix(processor, [open_image(r["image_path"], EvalError)], [r["prompt"]]).to(device)
                for r in items]
    Ks, feed, ro = range(0, 5), getattr(args, "feed", None), getattr(args, "readout", "head")
    total = {K: [[] for _ in prefixes] for K in Ks}
    loop = {K: [[] for _ in prefixes] for K in Ks}
    tokens = {K: [] for K in Ks}
    for s, p in enumerate(prefixes):
        for _ in range(args.warmup):
            for K in Ks:
                M.generate(backbone, p, K, eos, args.max_new_tokens, feed, ro)
        for r in range(args.repeats):
            for K in Ks:
                t, (ids, _) = timed(lambda: M.generate(backbone, p, K, eos, args.max_new_tokens, feed, ro), device)
                total[K][s].append(t)
                loop[K][s].append(timed(lambda: M.latent_loop(backbone, p, K, feed, ro), device)[0])
                if r == 0:  # answer tokens up to and including <|im_end|> (greedy: the same every repeat)
                    ids = ids[0].tolist()
                    tokens[K].append(ids.index(eos) + 1 if eos in ids else len(ids))
    res = {}
    for K in Ks:
        tot = statistics.median(statistics.median(x) for x in total[K])   # median over samples of medians
        lp = statistics.median(statistics.median(x) for x in loop[K])
        nt = statistics.mean(tokens[K])
        res[K] = dict(ms_per_sample=tot, loop_ms=lp, answer_ms=tot - lp, answer_tokens=nt,
                      ms_per_answer_token=(tot - lp) / max(nt, 1), ratio_to_K0=None)
    for K in Ks:
        res[K]["ratio_to_K0"] = res[K]["ms_per_sample"] / res[0]["ms_per_sample"]
    return dict(per_K=res, n_samples=len(items), warmup=args.warmup, repeats=args.repeats, batch_size=1,
                device=str(device), max_new_tokens=args.max_new_tokens,
                note="ms_per_sample = loop_ms (prefix + K latent steps) + answer_ms (greedy answer, grows "
                     "with answer_tokens): a K whose answers are shorter can be faster than K = 0 "
                     "(§4.3, Figure 4)")


# ----------------------------------------------------------------------------------------------------
# 5. Modality collapse (§C.6, eq. 9): S_ij = mean over test samples of cos(h_i, h_j), i, j = 1..K.
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def collapse_matrix(backbone, processor, items, K, batch_size, device):
    """S over the in-domain test set only (§C.6: "test samples" are the paper's own test split): items whose
    benchmark starts with "in-domain/"; external benchmark files are left out. collapse.json names them
    (n_samples, item_ids, benchmarks)."""
    items = [it for it in items if it["benchmark"].startswith("in-domain/")]
    if not items:
        raise EvalError("--collapse is computed on the in-domain test set (§C.6): pass --data with a "
                        "samples.jsonl that has test items")
    S, n = torch.zeros(K, K, dtype=torch.float64), 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        prefix = IO.build_prefix(processor, [open_image(r["image_path"], EvalError) for r in chunk],
                                [r["prompt"] for r in chunk]).to(device)
        st = M.latent_loop(backbone, prefix, K)
        h = F.normalize(torch.cat(st.h[1:], dim=1).double(), dim=-1)                        # (B, K, d)
        S += (h @ h.transpose(1, 2)).sum(0).cpu()                                            # (K, K)
        n += len(chunk)
    S = (S / n).tolist()
    off = [S[i][j] for i in range(K) for j in range(K) if i != j]
    return dict(K=K, n_samples=n, matrix=S, mean_offdiag=sum(off) / len(off) if off else None,
                adjacent=[S[i][i + 1] for i in range(K - 1)], set="in-domain test split",
                benchmarks=sorted({it["benchmark"] for it in items}), item_ids=[it["id"] for it in items])


def draw_collapse(res, path, cell=80):
    """K x K heatmap, value in each cell, colour scale fixed to [0, 1] so that runs compare."""
    K, S = res["K"], np.array(res["matrix"])
    font = ImageFont.load_default(size=14)
    left, top = 50, 40
    im = Image.new("RGB", (left + K * cell + 10, top + K * cell + 10), "white")
    dr = ImageDraw.Draw(im)
    dr.text((left, 8), f"inter-step cosine similarity (n={res['n_samples']})", fill="black", font=font)
    rgb = IO.colormap(S)
    for i in range(K):
        dr.text((10, top + i * cell + cell // 2 - 7), f"h{i + 1}", fill="black", font=font)
        dr.text((left + i * cell + cell // 2 - 8, top - 18), f"h{i + 1}", fill="black", font=font)
        for j in range(K):
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            dr.rectangle(box, fill=tuple(int(c) for c in rgb[i, j]))
            dr.text((box[0] + 18, box[1] + cell // 2 - 7), f"{S[i, j]:.3f}", font=font,
                    fill="white" if S[i, j] < 0.15 or S[i, j] > 0.85 else "black")
    im.save(path)


# ----------------------------------------------------------------------------------------------------
# 6. Probes: do the latents matter? Same checkpoint, same items, same batches; only the input embedding
#    of latent step k changes (model.latent_loop's `feed`), then the same greedy answer and scoring.
#    A batch of one has no partner for `shuffled`: a last batch of one item joins the previous batch
#    (and --batch-size 1 runs as 2), so every row of the table has the same n.
# ----------------------------------------------------------------------------------------------------
PROBES = dict(
    normal="h_{k-1}, the method (eq. 1)",
    zero="a zero vector at every step (the K steps still add K positions to the cache)",
    h0="h_0, the prompt's last state, at every step: K steps without recurrence",
    shuffled="item i gets h_{k-1} of item i-1 of its batch (roll by one: a derangement for B >= 2), "
             "taken from that item's normal loop: another item's chain, its own prompt and cache")


def probe_feeds(ref):
    """feed(k, st) -> (B, 1, d) for each probe; ref: the normal loop's LoopState on the same batch."""
    return dict(normal=None,
                zero=lambda k, st: torch.zeros_like(st.h[-1]),
                h0=lambda k, st: st.h[0],
                shuffled=lambda k, st: ref.h[k - 1].roll(1, dims=0))                 # row i <- row i-1


def probe_batches(items, batch_size):
    """Consecutive batches of >= 2 items: a last batch of one item joins the previous batch."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [chunks[-2] + chunks[-1]]
    return chunks


@torch.no_grad()
def probe_batch(backbone, processor, chunk, K, sweep, args, device):
    """-> ({probe: [prediction per item]} at K, {k: [prediction per item]}: the normal loop at each k of sweep other
    than K, whose answers are probes['normal'])."""
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prefix = IO.build_prefix(processor, [open_image(r["image_path"], EvalError) for r in chunk],
                            [r["prompt"] for r in chunk]).to(device)

    args_feed = getattr(args, "feed", None)

    def answer(k, feed=None):  # None: what the checkpoint feeds (h_{k-1}; the pause arm: its constants)
        ids, st = M.generate(backbone, prefix, k, eos, args.max_new_tokens, feed or args_feed,
                             getattr(args, "readout", "head"))
        return [s.strip() for s in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)], st

    probes = {}
    probes["normal"], ref = answer(K)  # ref.h = [h_0, ..., h_K] of the normal loop: what shuffled feeds
    for name, feed in probe_feeds(ref).items():
        if feed is not None:
            probes[name] = answer(K, feed)[0]
    return probes, {k: answer(k)[0] for k in sweep if k != K}


def probe_row(items, preds, base):
    """Accuracy (%) of one (probe, K), paired with `base`, the normal loop's predictions at --k."""
    ok = [score_item(it, p)["correct"] for it, p in zip(items, preds)]
    ok0 = [score_item(it, p)["correct"] for it, p in zip(items, base)]
    lost = sum(a and not b for a, b in zip(ok0, ok))
    gained = sum(b and not a for a, b in zip(ok0, ok))
    n = len(items)
    return dict(accuracy=100 * sum(ok) / n, n=n, correct=sum(ok),
                change_vs_normal=100 * (sum(ok) - sum(ok0)) / n,
                answers_changed=100 * sum(p != q for p, q in zip(preds, base)) / n, lost=lost, gained=gained,
                p_mcnemar=mcnemar_p(lost, gained))


def run_probes(backbone, processor, items, args, device):
    """The probes on the in-domain test items with choices -> (probes.json object, per-item rows)."""
    items = [it for it in items if it["benchmark"].startswith("in-domain/") and it.get("choices")]
    if len(items) < 2:
        raise EvalError(f"--probe needs >= 2 in-domain test items with choices (shuffled pairs items), "
                        f"got {len(items)}")
    K, bs = args.k, max(2, args.batch_size)
    # --k sample: each item at its own latent_steps, shuffled among items of the same K; the sweep is K = 0
    groups, sweep = k_groups(items, K), [0] if K == "sample" else sorted(set(range(5)) | {K})
    lone = [k for k, idx in groups if len(idx) < 2]
    if lone:
        raise EvalError(f"--probe --k sample pairs items of the same K (shuffled): latent_steps {lone[0]} "
                        "has one test item; probe at a fixed --k instead")
    groups = [(k, [items[i] for i in idx]) for k, idx in groups]
    items = [it for _, group in groups for it in group]  # the order of the predictions
    preds = {}
    for k_group, group in groups:
        for chunk in probe_batches(group, bs):
            probes, swept = probe_batch(backbone, processor, chunk, k_group, sweep, args, device)
            for name, p in probes.items():
                preds.setdefault((name, K), []).extend(p)
            for k, p in swept.items():
                preds.setdefault(("normal", k), []).extend(p)
    base = preds[("normal", K)]
    res = dict(K=K, n=len(items), chance=100 * statistics.mean(1 / len(it["choices"]) for it in items),
               batch_size=bs, batching="consecutive items; a last batch of one joins the previous batch",
               definitions=PROBES,
               probes={name: dict(K=K, **probe_row(items, preds[(name, K)], base)) for name in PROBES},
               k_sweep={str(k): dict(K=k, **probe_row(items, preds[("normal", k)], base)) for k in sweep})
    rows = [dict(id=it["id"], answer=it["answer"], answer_index=it["answer_index"],
                 predictions={f"{name} K={k}": p[i] for (name, k), p in preds.items()})
            for i, it in enumerate(items)]
    return res, rows


def probe_table(res):
    """The probes and the K sweep as one markdown table; changes are in points against normal at --k."""
    lines = [f"| probe | K | accuracy | n | change vs normal (K={res['K']}) | answers changed "
             "| lost / gained | p (McNemar) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    sweep = [("normal", r) for r in res["k_sweep"].values() if r["K"] != res["K"]]
    rows = list(res["probes"].items()) + sweep
    for name, r in rows:
        lines.append(f"| {name} | {r['K']} | {r['accuracy']:.1f} | {r['n']} | {r['change_vs_normal']:+.1f} | "
                     f"{r['answers_changed']:.1f} % | {r['lost']} / {r['gained']} | {r['p_mcnemar']:.3g} |")
    lines.append(f"| chance (mean 1/len(choices)) | | {res['chance']:.1f} | {res['n']} | "
                 f"{res['chance'] - res['probes']['normal']['accuracy']:+.1f} | | | |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# 7. The pointing game (--pointing): does the visual window point at the target?
# ----------------------------------------------------------------------------------------------------
def target_patches(mask_path, g):
    """-> ((g*g,) bool: patches the target's mask touches, dilated by one patch; (g*g,) bool: patches that
    are image, not padding), on the encoder's square grid (the image and the mask are padded alike)."""
    try:
        with Image.open(mask_path) as im:
            m = np.asarray(im.convert("L")) > 0
    except (OSError, ValueError) as e:
        raise EvalError(f"mask '{mask_path}': {e}") from e
    touched = (RE.grid_fraction(RE.square_pad(m), g) > 0).view(1, 1, g, g).float()
    target = F.max_pool2d(touched, 3, stride=1, padding=1).flatten() > 0       # dilated by one patch
    valid = RE.grid_fraction(RE.square_pad(np.ones_like(m)), g) >= 0.5
    return target, valid


def roi_targets(data, ids):
    """The L_vis targets (extract_roi.py's ROI features) of `ids` from <data>/roi.safetensors
    -> ((n, d_v) tensor, path), or (None, reason) when the file or a row is missing."""
    path = os.path.join(data, "roi.safetensors")
    if not os.path.isfile(path):
        return None, f"{path}: no such file"
    with safe_open(path, "pt") as f:
        rows = {i: j for j, i in enumerate(json.loads((f.metadata() or {}).get("ids", "[]")))}
        missing = [i for i in ids if i not in rows]
        if missing:
            return None, f"{path}: no row for {len(missing)} test item(s), e.g. '{missing[0]}'"
        return f.get_tensor("roi")[[rows[i] for i in ids]].float(), path


@torch.no_grad()
def pointing_game(ckpt, items, K, args, device, dtype):
    """Per latent step k: the share of test items whose heatmap cos(VP(h_k), patch) peaks inside the target
    (dilated by one patch), beside its chance level (the share of the image's patches that count as a hit)
    and its ceiling: the same game played by the ROI feature itself (what L_vis regresses VP(h_k) to), i.e.
    what a perfect visual projector would score with these targets. The model is explain.py's: the same
    checkpoint with its visual projector, and the encoder of the ROI targets. An item with step_masks (the
    walk) scores step k against the lesion move k lands on. K = 'sample': each item at its own latent_steps, step k
    scored over the items that have a step k (steps[k - 1]['n']). -> pointing.json object."""
    items = [it for it in items if it["benchmark"].startswith("in-domain/") and it.get("mask")]
    if not items:
        raise EvalError("--pointing needs in-domain test items with a mask (samples.jsonl 'mask')")
    try:
        vital, processor, _, config = SC.load_explainer(ckpt, device, dtype)
        path, kind, size, src = SC.resolve_encoder(config, ckpt, args.encoder)
    except IO.InputError as e:
        raise EvalError(f"--pointing: {e}") from e
    if vital.vp is None:
        raise EvalError(f"--pointing: {ckpt} has no visual projector (trained with --lambda-vis 0)")
    enc = RE.build_encoder(kind, path, device, size)
    roi, roi_src = roi_targets(args.data, [it["id"] for it in items])
    d_v = vital.vp.out.out_features
    if roi is not None and roi.shape[1] != d_v:
        roi, roi_src = None, f"{roi_src}: {roi.shape[1]}-d features, the checkpoint's are {d_v}-d"
    ks = [Kg for Kg, _ in k_groups(items, K) if Kg > 0]  # K = 'sample': an item of no latent step has none
    if not ks:
        raise EvalError("--pointing --k sample: no in-domain test item with a mask has a latent step")
    hits, seen, ceiling, chance, per_step = torch.zeros(max(ks)), torch.zeros(max(ks)), 0.0, [], 0
    for Kg, rows, images, h in latent_batches(vital, processor, items, K, args.batch_size, device):
        v = M.project_latent(vital.vp, h).cpu()                                                  # (B, Kg, d_v)
        for b, j in enumerate(rows):  # step k is scored over the items that have a step k
            it = items[j]
            f, _, _ = RE.patch_features(enc, images[b])
            # step k's target: the item's mask, or (a walk) the lesion move k lands on; past the last, the mask
            masks = [os.path.join(args.data, m) for m in it.get("step_masks", [])[:Kg]]
            masks += [os.path.join(args.data, it["mask"])] * (Kg + 1 - len(masks))                 # (Kg + 1,)
            read = {m: target_patches(m, enc.grid) for m in set(masks)}
            target, valid = torch.stack([read[m][0] for m in masks]), read[masks[-1]][1]         # (Kg + 1, g*g)
            # one heatmap per query: the Kg latent steps, then (for the ceiling) the item's own ROI target
            queries = v[b] if roi is None else torch.cat([v[b], F.normalize(roi[j:j + 1], dim=-1)])
            heat = RE.heatmaps(f.cpu(), queries, enc.grid).flatten(1)                         # (Kg [+ 1], g*g)
            peak = heat.masked_fill(~valid, -2).argmax(1)
            hit = target[torch.arange(len(peak)), peak].float()
            hits[:Kg] += hit[:Kg]
            seen[:Kg] += 1
            ceiling += hit[Kg:].sum().item()
            chance.append(target[:Kg, valid].float().mean().item())
            per_step += bool(it.get("step_masks"))
    n = int(seen[0])
    steps = [dict(k=k + 1, hit_rate=100 * hits[k].item() / seen[k].item(), n=int(seen[k])) for k in range(len(hits))]
    best = max(steps, key=lambda r: r["hit_rate"])
    return dict(K=K, n=n, n_step_masks=per_step, encoder=os.path.abspath(path), encoder_from=src, grid=enc.grid,
                chance=100 * statistics.mean(chance), steps=steps, best_step=best["k"],
                best_hit_rate=best["hit_rate"],
                ceiling=100 * ceiling / n if roi is not None else None,
                ceiling_from=os.path.abspath(roi_src) if roi is not None else None,
                ceiling_missing=None if roi is not None else roi_src,
                definition="hit: the heatmap's maximum patch is one the target's mask touches, or a neighbour "
                           "of one (dilated by one patch); chance: the share of the image's patches that "
                           "count as a hit, averaged over items; ceiling: the hit rate of the heatmap of the "
                           "ROI feature itself (the L_vis target), what a perfect visual projector scores; "
                           "n_step_masks items (the walk) score step k against the lesion move k lands on "
                           "(samples.jsonl step_masks; past the last move, and for the ceiling, the mask)")


def pointing_table(res):
    ceiling = "n/a" if res.get("ceiling") is None else f"{res['ceiling']:.1f}"
    lines = ["| pointing game | " + " | ".join(f"step {r['k']}" for r in res["steps"]) +
             " | chance | ceiling (the ROI target itself) | n |",
             "|---|" + "---:|" * (len(res["steps"]) + 3)]
    lines.append("| hit rate (%) | " + " | ".join(f"{r['hit_rate']:.1f}" for r in res["steps"]) +
                 f" | {res['chance']:.1f} | {ceiling} | {res['n']} |")
    if any(r.get("n", res["n"]) != res["n"] for r in res["steps"]):  # --k sample: step k over the items with one
        lines.append("| items with the step | " + " | ".join(str(r["n"]) for r in res["steps"]) + " | | | |")
    if res.get("n_step_masks"):
        lines.append(f"({res['n_step_masks']} walk items: step k scored against the lesion move k lands on)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# 8. The text window (--text-window): does the sentence decoded from h_k state step k's finding?
#    (the scoring rules: pipeline/text_window.py)
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def text_window(ckpt, items, K, args, device, dtype):
    """Greedy sentences of latent steps 1..min(K, chain length) for every in-domain test item with a reasoning
    chain, as explain.py decodes them, scored against the chain's step k (K = 'sample': the item's own
    latent_steps, as the walk is trained with --depth own). -> text_window.json object."""
    items = [it for it in items if it["benchmark"].startswith("in-domain/") and it.get("reasoning_chain")]
    if not items:
        raise EvalError("--text-window needs in-domain test items with a reasoning_chain (samples.jsonl)")
    try:
        vital, processor, dec_tok, _ = SC.load_explainer(ckpt, device, dtype)
    except IO.InputError as e:
        raise EvalError(f"--text-window: {e}") from e
    if vital.decoder is None:
        raise EvalError(f"--text-window: {ckpt} has no auxiliary decoder (trained with --lambda-sem 0)")
    # decode as long as the longest reference step (and its end token): a sentence cut short loses its finding
    longest = 1 + max(len(dec_tok(step, add_special_tokens=False)["input_ids"])
                      for it in items for step in it["reasoning_chain"])
    steps = []
    for Kg, rows, _, h in latent_batches(vital, processor, items, K, args.batch_size, device):
        text = M.decode_latent(vital.decoder, vital.pj_in, dec_tok, h.reshape(-1, h.shape[-1]), longest)
        for b, j in enumerate(rows):
            it, chain = items[j], items[j]["reasoning_chain"]
            steps += [dict(id=it["id"], question_type=it.get("question_type", "unknown"), K=Kg, k=k + 1,
                           ref=chain[k], decoded=text[b * Kg + k]) for k in range(min(Kg, len(chain)))]
    res = TW.score(steps)
    return dict(K=K, n_items=len(items), rows=res["rows"], steps=res["steps"], per_type=res["per_type"],
                items=res["items"], definition=TW.__doc__.strip())


# ----------------------------------------------------------------------------------------------------
# 9. Command line.
# ----------------------------------------------------------------------------------------------------
def get_args(argv=None):
    ap = argparse.ArgumentParser(description="VITAL evaluation (§4, §B.4, §C.6); benchmark files: "
                                             "tools/convert_benchmarks.py -h")
    # what is evaluated, on what, how
    ap.add_argument("--ckpt", required=True, help="checkpoint folder runs/<name>/phase<p> (config.json + adapter)")
    ap.add_argument("--data", help="folder with samples.jsonl: its test split is the in-domain benchmark")
    ap.add_argument("--bench", nargs="*", default=[], help="benchmark JSONL files (schema in the docstring)")
    ap.add_argument("--out", required=True, help="output folder for predictions, metrics, table, PNGs")
    ap.add_argument("--k", default="4", help="latent steps for every question (default 4, Table 3); "
                                              "'sample' = each test item's own latent_steps (diagnostic)")
    ap.add_argument("--protocol", default="options", choices=["options", "free"],
                    help="options (§B.4): an item's choices in the prompt; free: the bare question (docstring)")
    ap.add_argument("--backbone", help="override the backbone folder named in the checkpoint's config.json")
    ap.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="longest greedy answer")
    ap.add_argument("--limit", type=int, default=0, help="only the first N items of each benchmark (0 = all)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    # the analyses (docstring)
    ap.add_argument("--latency", action="store_true", help="also time K = 0..4 per sample (§4.3, Figure 4)")
    ap.add_argument("--latency-n", type=int, default=16, help="samples timed by --latency")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per sample and K before timing")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per sample and K (the median is kept)")
    ap.add_argument("--collapse", action="store_true",
                    help="also the inter-step similarity matrix (§C.6), on the in-domain test split only")
    ap.add_argument("--collapse-k", type=int, default=4, help="K of the collapse analysis (>= 2)")
    ap.add_argument("--probe", action="store_true",
                    help="also the probes 'do the latents matter?' (in-domain items with choices) -> probes.json")
    ap.add_argument("--pointing", action="store_true",
                    help="also the pointing game of the visual window (in-domain items with masks) -> pointing.json")
    ap.add_argument("--encoder", help="--pointing: the encoder folder (default: the one the checkpoint names)")
    ap.add_argument("--text-window", action="store_true",
                    help="also decode every test item's steps and score whether step k states its finding "
                         "(pipeline/text_window.py) -> text_window.json")
    args = ap.parse_args(argv)
    if args.k != "sample":
        try:
            args.k = int(args.k)
        except ValueError:
            ap.error(f"--k must be an integer >= 0 or 'sample', not {args.k!r}")
        if args.k < 0:
            ap.error("--k must be >= 0")
    if not args.data and not args.bench:
        ap.error("give --data (in-domain test split) and/or --bench files")
    if args.pointing and (args.k == 0 or not args.data):
        ap.error("--pointing needs --k >= 1 or 'sample', and --data (it scores the in-domain test split's masks)")
    if args.text_window and (args.k == 0 or not args.data):
        ap.error("--text-window needs --k >= 1 or 'sample', and --data (it scores the in-domain test split's "
                 "chains)")
    if args.probe and not args.data:
        ap.error("--probe needs --data (it probes the in-domain test split)")
    if args.collapse and args.collapse_k < 2:
        ap.error("--collapse-k must be >= 2 (a similarity between steps needs two steps)")
    return args


def select_items(args):
    """The in-domain test split and the benchmark files, each cut to its first --limit items."""
    items = []
    if args.data:
        items += read_test_split(args.data, args.protocol)
    for b in args.bench:
        items += read_benchmark(b, args.protocol)
    if args.limit > 0:
        items = [it for name in dict.fromkeys(r["benchmark"] for r in items)
                 for it in [r for r in items if r["benchmark"] == name][:args.limit]]
    return items


def check_run(args):
    """The numbers, the output folder, the checkpoint's config and the backbone folder it names."""
    numbers = [("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
               ("--limit", args.limit, 0), ("--latency-n", args.latency_n, 1), ("--warmup", args.warmup, 0),
               ("--repeats", args.repeats, 1)]
    for flag, value, least in numbers:
        if value < least:
            raise EvalError(f"{flag} must be >= {least}, got {value}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise EvalError(f"--out {args.out} is a file, not a folder")
    config = IO.read_ckpt_config(args.ckpt)  # no config.json or adapter: CheckpointError
    backbone = args.backbone or (os.path.join(args.ckpt, "backbone") if config.get("args", {}).get("pretrain")
                                 else IO.ckpt_field(config, args.ckpt, "backbone_path", "args.backbone"))
    if not os.path.isfile(os.path.join(str(backbone), "config.json")):
        src = "--backbone" if args.backbone else f"{args.ckpt}/config.json"
        raise EvalError(f"backbone folder '{backbone}' (from {src}) does not exist or holds no config.json: "
                        "pass --backbone FOLDER")


def check_items(items):
    """The fields the prompt and the scoring read have their types (the readers checked that they exist);
    every image is opened once, the header only: cheap, and a non-image is caught here."""
    images = {}
    for it in items:
        where = f"{it['benchmark']} item {it['id']!r}"
        if not isinstance(it["question"], str) or not it["question"].strip():
            raise EvalError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(it["answer"], str):
            raise EvalError(f"{where}: 'answer' must be a string, got {type(it['answer']).__name__}")
        if not isinstance(it["image"], str):
            raise EvalError(f"{where}: 'image' must be a path")
        images.setdefault(it["image_path"], where)
    for path, where in images.items():
        if not os.path.isfile(path):
            raise EvalError(f"{where}: image '{path}': no such file")
        try:
            with Image.open(path) as im:
                im.size
        except Exception as e:  # not an image, unknown format, decompression bomb
            raise EvalError(f"{where}: image '{path}' cannot be read as an image ({type(e).__name__}: {e})")


def check_inputs(args):
    """Everything a run reads, checked BEFORE the model is loaded (minutes at real scale): the checkpoint's
    config, the backbone folder, the output folder, every item file (parsed once, here), every item's fields
    and image. -> the items. Each problem is one EvalError or CheckpointError line naming the file (and line
    or item)."""
    check_run(args)
    items = select_items(args)
    if args.collapse and not any(it["benchmark"].startswith("in-domain/") for it in items):
        raise EvalError("--collapse is computed on the in-domain test set (§C.6): pass --data with a "
                        "samples.jsonl that has test items")
    check_items(items)
    return items


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)  # strict JSON: a NaN raises here, not in a reader


def main(argv=None):
    args = get_args(argv)
    device, dtype = IO.device_and_dtype(args.device)
    items = check_inputs(args)  # every input file, before the model is loaded
    backbone, processor, config, overhead = load_inference_model(args.ckpt, args.backbone, device, dtype)
    args.feed = latent_feed(args.ckpt, device)  # the pause arm's constants, else None (h_{k-1})
    args.readout = IO.readout_of(config)  # how the checkpoint's answer reads h_K (train.py --readout)
    print(f"deployed model: {overhead['deployed']['params']:,} parameters = plain backbone "
          f"{overhead['plain_backbone']['params']:,} (+{overhead['extra_params']}), weights "
          f"{overhead['deployed']['bytes'] / 2**20:.1f} MiB (+{overhead['extra_bytes']} B); scaffolds left "
          f"on disk ({overhead['scaffold_bytes_left_on_disk'] / 2**20:.1f} MiB)")
    os.makedirs(args.out, exist_ok=True)
    rows = run_items(backbone, processor, items, args.k, args, device)
    with open(os.path.join(args.out, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    metrics = aggregate(rows)
    label = f"VITAL (K={args.k})"
    result = dict(ckpt=os.path.abspath(args.ckpt), phase=config.get("phase"), step=config.get("step"),
                  K=args.k, readout=args.readout, protocol=args.protocol, device=str(device), benchmarks=metrics,
                  overhead=overhead)
    if args.latency:
        result["latency"] = latency(backbone, processor, items[:args.latency_n], args, device)
        write_json(result["latency"], os.path.join(args.out, "latency.json"))
        for K, v in result["latency"]["per_K"].items():
            print(f"latency K={K}: {v['ms_per_sample']:.1f} ms/sample (x{v['ratio_to_K0']:.2f} of K=0), "
                  f"loop {v['loop_ms']:.1f} ms, answer {v['answer_tokens']:.1f} tokens")
    if args.collapse:
        coll = collapse_matrix(backbone, processor, items, args.collapse_k, args.batch_size, device)
        result["collapse"] = coll
        write_json(coll, os.path.join(args.out, "collapse.json"))
        draw_collapse(coll, os.path.join(args.out, "collapse.png"))
        print(f"collapse: mean off-diagonal cosine {coll['mean_offdiag']:.4f}, adjacent "
              + ", ".join(f"{a:.4f}" for a in coll["adjacent"]))
    if args.probe:
        result["probes"], prows = run_probes(backbone, processor, items, args, device)
        write_json(result["probes"], os.path.join(args.out, "probes.json"))
        with open(os.path.join(args.out, "probe_predictions.jsonl"), "w") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in prows)
        print(probe_table(result["probes"]) + f"wrote {args.out}/probes.json, probe_predictions.jsonl")
    if args.pointing:
        result["pointing"] = pointing_game(args.ckpt, items, args.k, args, device, dtype)
        write_json(result["pointing"], os.path.join(args.out, "pointing.json"))
        print(pointing_table(result["pointing"]) + f"wrote {args.out}/pointing.json")
    if args.text_window:
        tw = text_window(args.ckpt, items, args.k, args, device, dtype)
        write_json(tw, os.path.join(args.out, "text_window.json"))  # with every decoded step
        result["text_window"] = {k: v for k, v in tw.items() if k != "items"}
        print(TW.table(tw) + f"wrote {args.out}/text_window.json")
    write_json(result, os.path.join(args.out, "metrics.json"))
    table = table_md(metrics, label)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table + f"wrote {args.out}/predictions.jsonl, metrics.json, table.md")
    return result


if __name__ == "__main__":
    try:
        main()
    except (EvalError, IO.CheckpointError) as e:
        sys.exit(f"evaluate.py: error: {e}")
