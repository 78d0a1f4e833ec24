"""
VITAL stage 5: post-hoc dual interpretability (paper §3.3 "Dual Interpretability", §4.2 Figure 3, §C.7
Figure 12).

The scaffolds dropped at inference are re-attached to read every latent state h_1..h_K of one question:
    text window    the auxiliary decoder reads h_k out as a sentence: decoder([pj_in(h_k)]) greedy (§3.3)
    visual window  VP(h_k) lives in the frozen encoder's feature space (it was trained to regress the ROI
                   feature there), so its cosine similarity with every patch feature of the FULL image,
                   encoded exactly as extract_roi.py does (the same pipeline/roi_encoder.py), is a heatmap of
                   where step k "looks" (§C.7); with --bank, the nearest training ROI features (§3.3
                   nearest-neighbour retrieval) with their ids, scores and thumbnails.
The answer itself comes from the unchanged inference path (merged LoRA, latent loop, greedy), so the
explanation never alters what the model says. The readouts are approximations of the latent states, not
a faithful account of the decision (paper, Limitations).

Reads:  the newest checkpoint under runs/ (or --ckpt): config.json, adapter.safetensors,
        scaffold.safetensors (pj_in, decoder, vp; the checkpoint layout in pipeline/io.py section 5); the
        backbone and decoder folders named in its config.json; the SigLIP encoder folder (--encoder, else
        config.json's encoder_path, else the encoder recorded in the run's roi.safetensors, else the tiny
        preset's <models>/encoder); optionally --bank roi.safetensors.
Writes: OUT.png   a panel like Figure 3/12: the image, one heatmap per step with its sentence, the answer
        OUT.json  the same content as numbers: answer, per step sentence, heatmap grid (raw cosine), peak
        OUT_bank/ thumbnails of the nearest ROIs (with --bank)
        OUT is --out, by default next to the checkpoint: <ckpt>/explain/<image name without extension>.
        Text on stdout and in the panel is printable only (an untrained decoder can emit control bytes,
        which are stripped); OUT.json keeps the raw strings (JSON escapes them) and is strict JSON.

Commands:
    python explain.py img.png "Where is the lesion located?"
    python explain.py img.png "Describe the liver." --ckpt runs/vital/phase3 --k 4 \\
        --bank data/vital/roi.safetensors
    python explain.py img.png "Is there a nodule?" --encoder ckpt/medsiglip-448 --out figs/case1
"""
import argparse
import json
import os
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open

import model as M
from pipeline import io as IO
from pipeline import roi_encoder as RE
from pipeline import scaffolds as SC
from pipeline.io import open_image, write_strict_json


class ExplainError(Exception):
    """A problem with the inputs, reported as one message that says what to do."""


HOW_TO_TRAIN = ("make one with `bash demo.sh` (the whole pipeline, ~15 min on 2 CPU cores), or on the "
                "embedded default with `python train.py --phase 1` (then --phase 2 and 3), "
                "or pass --ckpt FOLDER")


# ----------------------------------------------------------------------------------------------------
# 1. Which checkpoint (pipeline/scaffolds.py re-attaches its scaffolds and names its encoder).
# ----------------------------------------------------------------------------------------------------
def find_checkpoint(runs):
    """The newest checkpoint folder under `runs` (by config.json mtime) that has the scaffolds; .tmp/.old
    folders are skipped. Says which one it took, and which newer ones it passed over."""
    found = []
    for root, dirs, files in os.walk(runs):
        dirs[:] = [d for d in dirs if not d.endswith((".tmp", ".old")) and d != "trainer"]
        if "config.json" in files and "adapter.safetensors" in files:
            found.append((os.path.getmtime(os.path.join(root, "config.json")), root))
    if not found:
        raise ExplainError(f"no checkpoint found under '{runs}/' (a folder with config.json + "
                           "adapter.safetensors); " + HOW_TO_TRAIN)
    found.sort(reverse=True)
    usable = [f for _, f in found if SC.has_scaffolds(f)]
    if not usable:
        raise ExplainError(f"none of the {len(found)} checkpoints under '{runs}/' keeps the scaffolds "
                           f"explain needs (a K = 0 model or a pretraining has none; newest: {found[0][1]}); "
                           + HOW_TO_TRAIN)
    folders = [f for _, f in found]
    skipped = folders[:folders.index(usable[0])]  # newer, but a K = 0 model or a pretraining
    note = f"; passed over newer ones without scaffolds: {', '.join(skipped)}" if skipped else ""
    print(f"using {usable[0]}: the newest checkpoint under '{runs}/' with the scaffolds{note}", flush=True)
    return usable[0]


# ----------------------------------------------------------------------------------------------------
# 2. The two windows.
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_and_latents(vital, processor, image, args, device):
    """The ordinary inference path for args.question at K = args.k -> (answer text, h (K, d) = h_1..h_K)."""
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prefix = IO.build_prefix(processor, [image], [args.question]).to(device)
    ids, st = M.generate(vital.backbone, prefix, args.k, eos, args.max_new_tokens, vital.feed(), vital.readout)
    answer = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()
    return answer, torch.cat(st.h[1:], dim=1)[0]                                             # (K, d)


def grid_to_image(heat, box, s):
    """A (g, g) heatmap over the square view -> (H, W) array over the original image (bilinear)."""
    big = Image.fromarray(heat.numpy().astype(np.float32), mode="F").resize((s, s), Image.BILINEAR)
    return np.asarray(big)[box[1]:box[3], box[0]:box[2]]


def nearest_rois(bank_path, v, top):
    """Nearest training ROI features of each VP(h_k) by cosine (§3.3 retrieval)
    -> (per step [(id, score, row)], the bank's metadata, its `box` tensor or None)."""
    if not os.path.isfile(bank_path):
        raise ExplainError(f"--bank {bank_path}: no such file (extract_roi.py writes roi.safetensors)")
    with safe_open(bank_path, "pt") as f:
        meta = f.metadata() or {}
        roi = f.get_tensor("roi").float()
        box = f.get_tensor("box") if "box" in f.keys() else None
    if "ids" not in meta:
        raise ExplainError(f"--bank {bank_path}: metadata has no 'ids' list")
    if roi.shape[1] != v.shape[1]:
        raise ExplainError(f"--bank {bank_path}: features are {roi.shape[1]}-d, the visual projector gives "
                           f"{v.shape[1]}-d (a bank from another encoder?)")
    ids = json.loads(meta["ids"])
    scores = v.float() @ F.normalize(roi, dim=-1).T                                          # (K, N)
    val, idx = scores.topk(min(top, len(ids)), dim=-1)
    nearest = [[(ids[j], float(s), j) for s, j in zip(val[k].tolist(), idx[k].tolist())]
               for k in range(len(v))]
    return nearest, meta, box


def bank_thumbnails(bank, meta, box, out_dir, size=64):
    """Crop each neighbour's encoded region (roi.safetensors `box`) out of its image (samples.jsonl)."""
    samples = meta.get("samples")
    images = {}
    if samples and os.path.isfile(samples):
        for _, r in IO.read_jsonl(samples, ExplainError):
            images[r.get("id")] = os.path.join(os.path.dirname(samples), r.get("image", ""))
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for k, step in enumerate(bank, 1):
        row = []
        for rank, (sid, score, j) in enumerate(step, 1):
            thumb = None
            if sid in images and os.path.isfile(images[sid]):
                im = IO.load_image(images[sid])
                if box is not None:
                    im = im.crop(tuple(int(x) for x in box[j].tolist()))
                im.thumbnail((size, size))
                thumb = os.path.join(out_dir, f"step{k}_top{rank}.png")
                im.save(thumb)
            row.append(dict(id=sid, score=score, thumbnail=thumb))
        out.append(row)
    return out


@dataclass
class VisualWindow:
    """What the visual window shows: VP(h_k) against every patch of the full image, on the encoder's square
    view of it."""
    heat: torch.Tensor  # (K, g, g) raw cosine
    box: tuple  # the image inside the square view (x0, y0, x1, y1), in square pixels
    s: int  # side of the square view
    bank: list = None  # with --bank: per step, its nearest training ROIs
    encoder: dict = None  # which encoder, for OUT.json


def visual_window(vital, h, image, config, args, device):
    """VP(h_k) against every patch of the full image -> VisualWindow (with --bank, the neighbours'
    thumbnails are written next to args.out). The encoder must be the one the ROI targets came from: its
    width is VP's output width d_v."""
    path, kind, size, src = SC.resolve_encoder(config, args.ckpt, args.encoder, ExplainError)
    try:
        enc = RE.build_encoder(kind, path, device, size)
    except (OSError, ValueError) as e:  # a folder of another model type, missing weights
        raise ExplainError(f"encoder folder '{path}' (from {src}): {e}") from None
    v = M.project_latent(vital.vp, h)                                                       # (K, d_v)
    if v.shape[1] != enc.dim:
        raise ExplainError(f"the visual projector gives {v.shape[1]}-d features but encoder '{path}' (from "
                           f"{src}) has width {enc.dim}: pass --encoder with the encoder the ROI targets "
                           "came from")
    f, box, s = RE.patch_features(enc, image)
    heat = RE.heatmaps(f.cpu(), v.cpu(), enc.grid)                                          # (K, g, g)
    enc_info = dict(path=os.path.abspath(path), kind=kind, from_=src, grid=enc.grid, d_v=enc.dim)
    bank = None
    if args.bank:
        nb, meta, bbox = nearest_rois(args.bank, v.cpu(), args.bank_top)
        bank = bank_thumbnails(nb, meta, bbox, args.out + "_bank")
    return VisualWindow(heat, box, s, bank, enc_info)


# ----------------------------------------------------------------------------------------------------
# 3. The panel (Figure 3/12): header (question, answer), then the image and one overlay per step, each
#    with its decoded sentence below, then (with --bank) the nearest ROI thumbnails of each step.
# ----------------------------------------------------------------------------------------------------
MARGIN, HEADER, CAPTION, BANK_ROW = 10, 56, 110, 96


def panel_size(K, tile, bank):
    """(width, height) of the panel: K + 1 tiles in a row; the bank row only with --bank."""
    return MARGIN + (K + 1) * (tile + MARGIN), HEADER + tile + CAPTION + (BANK_ROW if bank else 0) + MARGIN


def square_view(image, tile):
    W, H = image.size
    return RE.pad_image(image, (0, 0, W, H)).resize((tile, tile), Image.BILINEAR)


def overlay(image, heat_img, box, s, tile, alpha=0.5):
    """The heatmap (min-max scaled per step, as in Figure 12) blended over the grey image, in the square
    view."""
    lo, hi = float(heat_img.min()), float(heat_img.max())
    rgb = IO.colormap((heat_img - lo) / (hi - lo) if hi > lo else np.zeros_like(heat_img))
    grey = np.asarray(image.convert("L").convert("RGB"), dtype=np.float32)
    mixed = ((1 - alpha) * grey + alpha * rgb).round().astype(np.uint8)
    sq = Image.new("RGB", (s, s))
    sq.paste(Image.fromarray(mixed), box[:2])
    return sq.resize((tile, tile), Image.BILINEAR)


def printable(text):
    """An untrained or tiny model can emit control bytes (a terminal would act on them, the font would draw
    boxes): whitespace controls become a space, every other non-printable character is dropped."""
    return "".join(c if c.isprintable() else " " if c.isspace() else "" for c in text)


def draw_panel(path, image, answer, steps, win, args):
    """The panel of args.question and its answer, at args.tile px a tile -> its (width, height)."""
    question, box, s, tile, bank = args.question, win.box, win.s, args.tile, win.bank
    K = len(steps)
    W, H = panel_size(K, tile, bank is not None)
    im = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(im)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    width_chars = max(20, (W - 2 * MARGIN) // 8)
    dr.text((MARGIN, 6), textwrap.shorten(printable(f"Q: {question}"), width_chars), fill="black", font=font)
    dr.text((MARGIN, 28), textwrap.shorten(printable(f"A: {answer or '(empty)'}"), width_chars),
            fill=(0, 90, 0), font=font)
    x = MARGIN
    im.paste(square_view(image, tile), (x, HEADER))
    dr.text((x, HEADER + tile + 4), "input image", fill="black", font=font)
    for k, st in enumerate(steps, 1):
        x = MARGIN + k * (tile + MARGIN)
        im.paste(overlay(image, st["heat_img"], box, s, tile), (x, HEADER))
        text = printable(f"h{k}: {st['sentence']}") if st["sentence"] is not None else f"h{k}"
        lines = textwrap.wrap(text, max(10, tile // 6))[:6]
        for i, line in enumerate(lines):
            dr.text((x, HEADER + tile + 4 + 15 * i), line, fill="black", font=small)
        if bank is not None:
            y = HEADER + tile + CAPTION
            n = max(1, len(bank[k - 1]))
            t = min(64, (tile - (n - 1) * 4) // n)
            for j, nb in enumerate(bank[k - 1]):
                if nb["thumbnail"]:
                    with Image.open(nb["thumbnail"]) as th:
                        im.paste(th.convert("RGB").resize((t, t)), (x + j * (t + 4), y))
                dr.text((x + j * (t + 4), y + t + 2), f"{nb['score']:.2f}", fill="black", font=small)
    im.save(path)
    return im.size


# ----------------------------------------------------------------------------------------------------
# 4. Command line.
# ----------------------------------------------------------------------------------------------------
def get_args(argv=None):
    ap = argparse.ArgumentParser(description="VITAL dual interpretability: text and visual window of every "
                                             "latent step")
    ap.add_argument("image", help="image file (PNG, JPEG, ... ; 16-bit grey is scaled like extract_roi.py)")
    ap.add_argument("question", help="the question about the image")
    ap.add_argument("--ckpt",
                    help="checkpoint folder runs/<name>/phase<p> (default: the newest under --runs)")
    ap.add_argument("--runs", default="runs", help="where to look for the newest checkpoint")
    ap.add_argument("--k", type=int, default=4, help="latent steps (default 4, as evaluate.py)")
    ap.add_argument("--encoder",
                    help="SigLIP encoder folder (default: the one the checkpoint's data was made with)")
    ap.add_argument("--bank",
                    help="roi.safetensors whose ROI features are searched for each step's nearest ones")
    ap.add_argument("--bank-top", type=int, default=3, help="nearest ROIs shown per step")
    ap.add_argument("--out",
                    help="output stem: writes OUT.png and OUT.json (default <ckpt>/explain/<image name>)")
    ap.add_argument("--tile", type=int, default=224, help="side of one panel tile in pixels")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="longest answer")
    ap.add_argument("--max-step-tokens", type=int, default=64,
                    help="longest decoded step sentence (the tiny demo tokenizer splits the order question's steps into "
                         "up to 60 tokens)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    args = ap.parse_args(argv)
    if args.k < 1:
        ap.error("--k must be >= 1: there is no latent step to explain at K = 0")
    if not args.question.strip():
        ap.error("the question is empty")
    for flag, value, least in (("--tile", args.tile, 32), ("--bank-top", args.bank_top, 1),
                               ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--max-step-tokens", args.max_step_tokens, 1)):
        if value < least:
            ap.error(f"{flag} must be >= {least}")
    return args


def step_record(k, sentence, win):
    """Step k (0-based) as a dict: its sentence and, with the visual window, its heatmap (raw cosine over
    the grid), the peak patch, the heatmap over the image (`heat_img`, for the panel) and the neighbours."""
    st = dict(k=k + 1, sentence=sentence)
    if win is not None:
        heat, box, s = win.heat, win.box, win.s
        g = heat.shape[-1]
        r, c = divmod(int(heat[k].flatten().argmax()), g)
        cell = s / g  # patch side in square pixels; the peak's centre in original image pixels:
        st.update(heatmap=heat[k].tolist(), peak=dict(row=r, col=c, cos=float(heat[k].max()),
                  x=(c + 0.5) * cell - box[0], y=(r + 0.5) * cell - box[1]),
                  cos_min=float(heat[k].min()), cos_max=float(heat[k].max()))
        st["heat_img"] = grid_to_image(heat[k], box, s)
        if win.bank is not None:
            st["nearest_rois"] = win.bank[k]
    return st


def print_steps(ckpt, question, answer, steps):
    """The answer and every step on stdout, printable text only."""
    print(f"checkpoint: {printable(ckpt)}\nQ: {printable(question)}\nA: {printable(answer)}")
    for st in steps:
        where = ""
        if "peak" in st:
            where = f"  [looks at x={st['peak']['x']:.0f}, y={st['peak']['y']:.0f}, cos {st['cos_max']:.3f}]"
        sentence = printable(st["sentence"]) if st["sentence"] is not None else "(no text decoder)"
        print(f"step {st['k']}: {sentence}{where}")


def explain(args):
    image = open_image(args.image, ExplainError)
    device, dtype = IO.device_and_dtype(args.device)
    args.ckpt = args.ckpt or find_checkpoint(args.runs)  # both resolved here: visual_window reads them
    args.out = args.out or os.path.join(args.ckpt, "explain", os.path.splitext(os.path.basename(args.image))[0])
    try:
        vital, processor, dec_tok, config = SC.load_explainer(args.ckpt, device, dtype, ExplainError)
    except (IO.CheckpointError, FileNotFoundError, ValueError) as e:
        raise ExplainError(str(e)) from None
    answer, h = answer_and_latents(vital, processor, image, args, device)
    sentences = [None] * args.k  # text window: only with the decoder + pj_in
    if vital.decoder is not None:
        sentences = M.decode_latent(vital.decoder, vital.pj_in, dec_tok, h, args.max_step_tokens)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    except OSError as e:
        raise ExplainError(f"cannot write {args.out}.png/.json ({e}): pass --out STEM in a writable "
                           "folder") from None
    result = dict(image=os.path.abspath(args.image), question=args.question, answer=answer, K=args.k,
                  ckpt=os.path.abspath(args.ckpt), steps=[])
    win = None
    if vital.vp is not None:  # visual window: only with the visual projector
        win = visual_window(vital, h, image, config, args, device)
    if win is not None and not torch.isfinite(win.heat).all():  # strict JSON has no NaN
        raise ExplainError(f"the checkpoint '{args.ckpt}' gives non-finite latent states (NaN or inf): it is "
                           "broken or was trained with a diverging loss")
    steps = [step_record(k, sentences[k], win) for k in range(args.k)]
    print_steps(args.ckpt, args.question, answer, steps)
    if win is not None:
        size = draw_panel(args.out + ".png", image, answer, steps, win, args)
        result.update(panel=os.path.abspath(args.out + ".png"), panel_size=list(size), encoder=win.encoder)
        print(f"wrote {args.out}.png ({size[0]}x{size[1]}) and {args.out}.json")
    else:
        print(f"no visual projector in this checkpoint: no heatmaps; wrote {args.out}.json")
    result["steps"] = [{k: v for k, v in st.items() if k != "heat_img"} for st in steps]
    write_strict_json(result, args.out + ".json")
    return result


def main(argv=None):
    return explain(get_args(argv))


if __name__ == "__main__":
    try:
        main()
    except ExplainError as e:
        sys.exit(f"explain.py: error: {e}")
