"""
Stage 2 of VITAL: adaptive ROI features from a frozen medical vision encoder (paper §3.4, §A.5, §C.3,
§C.5). They are the targets of the visual loss L_vis (§3.3).

For every unique (image, mask) pair of samples.jsonl:

    mask area / image area >= tau  -> FULL pathway: encode the whole image; the mask is downsampled to
                                      the patch grid by area interpolation and binarised at 0.3; the
                                      ROI feature is the mean of those patches                (§A.5.2)
    mask area / image area <  tau  -> CROP pathway: crop the mask's bounding box grown by delta on each
                                      side (delta x box size, clipped to the image), pad to a square
                                      with zeros, re-encode; mean over the valid (non-padding) patches
    every sample                   -> global feature: mean of the full image's patches       (§C.5)

Features are L2-normalised; the top-5 patches by cosine similarity with the ROI feature are kept with
their indices in the grid of the image that was encoded (`pathway` says which: 0 full image, 1 crop;
`box` gives that region in source pixels as x0, y0, x1, y1).

Patch features (the encoders are in pipeline/roi_encoder.py) = the output of the LAST encoder block, before
post_layernorm (`hidden_states[-1]` in transformers 5.24's SiglipVisionModel; a test pins this).
Preprocessing as MedSigLIP was trained: grey -> 3 channels, pad to square with zeros (centred), bicubic
resize to the encoder's image_size, normalise with the processor's mean/std. Grid size and width come
from the encoder config.

`--encoder-kind self` (§C.3 ablation): the backbone's own vision tower (Qwen3-VL `model.visual`). The
square view is resized to `--self-size` px (a multiple of 32) and we pool the MERGED vision tokens
(`pooler_output`: one token per 2x2 block of 16-px patches, out_hidden_size wide), i.e. exactly the
image tokens the LLM receives, on a (size/32) x (size/32) grid.

Reads:  samples.jsonl (the schema in prepare_data.py's docstring; image/mask paths relative to the
        JSONL), its images and masks.
Writes: roi.safetensors: roi (N,d_v) f32, global (N,d_v), top5_index (N,5) i64, top5_score (N,5),
        pathway (N,) i64, box (N,4) i64, mask_ratio (N,); metadata ids (JSON list, row order) + settings;
        when samples have `step_masks` (the walk) also roi_steps (N,S,d_v) and n_steps (N,) i64: step k's
        own target (train.py --visual-target hop), padded with `roi` after a sample's last step.
        roi_report.json: failed samples (id, line, reason; they get no row) and fallbacks used.
        A bad sample line or file is a failure in the report, never a crash; a user mistake (no such
        --samples or --encoder folder, every sample failing, an out-of-range number) is one error line
        and exit status 1. JSON is written strict (pipeline.io.strict_json: no NaN anywhere).
        roi_shards/ while running: finished rows, so that a rerun continues (deleted at the end).
        With --grid-search: roi_gridsearch.{json,md,png} (coverage, intensity, SNR of §A.5.3).

Commands:
    python extract_roi.py --samples data/phantom/samples.jsonl --encoder runs/tiny/encoder \
        --out data/phantom/roi.safetensors
    python extract_roi.py --samples data/phantom/samples.jsonl --encoder runs/tiny/encoder \
        --out data/phantom/roi.safetensors --grid-search --subset 1000
    python extract_roi.py --samples data/phantom/samples.jsonl --encoder runs/tiny/backbone \
        --encoder-kind self --out data/phantom/roi_self.safetensors
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline import io as IO
from pipeline.io import strict_json, write_strict_json
from pipeline.roi_encoder import build_encoder, grid_fraction, pad_image, square_pad

MASK_THRESHOLD = 0.3  # §A.5.2: a patch belongs to the ROI if >= 30% of it is mask (area interpolation)
VALID_THRESHOLD = 0.5  # chosen: a crop patch is "valid" if at least half of it is real image, not padding
FULL, CROP = 0, 1  # values of the `pathway` tensor


class ROIError(ValueError):
    """A user mistake (a missing file or folder, every sample failing, shards of other settings): one
    line on stderr, exit status 1, no traceback."""


# ----------------------------------------------------------------------------------------------------
# 1. Reading samples, images and masks. A bad line or file becomes a failure with its id, never a crash.
# ----------------------------------------------------------------------------------------------------
@dataclass
class Unit:
    """One unique (image, mask) pair: every sample that asks about it shares one feature."""
    key: str  # "image|mask", paths as written in the JSONL (relative to it): portable across machines
    image: str  # absolute paths
    mask: str
    ids: list = field(default_factory=list)


def read_units(path):
    """-> (samples in file order as (line, id, Unit key, step Unit keys), units by key, failures [{id, line,
    reason}]). A walk's `step_masks` (one mask per chain step) are units of their own on the same image."""
    root = os.path.dirname(os.path.abspath(path))
    rows, units, failed, seen = [], {}, [], set()
    try:
        with open(path) as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise ROIError(f"--samples {path} is not a text JSONL file ({e})") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            s = json.loads(line)
        except json.JSONDecodeError as e:
            failed.append(dict(id=None, line=line_no, reason=f"{path}:{line_no}: invalid JSON ({e})"))
            continue
        if not isinstance(s, dict):
            failed.append(dict(id=None, line=line_no, reason=f"{path}:{line_no}: not a JSON object"))
            continue
        sid = s.get("id")
        missing = [k for k in ("id", "image", "mask") if not s.get(k) or not isinstance(s[k], str)]
        if missing or sid in seen:
            why = f"missing or non-text field(s) {missing}" if missing else f"duplicate id {sid!r}"
            failed.append(dict(id=sid, line=line_no, reason=f"{path}:{line_no}: {why}"))
            continue
        steps = s.get("step_masks", [])
        if not isinstance(steps, list) or not all(isinstance(m, str) and m for m in steps):
            failed.append(dict(id=sid, line=line_no, reason=f"{path}:{line_no}: 'step_masks' must be a list of "
                                                           "mask paths (one per chain step)"))
            continue
        seen.add(sid)
        keys = [f"{s['image']}|{m}" for m in [s["mask"]] + steps]
        for key, m in zip(keys, [s["mask"]] + steps):
            if key not in units:
                units[key] = Unit(key, os.path.join(root, s["image"]), os.path.join(root, m))
            units[key].ids.append(sid)
        rows.append((line_no, sid, keys[0], keys[1:]))
    return rows, units, failed


def load_mask(path, size):
    """-> (H, W) bool array, binarised > 0 (any labelled pixel is ROI); must match the image's (W, H) size."""
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except Exception as e:  # missing, truncated, not an image
        raise ValueError(f"cannot read mask {path}: {e}") from e
    if a.ndim == 3:  # an RGB(A) mask: any colour channel counts, alpha does not
        a = a[..., :3].max(-1)
    if (a.shape[1], a.shape[0]) != tuple(size):
        raise ValueError(f"mask {path} is {a.shape[1]}x{a.shape[0]}, image is {size[0]}x{size[1]}")
    m = a > 0
    if not m.any():
        raise ValueError(f"empty mask {path}: no ROI to pool")
    return m


# ----------------------------------------------------------------------------------------------------
# 2. Geometry: mask -> patch grid (the square frame of pipeline/roi_encoder.py), crop box, validity. Pure
#    functions, tested by hand.
# ----------------------------------------------------------------------------------------------------
def binarise(frac, threshold):
    """fraction grid -> (bool grid, fell_back). A thin or tiny region may cover no patch to `threshold`:
    then we keep the patch(es) it covers most rather than pooling nothing (or everything)."""
    keep = frac >= threshold
    if keep.any():
        return keep, False
    return (frac == frac.max()) & (frac > 0), True


def crop_box(mask, delta, min_crop):
    """Bounding box of the mask grown by delta x (box size) on each side, clipped to the image; then, if a
    side is shorter than min_crop px, widened around its centre (shifted to stay inside the image): a
    1-px lesion blown up to 448 px would be a flat colour, not a feature. -> (x0, y0, x1, y1)."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask)
    box = []
    for lo, hi, size in ((int(xs.min()), int(xs.max()) + 1, W), (int(ys.min()), int(ys.max()) + 1, H)):
        m = delta * (hi - lo)  # "5% margin" (§3.4) read as a fraction of the box, so crops stay tight
        lo, hi = max(0, math.floor(lo - m)), min(size, math.ceil(hi + m))
        need = min(min_crop, size)
        if hi - lo < need:
            lo = min(max(0, round((lo + hi - need) / 2)), size - need)
            hi = lo + need
        box.append((lo, hi))
    (x0, x1), (y0, y1) = box
    return x0, y0, x1, y1


@dataclass
class Plan:
    pathway: int  # FULL or CROP
    box: tuple  # encoded region of the source image (x0, y0, x1, y1)
    ratio: float  # mask area / image area


def plan_roi(mask, tau, delta, min_crop):
    """The adaptive rule of §A.5.2."""
    H, W = mask.shape
    ratio = float(mask.mean())
    if ratio >= tau:
        return Plan(FULL, (0, 0, W, H), ratio)
    return Plan(CROP, crop_box(mask, delta, min_crop), ratio)


def view_grids(mask, box, g):
    """For the region `box` of the image, padded to a square: (mask fraction, content fraction) per patch."""
    x0, y0, x1, y1 = box
    m = mask[y0:y1, x0:x1]
    return grid_fraction(square_pad(m), g), grid_fraction(square_pad(np.ones_like(m)), g)


# ----------------------------------------------------------------------------------------------------
# 3. Pooling (§A.5.2 post-processing).
# ----------------------------------------------------------------------------------------------------
def pool(feats, keep):
    """Mean of the kept patches, L2-normalised. feats (g*g, d), keep (g*g,) bool -> (d,)."""
    return F.normalize(feats[keep].mean(0), dim=0)


def top5(feats, roi, valid):
    """Top-5 patches by cosine with the ROI feature; padding patches rank after every real one (they are
    not image content) but keep their true score if a tiny grid has fewer than 5 valid patches."""
    cos = F.normalize(feats, dim=-1) @ roi  # (g*g,)
    order = torch.argsort(cos - 10.0 * (~valid).float(), descending=True, stable=True)[:5]
    return order, cos[order]


@dataclass
class View:
    """One square image to encode, shared by every unit that needs it (masks on the same image)."""
    pixels: torch.Tensor
    valid: torch.Tensor  # (g*g,) bool: non-padding patches
    tasks: list = field(default_factory=list)  # (what, unit key, keep-grid or None)


def extract_chunk(units, enc, args, global_cache):
    """Encode one chunk of units -> (rows {key: dict of tensors}, failures {key: reason}, notes {key: str}).
    global_cache (image path -> global feature) spares re-encoding an image whose global we already have."""
    g = enc.grid
    views, plans, failures, notes = {}, {}, {}, {}
    for u in units:
        try:
            img = IO.load_image(u.image)
        except Exception as e:  # missing, truncated, not an image, decompression bomb, ...
            failures[u.key] = f"cannot read image {u.image}: {e}"
            continue
        try:
            mask = load_mask(u.mask, img.size)
        except ValueError as e:  # unreadable, empty, or not the image's size: named in the message
            failures[u.key] = str(e)
            continue
        plan = plans[u.key] = plan_roi(mask, args.tau, args.delta, args.min_crop)
        full = (0, 0, img.size[0], img.size[1])
        need_full = plan.pathway == FULL or u.image not in global_cache
        if need_full and ("full", u.image) not in views:
            _, content = view_grids(mask, full, g)
            valid = binarise(content, VALID_THRESHOLD)[0]
            views["full", u.image] = View(enc.preprocess(pad_image(img, full)), valid)
        if u.image not in global_cache:
            views["full", u.image].tasks.append(("global", u.key, None))
        mfrac, content = view_grids(mask, plan.box, g)
        if plan.pathway == FULL:
            keep, fell = binarise(mfrac, MASK_THRESHOLD)
            if fell:
                notes[u.key] = f"no patch >= {MASK_THRESHOLD} mask: pooled the most-covered patch(es)"
            views["full", u.image].tasks.append(("roi", u.key, keep))
        else:
            keep, fell = binarise(content, VALID_THRESHOLD)
            if fell:
                notes[u.key] = f"no crop patch >= {VALID_THRESHOLD} real image: pooled the fullest patch(es)"
            views["crop", u.key] = View(enc.preprocess(pad_image(img, plan.box)), keep,
                                        [("roi", u.key, keep)])
    rows, vlist = {}, list(views.items())
    for i in range(0, len(vlist), args.batch_size):  # batched: one encoder call per batch_size views
        batch = vlist[i:i + args.batch_size]
        feats = enc.encode(torch.stack([v.pixels for _, v in batch]))
        for (vkey, v), f in zip(batch, feats):
            for what, key, keep in v.tasks:
                if what == "global":  # mean of all real (non-padding) patches of the full image, §C.5
                    global_cache[vkey[1]] = pool(f, v.valid)
                else:
                    roi = pool(f, keep)
                    idx, score = top5(f, roi, v.valid)
                    rows[key] = dict(roi=roi, top5_index=idx, top5_score=score)
    for u in units:
        if u.key in rows:
            p = plans[u.key]
            rows[u.key].update(**{"global": global_cache[u.image], "pathway": torch.tensor(p.pathway),
                                  "box": torch.tensor(p.box), "mask_ratio": torch.tensor(p.ratio)})
    return rows, failures, notes


# ----------------------------------------------------------------------------------------------------
# 4. The run: chunks -> shards (resumable) -> one atomic roi.safetensors + report.
# ----------------------------------------------------------------------------------------------------
ROW_TENSORS = {"roi": torch.float32, "global": torch.float32, "top5_index": torch.int64,
               "top5_score": torch.float32, "pathway": torch.int64, "box": torch.int64,
               "mask_ratio": torch.float32}


def settings_of(enc, args):
    """Everything a feature depends on; a shard made under other settings must not be reused."""
    return dict(encoder=enc.name, encoder_path=os.path.abspath(enc.path), encoder_kind=enc.kind,
                d_v=enc.dim, grid=enc.grid, image_size=enc.image_size, tau=args.tau, delta=args.delta,
                min_crop=args.min_crop, mask_threshold=MASK_THRESHOLD, valid_threshold=VALID_THRESHOLD)


def stack_rows(rows, keys):
    """Rows {key: {name: tensor}} -> {name: (len(keys), ...) tensor}, in the order of `keys`."""
    return {k: torch.stack([rows[key][k] for key in keys]).to(dt).contiguous()
            for k, dt in ROW_TENSORS.items()}


def step_rows(rows, keys, step_keys):
    """The walk's per-step targets: roi_steps (N, S, d_v), row i's step k = the ROI feature of its k-th step
    mask, padded after its last step with its own `roi` (a sample without step masks: `roi` at every step),
    and n_steps (N,) = how many step masks row i has. {} when no sample has step masks."""
    S = max(map(len, step_keys), default=0)
    if not S:
        return {}
    per = [[rows[k]["roi"] for k in steps] + [rows[key]["roi"]] * (S - len(steps))
           for key, steps in zip(keys, step_keys)]
    return {"roi_steps": torch.stack([torch.stack(p) for p in per]).float().contiguous(),
            "n_steps": torch.tensor([len(st) for st in step_keys], dtype=torch.int64)}


def atomic_save(tensors, path, metadata):
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)  # a reader never sees a half-written file


def load_shards(shard_dir, settings):
    """Rows, notes and global features of the shards a previous run finished."""
    rows, notes, globals_of = {}, {}, {}
    for name in sorted(os.listdir(shard_dir)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(shard_dir, name)
        with safe_open(path, "pt") as f:
            t, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        if json.loads(meta["settings"]) != settings:
            raise ROIError(f"{path} was written with other settings ({meta['settings']}); delete "
                           f"{shard_dir} to start over")
        for i, (key, image) in enumerate(zip(json.loads(meta["keys"]), json.loads(meta["images"]))):
            rows[key] = {k: t[k][i] for k in ROW_TENSORS}
            globals_of[image] = t["global"][i]
        notes.update(json.loads(meta["notes"]))
    return rows, notes, globals_of


def extract(samples_path, out, enc, args):
    """Whole stage: returns the report dict. Reruns continue from the shards next to `out`."""
    rows_in_order, units, failed = read_units(samples_path)
    n_samples = len(rows_in_order) + len(failed)  # every non-empty line, readable or not
    stem = os.path.splitext(out)[0]
    shard_dir, settings = stem + "_shards", settings_of(enc, args)
    os.makedirs(shard_dir, exist_ok=True)
    rows, notes, global_cache = load_shards(shard_dir, settings)
    # masks of one image next to each other, so that they share one full-image encoding
    todo = sorted((u for k, u in units.items() if k not in rows), key=lambda u: (u.image, u.mask))
    n_shard = len([n for n in os.listdir(shard_dir) if n.endswith(".safetensors")])
    failures = {}
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="roi", unit="pair", disable=args.quiet)
    for i in range(0, len(todo), args.shard_size):
        chunk = todo[i:i + args.shard_size]
        new, bad, new_notes = extract_chunk(chunk, enc, args, global_cache)
        failures.update(bad)
        keys = [u.key for u in chunk if u.key in new]
        if keys:
            images = [units[k].image for k in keys]
            atomic_save(stack_rows(new, keys), os.path.join(shard_dir, f"shard_{n_shard:05d}.safetensors"),
                        dict(keys=strict_json(keys), images=strict_json(images), settings=strict_json(settings),
                             notes=strict_json({k: v for k, v in new_notes.items() if k in new})))
            n_shard += 1
        rows.update(new)
        notes.update(new_notes)
        bar.update(len(chunk))
    bar.close()

    ids, keys, step_keys = [], [], []
    for line_no, sid, key, steps in rows_in_order:
        lost = [k for k in [key] + steps if k not in rows]
        if not lost:
            ids.append(sid)
            keys.append(key)
            step_keys.append(steps)
        else:
            failed.append(dict(id=sid, line=line_no, reason=failures.get(lost[0], "not extracted")))
    if not keys:  # the report still says why, sample by sample
        write_strict_json(dict(samples=samples_path, out=None, n_samples=n_samples, n_rows=0, failed=failed,
                               settings=settings), stem + "_report.json")
        first = failed[0]["reason"] if failed else f"{samples_path} holds no sample"
        raise ROIError(f"no sample of {samples_path} could be extracted ({len(failed)} failed; first: {first}); "
                       f"every reason is in {stem}_report.json")
    meta = {k: str(v) for k, v in settings.items()}
    meta.update(ids=strict_json(ids), samples=os.path.abspath(samples_path), n_failed=str(len(failed)),
                pathway="0 = full image, 1 = crop; top5_index is into the grid of the encoded view")
    atomic_save(dict(stack_rows(rows, keys), **step_rows(rows, keys, step_keys)), out, meta)
    report = dict(samples=samples_path, out=out, n_samples=n_samples,
                  n_rows=len(ids), n_unique_pairs=len({k for k in keys}), failed=failed,
                  fallbacks=[dict(id=sid, note=notes[k]) for sid, k in zip(ids, keys) if k in notes],
                  n_crop=int(sum(int(rows[k]["pathway"]) for k in keys)), settings=settings)
    write_strict_json(report, stem + "_report.json")
    if not args.keep_shards:
        shutil.rmtree(shard_dir)
    return report


# ----------------------------------------------------------------------------------------------------
# 5. Grid search over tau x delta (§A.5.3): coverage, intensity, SNR on a random subset.
#    Per sample, in the grid of the view its pathway encodes: ROI patches = mask >= 0.3 (with the same
#    fallback as pooling); coverage = ROI patches / g^2; intensity = mean L2 norm of ROI patch features;
#    SNR = mean ROI norm / mean norm of the background (real, non-ROI) patches (undefined: skipped; a
#    setting where it is undefined for every sample has snr None, never NaN: the report is strict JSON).
# ----------------------------------------------------------------------------------------------------
def view_metrics(f, mfrac, content):
    roi = binarise(mfrac, MASK_THRESHOLD)[0]
    bg = binarise(content, VALID_THRESHOLD)[0] & ~roi
    norm = f.norm(dim=-1)
    snr = float(norm[roi].mean() / norm[bg].mean()) if bg.any() else None
    return float(roi.float().mean()), float(norm[roi].mean()), snr


def grid_search(units, enc, args):
    """-> list of {tau, delta, coverage, intensity, snr, n, n_crop, n_snr}. The full image is encoded
    once per sample and each distinct crop once per delta; tau only picks which view a sample uses."""
    g, per = enc.grid, []  # per: (ratio, full metrics, {delta: crop metrics})
    for i in tqdm(range(0, len(units), args.shard_size), desc="grid search", disable=args.quiet):
        todo, pending = [], []
        for u in units[i:i + args.shard_size]:
            try:
                img = IO.load_image(u.image)
                mask = load_mask(u.mask, img.size)
            except Exception:
                continue  # the extraction run reports these; the search just leaves them out
            full = (0, 0, img.size[0], img.size[1])
            boxes = {"full": full, **{d: crop_box(mask, d, args.min_crop) for d in args.deltas}}
            todo.append((float(mask.mean()), {}))
            for name, box in boxes.items():
                pixels = enc.preprocess(pad_image(img, box))
                pending.append((len(todo) - 1, name, pixels, view_grids(mask, box, g)))
        for j in range(0, len(pending), args.batch_size):
            batch = pending[j:j + args.batch_size]
            for (t, name, _, grids), f in zip(batch, enc.encode(torch.stack([b[2] for b in batch]))):
                todo[t][1][name] = view_metrics(f, *grids)
        per += todo
    if not per:
        raise ROIError("grid search: none of the sampled (image, mask) pairs could be read (extract_roi.py "
                       "without --grid-search reports why, pair by pair)")
    table = []
    for tau in args.taus:
        for d in args.deltas:
            ms = [m["full"] if r >= tau else m[d] for r, m in per]
            snrs = [m[2] for m in ms if m[2] is not None]
            table.append(dict(tau=tau, delta=d, coverage=100 * float(np.mean([m[0] for m in ms])),
                              intensity=float(np.mean([m[1] for m in ms])),
                              snr=float(np.mean(snrs)) if snrs else None, n=len(ms),
                              n_crop=sum(r < tau for r, _ in per), n_snr=len(snrs)))
    return table


def choose(table, min_coverage):
    """Our reproducible stand-in for the paper's judgement (§A.5.3, 'best trade-off'): the highest SNR
    among settings whose mean coverage is at least min_coverage %, ties broken by intensity."""
    ok = [r for r in table if r["coverage"] >= min_coverage and r["snr"] is not None]
    if not ok:
        return max(table, key=lambda r: r["coverage"])
    return max(ok, key=lambda r: (r["snr"], r["intensity"]))


def colour(t):
    """Value in [0, 1] -> RGB on a viridis-like ramp (matplotlib is not a dependency)."""
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    return tuple(round(a + (b - a) * (t - i)) for a, b in zip(stops[i], stops[i + 1]))


def draw_heatmaps(table, taus, deltas, path, chosen):
    """Three heatmaps (rows tau, columns delta), value in each cell, chosen cell outlined in red."""
    cell, left, top, gap = 64, 70, 50, 30
    font = ImageFont.load_default(size=12)
    pw = left + cell * len(deltas)
    im = Image.new("RGB", (3 * pw + 2 * gap + 10, top + cell * len(taus) + 40), "white")
    dr = ImageDraw.Draw(im)
    lookup = {(r["tau"], r["delta"]): r for r in table}
    for p, (name, fmt) in enumerate((("coverage", "{:.1f}%"), ("intensity", "{:.3g}"), ("snr", "{:.3f}"))):
        vals = [r[name] for r in table if r[name] is not None] or [0.0]
        lo, hi = min(vals), max(vals)
        x0 = p * (pw + gap)
        dr.text((x0 + left, 8), f"{name}  (rows tau, cols delta)", fill="black", font=font)
        for j, d in enumerate(deltas):
            dr.text((x0 + left + j * cell + 18, top - 16), f"{d:g}", fill="black", font=font)
        for i, tau in enumerate(taus):
            dr.text((x0 + 20, top + i * cell + cell // 2 - 6), f"{tau:g}", fill="black", font=font)
            for j, d in enumerate(deltas):
                v = lookup[tau, d][name]
                t = 0.5 if v is None or hi == lo else (v - lo) / (hi - lo)
                box = (x0 + left + j * cell, top + i * cell,
                       x0 + left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
                dr.rectangle(box, fill=colour(t), outline="red" if (tau, d) == chosen else None,
                             width=3 if (tau, d) == chosen else 1)
                dr.text((box[0] + 6, box[1] + cell // 2 - 6), "n/a" if v is None else fmt.format(v), font=font,
                        fill="black" if t > 0.6 else "white")
    im.save(path)


def run_grid_search(samples_path, out, enc, args):
    _, units, _ = read_units(samples_path)
    units = sorted(units.values(), key=lambda u: u.key)
    units = random.Random(args.seed).sample(units, min(args.subset, len(units)))
    table = grid_search(units, enc, args)
    best = choose(table, args.min_coverage)
    stem = os.path.splitext(out)[0] + "_gridsearch"
    write_strict_json(dict(table=table, chosen=best, subset=len(units), seed=args.seed,
                           min_coverage=args.min_coverage, encoder=enc.name, grid=enc.grid), stem + ".json")
    md = ["| tau | delta | coverage % | intensity | SNR | crop samples |", "|---|---|---|---|---|---|"]
    md += [f"| {r['tau']:g} | {r['delta']:g} | {r['coverage']:.1f} | {r['intensity']:.4g} | "
           f"{'n/a' if r['snr'] is None else format(r['snr'], '.4f')} | "
           f"{r['n_crop']}/{r['n']} |" for r in table]
    md.append(f"\nChosen (highest SNR with coverage >= {args.min_coverage}%): tau = {best['tau']:g}, "
              f"delta = {best['delta']:g}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    draw_heatmaps(table, args.taus, args.deltas, stem + ".png", (best["tau"], best["delta"]))
    print("\n".join(md))
    print(f"wrote {stem}.json/.md/.png; use --tau {best['tau']:g} --delta {best['delta']:g}")
    return best


# ----------------------------------------------------------------------------------------------------
# 6. Command line.
# ----------------------------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # input / output
    p.add_argument("--samples", required=True, help="samples.jsonl of prepare_data.py (paths relative to it)")
    p.add_argument("--encoder", required=True, help="model folder: a SigLIP vision tower, or the Qwen3-VL "
                                                    "backbone with --encoder-kind self")
    p.add_argument("--out", required=True, help="output roi.safetensors; report, shards and grid search "
                                                "files are written next to it")
    p.add_argument("--encoder-kind", choices=["siglip", "self"], default="siglip",
                   help="siglip: external encoder (default, MedSigLIP); self: the backbone's own (§C.3)")
    p.add_argument("--self-size", type=int, default=448, help="square input size for --encoder-kind self "
                                                              "(multiple of 32; grid = size/32)")
    # the adaptive strategy (§A.5.2)
    p.add_argument("--tau", type=float, default=0.1, help="full image when mask area / image area >= tau")
    p.add_argument("--delta", type=float, default=0.05, help="crop margin per side, fraction of the box size")
    p.add_argument("--min-crop", type=int, default=32, help="smallest crop side in source px (tiny masks)")
    # grid search (§A.5.3)
    p.add_argument("--grid-search", action="store_true", help="run the tau x delta grid search instead")
    p.add_argument("--subset", type=int, default=1000, help="grid search: random (image, mask) pairs used")
    p.add_argument("--seed", type=int, default=0, help="grid search: seed of the subset")
    p.add_argument("--taus", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.3],
                   help="grid search: tau values")
    p.add_argument("--deltas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2],
                   help="grid search: delta values")
    p.add_argument("--min-coverage", type=float, default=10.0,
                   help="grid search: least mean coverage %% to be chosen")
    # running
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
    p.add_argument("--shard-size", type=int, default=64, help="(image, mask) pairs per resumable shard")
    p.add_argument("--keep-shards", action="store_true", help="keep the shard folder after the final write")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args):
    """The inputs a run needs, checked before the encoder is loaded: each problem is one ROIError."""
    if not os.path.isfile(args.samples):
        raise ROIError(f"--samples {args.samples}: no such file (prepare_data.py writes samples.jsonl)")
    if not os.path.isfile(os.path.join(args.encoder, "config.json")):
        what = "does not exist" if not os.path.exists(args.encoder) else "holds no config.json"
        raise ROIError(f"--encoder {args.encoder} {what}: pass a model folder (a SigLIP vision tower such as "
                       "MedSigLIP-448, or the backbone with --encoder-kind self)")
    if os.path.isdir(args.out):
        raise ROIError(f"--out {args.out} is a folder: give a file name such as {args.out}/roi.safetensors")
    ranges = [("--tau", 0 <= args.tau <= 1), ("--delta", 0 <= args.delta <= 10), ("--min-crop", args.min_crop >= 1),
              ("--batch-size", args.batch_size >= 1), ("--shard-size", args.shard_size >= 1),
              ("--subset", args.subset >= 1), ("--self-size", args.self_size >= 32),
              ("--taus", all(0 <= t <= 1 for t in args.taus)), ("--deltas", all(0 <= d <= 10 for d in args.deltas)),
              ("--min-coverage", 0 <= args.min_coverage <= 100)]
    bad = [flag for flag, ok in ranges if not ok]  # NaN fails every comparison, so it lands here too
    if bad:
        raise ROIError(f"{', '.join(bad)} out of range (tau in [0, 1], delta in [0, 10], sizes >= 1, "
                       "--min-coverage a percentage)")


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    try:
        enc = build_encoder(args.encoder_kind, args.encoder, args.device, args.self_size)
    except (OSError, ValueError) as e:  # a folder of another model type, missing weights, bad --self-size
        raise ROIError(f"--encoder {args.encoder}: {e}") from None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    except OSError as e:
        raise ROIError(f"--out {args.out}: cannot create its folder ({e})") from None
    if args.grid_search:
        return run_grid_search(args.samples, args.out, enc, args)
    rep = extract(args.samples, args.out, enc, args)
    print(f"{args.out}: {rep['n_rows']} rows ({rep['n_unique_pairs']} unique image/mask pairs, "
          f"{rep['n_crop']} crop rows), d_v {enc.dim}, grid {enc.grid}x{enc.grid}; {len(rep['failed'])} "
          f"failed, {len(rep['fallbacks'])} fallbacks -> {os.path.splitext(args.out)[0]}_report.json")
    return rep


if __name__ == "__main__":
    try:
        main()
    except ROIError as e:
        sys.exit(f"extract_roi.py: error: {e}")
