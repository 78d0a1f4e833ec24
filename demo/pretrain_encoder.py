"""
The tiny ROI encoder's stand-in for MedSigLIP's pretraining (demo only; a real run uses MedSigLIP-448).

L_vis regresses the ROI feature of a frozen medical vision encoder, and the visual window compares VP(h_k)
with that encoder's patch features. A random tiny SigLIP gives features that say little about what the
target is, so L_vis would teach nothing and the heatmaps would mean nothing. This script trains the tiny
SigLIP the way SigLIP is trained: a transformers `SiglipModel` (its vision tower = the random encoder of
embedded/tiny.py, plus a small text tower) with its sigmoid image-text loss, on the target-free captions of
the backbone's pretraining corpus (phantom images of another seed than the VITAL data: no image is shared).
It saves the vision tower as a from_pretrained SiglipVisionModel folder; extract_roi.py --encoder and
explain.py read it exactly like MedSigLIP.

    python demo/pretrain_encoder.py --data runs/demo/pretrain_data --models runs/demo/models \\
        --out runs/demo/encoder_pretrained
    -> runs/demo/encoder_pretrained/{config.json, model.safetensors, preprocessor_config.json,
       pretrain.json (loss per epoch, held-out image->caption retrieval)}
The demo copies the result shipped in embedded/pretrained/encoder_pretrained/ instead (stand_ins.json lists the
command and sha256); `demo/run.py --rebuild-stand-ins` runs this script.
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
from transformers import (AutoTokenizer, SiglipConfig, SiglipImageProcessorPil, SiglipModel,
                          SiglipVisionModel)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from pipeline import io as IO  # noqa: E402
from pipeline.roi_encoder import pad_image  # noqa: E402


def read_captions(data):
    """-> [(image path, caption)] of the corpus' caption items (prepare_data.py --captions)."""
    path = os.path.join(data, "samples.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"pretrain_encoder.py: error: {path}: no such file (prepare_data.py --captions writes it)")
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("question_type") == "caption":
                out.append((os.path.join(data, r["image"]), r["answer"]))
    if not out:
        sys.exit(f"pretrain_encoder.py: error: {path} holds no caption item (prepare_data.py --captions)")
    return out


def pixels(paths, proc):
    """Images as the encoder sees them (square, resized, normalised), kept as uint8 until a batch needs
    them. -> (N, 3, R, R) uint8."""
    R = proc.size["height"]
    out = torch.empty(len(paths), 3, R, R, dtype=torch.uint8)
    for i, p in enumerate(paths):
        im = IO.load_image(p)
        im = pad_image(im, (0, 0) + im.size).resize((R, R), resample=proc.resample)  # as extract_roi.py
        out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def normalise(x, proc):
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def build(models, text_len):
    """SiglipModel: the tiny random encoder's vision tower (its own weights) + a small random text tower."""
    enc_dir = os.path.join(models, "encoder")
    vision = SiglipVisionModel.from_pretrained(enc_dir)
    tok = AutoTokenizer.from_pretrained(os.path.join(models, "backbone"))
    vc = vision.config
    cfg = SiglipConfig(text_config=dict(vocab_size=len(tok), hidden_size=vc.hidden_size,
                                        intermediate_size=vc.intermediate_size, num_hidden_layers=2,
                                        num_attention_heads=vc.num_attention_heads,
                                        max_position_embeddings=text_len, pad_token_id=tok.pad_token_id,
                                        bos_token_id=None, eos_token_id=tok.eos_token_id),
                       vision_config=vc.to_dict())
    clip = SiglipModel(cfg)
    with torch.no_grad():  # SigLIP's own start (t' = log 10, b = -10); at 0 / 0 every embedding collapses to one
        clip.logit_scale.fill_(np.log(10.0))
        clip.logit_bias.fill_(-10.0)
    clip.vision_model.load_state_dict(vision.state_dict())
    return clip, tok, SiglipImageProcessorPil.from_pretrained(enc_dir), vision


@torch.no_grad()
def retrieval(clip, x, ids, proc, bs=256):
    """Image -> caption top-1 accuracy over a held-out set (a caption shared by several images counts as
    right if any image with that caption is retrieved: the captions are coarse)."""
    clip.eval()
    img = torch.cat([clip.get_image_features(pixel_values=normalise(x[i:i + bs], proc)).pooler_output
                     for i in range(0, len(x), bs)])
    txt = clip.get_text_features(input_ids=ids).pooler_output  # transformers 5: the towers' outputs
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    best = sim.argmax(1)
    same = (ids[best] == ids).all(1)
    clip.train()
    return 100 * same.float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="corpus folder with caption items (prepare_data --captions)")
    ap.add_argument("--models", required=True, help="tiny models folder (embedded/tiny.py): encoder/ is trained")
    ap.add_argument("--out", required=True, help="output folder: the trained vision tower")
    ap.add_argument("--epochs", type=int, default=20, help="epochs over the captions")
    ap.add_argument("--batch-size", type=int, default=64, help="image-caption pairs per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, one-cycle)")
    ap.add_argument("--heldout", type=int, default=200, help="images kept out to measure retrieval")
    ap.add_argument("--seed", type=int, default=0, help="seed of init, order and held-out split")
    args = ap.parse_args(argv)
    if os.path.isfile(os.path.join(args.out, "pretrain.json")):
        print(f"{args.out} already holds a trained encoder (pretrain.json): nothing to do")
        return
    torch.manual_seed(args.seed)
    t0 = time.time()
    pairs = read_captions(args.data)
    random.Random(args.seed).shuffle(pairs)
    clip, tok, proc, vision = build(args.models, text_len=48)
    x = pixels([p for p, _ in pairs], proc)
    # SigLIP's text tower pools the LAST position: pad on the left so that it is the caption's last token
    tok.padding_side = "left"
    ids = tok([c for _, c in pairs], padding="max_length", max_length=48, truncation=True,
              return_tensors="pt").input_ids
    (xh, idh), (xt, idt) = (x[:args.heldout], ids[:args.heldout]), (x[args.heldout:], ids[args.heldout:])
    opt = torch.optim.AdamW(clip.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(xt) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)
    log = dict(before=dict(retrieval_top1=retrieval(clip, xh, idh, proc)), epochs=[])
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        order, total = torch.randperm(len(xt), generator=g), 0.0
        nb = len(xt) // args.batch_size
        for b in range(nb):
            i = order[b * args.batch_size:(b + 1) * args.batch_size]
            loss = clip(input_ids=idt[i], pixel_values=normalise(xt[i], proc), return_loss=True).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        log["epochs"].append(dict(epoch=epoch + 1, loss=round(total / nb, 4),
                                  retrieval_top1=round(retrieval(clip, xh, idh, proc), 1)))
        print(f"epoch {epoch + 1}: sigmoid loss {total / nb:.4f}, held-out image->caption top-1 "
              f"{log['epochs'][-1]['retrieval_top1']:.1f}%", flush=True)
    vision.load_state_dict(clip.vision_model.state_dict())
    os.makedirs(args.out, exist_ok=True)
    vision.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    log.update(args=vars(args), n_train=len(xt), n_heldout=len(xh), seconds=round(time.time() - t0, 1))
    with open(os.path.join(args.out, "pretrain.json"), "w") as f:
        json.dump(log, f, indent=2, allow_nan=False)
    print(f"trained encoder written to {args.out} in {time.time() - t0:.0f}s "
          f"(held-out retrieval {log['before']['retrieval_top1']:.1f}% -> "
          f"{log['epochs'][-1]['retrieval_top1']:.1f}%)")


if __name__ == "__main__":
    main()
