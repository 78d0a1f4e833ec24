"""
How high can the pointing game go on a grid phantom (the walk, the order question), whatever the latents hold?
The game (evaluate.py --pointing) scores the heatmap cos(VP(h_k), patch) of the encoder's full-image patch features;
step k's target is the lesion step k reads (samples.jsonl step_masks) and VP(h_k) regresses that lesion's ROI
feature (roi.safetensors roi_steps, extract_roi.py). This plays the same game with three queries per test step:

    ceiling  the ROI feature itself: what a projector that reproduced every target exactly would score
    oracle   the mean ROI feature of the train items' steps that read a lesion of the same cell and the same look
             (brightness, and size on the order grid): what a projector that knows exactly which lesion step k
             reads, but nothing else about the image, would score
    chance   the share of the image's patches that count as a hit

and the ceiling again by how many of the nine lesions share the target's look (a feature of the look alone cannot
tell them apart; a feature that also carries the position can). A VP that reads the step's lesion from h_k is
bounded near the oracle unless h_k also carries what the image does to that lesion's patches.

    python demo/pointing_bound.py --data runs/order4/data          # -> DATA/pointing_bound.json
"""
import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import evaluate as E  # noqa: E402
from pipeline import io as IO  # noqa: E402
from pipeline import roi_encoder as RE  # noqa: E402


def lesion_key(data, row, mask):
    """-> (cell 'r,c' of the mask's centroid on the 3 x 3 grid, the lesion's look there: brightness [+ size])."""
    m = np.asarray(Image.open(os.path.join(data, mask)).convert("L")) > 0
    ys, xs = np.nonzero(m)
    r, c = min(int(3 * ys.mean() / m.shape[0]), 2), min(int(3 * xs.mean() / m.shape[1]), 2)
    d = row["meta"]["drawn"]
    return f"{r},{c}", d["grid"][r][c] + (" " + d["sizes"][r][c] if "sizes" in d else "")


def steps(data, rows, index):
    """-> [(item, k, roi_steps row index, step k's mask, lesion_key)] of the items with step_masks."""
    out = []
    for it in rows:
        for k, mask in enumerate(it.get("step_masks") or []):
            out.append((it, k, index[it["id"]], mask, lesion_key(data, it, mask)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="the pointing game's bounds on a grid phantom's per-step targets")
    ap.add_argument("--data", required=True, help="prepare_data.py output with step_masks and extract_roi.py's roi")
    ap.add_argument("--n", type=int, default=0, help="test items played (the first n; 0: all)")
    ap.add_argument("--out", help="JSON output (default DATA/pointing_bound.json)")
    args = ap.parse_args(argv)
    path = os.path.join(args.data, "roi.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if "roi_steps" not in f.keys():
            sys.exit(f"{path}: no roi_steps (extract_roi.py writes them for data with step_masks)")
        targets = F.normalize(f.get_tensor("roi_steps").float(), dim=-1)                     # (N, S, d_v)
    index = {i: j for j, i in enumerate(json.loads(meta["ids"]))}
    enc = RE.build_encoder(meta["encoder_kind"], meta["encoder_path"], "cpu", int(meta["image_size"]))
    rows = [json.loads(l) for l in open(os.path.join(args.data, "samples.jsonl")) if l.strip()]
    train = steps(args.data, [r for r in rows if r["split"] == "train"], index)
    test = steps(args.data, [r for r in rows if r["split"] == "test"][:args.n or None], index)
    if not test:
        sys.exit(f"{args.data}: no test item with step_masks (a grid phantom: prepare_data.py --walk-hops or "
                 "--order-hops)")
    by_key = defaultdict(list)
    for _, k, j, _, key in train:
        by_key[key].append(targets[j, k])
    oracle = {key: F.normalize(torch.stack(v).mean(0), dim=0) for key, v in by_key.items()}
    hits, chance, by_same, by_step, feats = defaultdict(list), [], defaultdict(list), defaultdict(list), {}
    with torch.no_grad():
        for it, k, j, mask, key in test:
            if it["id"] not in feats:
                feats = {it["id"]: RE.patch_features(enc, IO.load_image(os.path.join(args.data, it["image"])))[0]}
            target, valid = E.target_patches(os.path.join(args.data, mask), enc.grid)
            queries = torch.stack([targets[j, k], oracle.get(key, torch.zeros_like(targets[j, k]))])
            heat = RE.heatmaps(feats[it["id"]].cpu(), queries, enc.grid).flatten(1)             # (2, g*g)
            hit = target[heat.masked_fill(~valid, -2).argmax(1)].tolist()
            hits["ceiling"].append(hit[0])
            hits["oracle"].append(hit[1] if key in oracle else False)
            chance.append(target[valid].float().mean().item())
            d = it["meta"]["drawn"]
            looks = [d["grid"][c // 3][c % 3] + (" " + d["sizes"][c // 3][c % 3] if "sizes" in d else "")
                     for c in range(9)]
            by_same[looks.count(key[1])].append(hit[0])
            by_step[k + 1].append(hit[:1] + [hit[1] if key in oracle else False])
    pct = lambda v: 100 * sum(v) / len(v)
    res = dict(data=os.path.abspath(args.data), encoder=meta["encoder_path"], grid=enc.grid, n_items=len(
        {it["id"] for it, *_ in test}), n_steps=len(test), ceiling=pct(hits["ceiling"]), oracle=pct(hits["oracle"]),
        chance=100 * statistics.mean(chance), oracle_keys=len(oracle),
        by_step={k: dict(ceiling=pct([h[0] for h in v]), oracle=pct([h[1] for h in v]), n=len(v))
                 for k, v in sorted(by_step.items())},
        ceiling_by_same_look={n: dict(hit_rate=pct(v), n=len(v)) for n, v in sorted(by_same.items())},
        definition="hit: the heatmap's maximum patch is one step k's lesion mask touches, dilated by one patch "
                   "(evaluate.py --pointing); ceiling: the query is the step's ROI feature (roi_steps); oracle: the "
                   "mean ROI feature of the train steps whose lesion has the same cell and look")
    print(f"pointing game on {res['n_steps']} steps of {res['n_items']} test items ({args.data}):")
    print(f"  ceiling (the ROI target itself) {res['ceiling']:.1f}%, oracle (the step's cell and look known) "
          f"{res['oracle']:.1f}%, chance {res['chance']:.1f}%")
    print("  by step (ceiling / oracle): " + ", ".join(
        f"{k}: {v['ceiling']:.1f} / {v['oracle']:.1f}" for k, v in res["by_step"].items()))
    print("  ceiling by lesions sharing the target's look: " + ", ".join(
        f"{n}: {v['hit_rate']:.1f}% of {v['n']}" for n, v in res["ceiling_by_same_look"].items()))
    out = args.out or os.path.join(args.data, "pointing_bound.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=2, allow_nan=False)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
