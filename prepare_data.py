"""
Stage 1 of VITAL: turn segmentation data into verified training tuples
(image, question, answer, K-step reasoning chain) plus the mask the ROI stage needs.

Paper: §3.4 and Appendix A.1-A.4 (sources, question types and K, teacher-only overlay, the teacher
prompt, the six-round quality gate).

Reads one source per run (run again with another source into the same --out to append):
  phantom      procedural images with exact masks, needs no download (the embedded default;
               the generator is a fixture in embedded/phantom.py)
  msd          Medical Segmentation Decathlon task folders (dataset.json + NIfTI volumes)
  biomedparse  BiomedParse folders (train/, train_mask/, test/, test_mask/ with *.png)
Writes into --out:
  images/ masks/ overlays/   PNGs (the overlay is the teacher-only view: red layer + yellow contour)
  samples.jsonl              accepted samples, one JSON object a line (fields below)
  rejects.jsonl              samples that failed the gate 1 + --max-retries times, with every reason
  stats.json                 counts by source, subset, modality, question type, K, split; rejects; leaks

A samples.jsonl line is one training tuple without its ROI feature (extract_roi.py computes that,
keyed by `id`): `id` (unique, stable across reruns), `source` (phantom|msd|biomedparse), `subset`,
`modality`, `target`, `target_type` (organ|lesion|tumor|vessel|tissue|cell|retina), `image`, `mask`,
`overlay` (PNG paths relative to the file), `question`, `question_type` (yesno|identify|location_choice|
location|describe|reasoning; caption with --captions), `answer`, `reasoning_chain` (the K step
sentences), `latent_steps` (= K), `split` (train|val|test), the closed-ended form `choices` +
`answer_index` (§B.4; every item but captions, in every split), and `meta` (everything else: the measured
facts, negative, gate retries, where the image came from).

Teachers: `geometry` (default) writes chains from the mask and the pixels (offline, leak-free by
construction); `openai` asks any OpenAI-compatible chat-completions endpoint with the prompt of §A.2.
Every sample goes through the same quality gate whatever the teacher. Every decided sample is appended
and flushed as soon as it is done, so a killed run loses only the samples in flight (for MSD: the volume
in flight); rerunning the same command skips decided ids.

Bad input never stops a run and is never dropped silently: every input file ends either in an accepted
sample or in rejects.jsonl with a reason that names the file and says what is wrong (unreadable image,
mask without an image, image without a mask, name that follows no convention, size mismatch, empty mask,
degenerate target, ...). A target is degenerate, and rejected, when its mask has fewer than
MIN_TARGET_PIXELS = 25 pixels (too few for a shape, a boundary or a brightness; a one-pixel mask has no
second moments) or covers more than MAX_TARGET_SHARE = 90% of the image (nothing left to stand out from),
or when no ring of surroundings is left around it. MSD keeps only slices with >= 100 target pixels (§A.1).
The OpenAI teacher needs its key variable set before any work starts; a key the endpoint refuses (HTTP
401/403), a wrong URL (404) or an endpoint still unreachable after --http-retries retries stops the run
with one line naming the URL and a non-zero exit; what was accepted stays and the rerun continues. Every
JSON and JSONL file is strict JSON (no NaN or Infinity: strict_json refuses them).

  python prepare_data.py --source phantom --out data/phantom --n 2000 --seed 0
  python prepare_data.py --source phantom --out data/captions --n 3000 --seed 1 --captions  # tiny pretraining
  python prepare_data.py --source msd --msd-root /data/Task03_Liver /data/Task06_Lung --out data/vital
  python prepare_data.py --source biomedparse --bmp-root /data/BiomedParse/ISIC --out data/vital
  python prepare_data.py --source biomedparse --bmp-root /data/BiomedParse --out data/vital  # all subsets
  OPENAI_API_KEY=... python prepare_data.py --source phantom --out data/p --n 50 --teacher openai \
      --base-url https://api.openai.com/v1 --teacher-model gpt-5.4 --workers 8
"""
import argparse
import base64
import hashlib
import io
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from multiprocessing import Pool
from multiprocessing.pool import ThreadPool

import numpy as np
from PIL import Image
from tqdm import tqdm

from embedded.phantom import phantom_case
from pipeline_io import slug, strict_json, strict_loads, to_uint8, write_strict_json

# ----------------------------------------------------------------------------- question types and K (Table 4)
QUESTION_TYPES = ["yesno", "identify", "location_choice", "location", "describe", "reasoning"]
STEP_RANGE = {"yesno": (1, 1), "identify": (1, 1), "location_choice": (1, 1), "location": (2, 2),
              "describe": (2, 3), "reasoning": (3, 4),  # Table 4: the reasoning depth K of each type
              "caption": (1, 1)}  # --captions only: stand-in pretraining of the tiny backbone, no VITAL type


def stable_hash(text):
    """A hash that is the same in every process and every run (Python's hash() is salted)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


def article(target, target_type):
    if target_type in ("organ", "vessel", "retina", "tissue"):
        return "the"
    return "an" if target[0].lower() in "aeiou" else "a"


# ----------------------------------------------------------------------------- pixel helpers
def dilate(m, n=1):
    """Binary dilation with a 3x3 square, n times (numpy only: no scipy dependency)."""
    for _ in range(n):
        p = np.pad(m, 1)
        m = (p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
             | p[:-2, :-2] | p[:-2, 2:] | p[2:, :-2] | p[2:, 2:])
    return m


def erode(m, n=1):
    return ~dilate(~m, n)


def save_png(array, path):
    """Write atomically: a killed run never leaves a half-written PNG under the final name."""
    tmp = path + ".tmp.png"
    Image.fromarray(array).save(tmp, compress_level=1)  # fast zlib level: noisy images barely shrink more
    os.replace(tmp, path)


def overlay_view(image, mask):
    """Teacher-only view (§A.2): mask as red layer with alpha 0.4, boundary as a yellow contour."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    out = rgb.astype(np.float32)
    out[mask] = 0.6 * out[mask] + 0.4 * np.array([255, 0, 0], np.float32)
    out[mask & ~erode(mask)] = (255, 255, 0)
    return out.astype(np.uint8)


def read_png(path, as_mask=False):
    """Read any PNG flavour (8/16-bit, grey, RGB, RGBA, palette) as uint8 grey/RGB, or a bool mask."""
    with Image.open(path) as im:
        im.load()  # forces the decode here, so a truncated file raises here
        deep = im.mode in ("I;16", "I;16B", "I;16L", "I", "F")
        if not deep:
            im = im.convert("RGB") if im.mode in ("RGBA", "LA", "P", "CMYK", "RGB") else im.convert("L")
        a = np.asarray(im, dtype=np.float64) if deep else np.asarray(im)
    if as_mask:  # binarised > 0 on any channel (§A.1)
        return (a > 0).any(axis=2) if a.ndim == 3 else a > 0
    if deep:  # 16-bit: rescale its own range to 0..255
        lo, hi = a.min(), a.max()
        return to_uint8((a - lo) / (hi - lo) if hi > lo else a * 0)
    if a.ndim == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
        a = a[..., 0]  # grey stored as RGB
    return np.ascontiguousarray(a)


# ----------------------------------------------------------------------------- image-space facts
MIN_TARGET_PIXELS = 25  # fewer pixels have no measurable shape, boundary or brightness (chosen)
MAX_TARGET_SHARE = 0.9  # a target covering more of the image has nothing to stand out from (chosen)


def target_problem(mask, where):
    """Why this mask cannot be described (a reject reason naming `where`), or '' if it can."""
    n, share = int(mask.sum()), float(mask.mean())
    if n == 0:
        return f"empty_mask: {where} has no target pixel"
    if n < MIN_TARGET_PIXELS:
        return (f"too_small: {where} has {n} target pixel{'s' * (n > 1)} ({100 * share:.3g}% of the image); "
                f"the minimum is {MIN_TARGET_PIXELS}")
    if share > MAX_TARGET_SHARE:
        return (f"too_large: {where} covers {100 * share:.1f}% of the image; the maximum is "
                f"{100 * MAX_TARGET_SHARE:.0f}%")
    if not (dilate(mask, 6) & ~dilate(mask, 2)).any():  # the ring measure() compares brightness with
        return f"no_surroundings: {where} leaves no background within 6 pixels of the target"
    return ""


def share_words(area):
    """The share of the image in words that agree with the measured area (round() would say 'about 0%',
    and max(1, ...) would say 'about 1%' of a one-pixel target)."""
    return "less than 1%" if area < 0.005 else f"about {max(1, round(100 * area))}%"


def measure(image, mask):
    """What the raw pixels show about the target: position, extent, shape, boundary, brightness.
    Every word the geometry teacher writes and the gate's spatial check comes from here. A degenerate
    mask (target_problem) raises ValueError: its facts would be NaN or meaningless."""
    problem = target_problem(mask, "the mask")
    if problem:
        raise ValueError(problem)
    H, W = mask.shape
    lum = (image.mean(axis=2) if image.ndim == 3 else image).astype(np.float32) / 255
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / W, (ys.mean() + 0.5) / H
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "central"
    v = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "middle"
    # shape: compare the mask with the ellipse that has the same second moments
    cov = np.cov(np.stack([xs, ys]).astype(np.float64)) + np.eye(2) / 12  # +1/12: pixel extent
    evals, evecs = np.linalg.eigh(cov)
    elongation = float(np.sqrt(evals[1] / evals[0]))
    gy, gx = np.mgrid[0:H, 0:W]
    d = np.stack([gx - xs.mean(), gy - ys.mean()], axis=-1) @ evecs  # (H, W, 2) in the ellipse axes
    ellipse = (d[..., 0] ** 2 / (4 * evals[0]) + d[..., 1] ** 2 / (4 * evals[1])) <= 1
    iou = float((ellipse & mask).sum() / (ellipse | mask).sum())
    shape = "irregular" if iou < 0.8 else "elongated" if elongation >= 2.2 else "round"
    # boundary: how much of the core-to-background step happens within 2 px of the edge
    core = erode(mask, 4) if erode(mask, 4).sum() >= 5 else mask
    far = dilate(mask, 8) & ~dilate(mask, 4)
    inner, outer = mask & ~erode(mask, 2), dilate(mask, 2) & ~mask
    step = lum[core].mean() - lum[far].mean() if far.any() else 0.0
    edge = (lum[inner].mean() - lum[outer].mean()) / step if abs(step) > 0.03 and outer.any() else 0.0
    # brightness versus a ring of surroundings a few pixels away
    ring = dilate(mask, 6) & ~dilate(mask, 2)
    diff = float(lum[mask].mean() - lum[ring].mean()) if ring.any() else 0.0
    area = float(mask.mean())
    facts = {"cx": round(float(cx), 4), "cy": round(float(cy), 4), "h": h, "v": v,
            "area": round(area, 5), "size": "small" if area < 0.025 else "large",
            "elongation": round(elongation, 3), "ellipse_iou": round(iou, 3), "shape": shape,
            "edge": round(float(edge), 3), "boundary": "sharp" if edge > 0.7 else "blurred",
            "contrast": round(diff, 4),
            "brightness": "brighter" if diff > 0.04 else "darker" if diff < -0.04 else "similar"}
    bad = [k for k, x in facts.items() if isinstance(x, float) and not np.isfinite(x)]
    if bad:  # a guard, not an expected path: target_problem should have refused this mask
        raise ValueError(f"degenerate_mask: non-finite {', '.join(bad)}")
    return facts


def phrases(f):
    """The facts as the phrases that answers, chains and closed-ended choices are written with."""
    return {"where": "central part of the image" if f["h"] == "central" and f["v"] == "middle"
            else f"{f['v']} {f['h']} part of the image",
            "side": f"{f['h']} part of the image",
            "bright": "similar in brightness to its surroundings" if f["brightness"] == "similar"
            else f"{f['brightness']} than its surroundings",
            "margin": "a sharp, well-defined boundary" if f["boundary"] == "sharp"
            else "a blurred, ill-defined boundary",
            "total": sum(rule_points(f)), "grade": GRADES[sum(rule_points(f))].capitalize()}


# ----------------------------------------------------------------------------- MSD reader (§A.1)
CT_WINDOWS = {"abdomen": (-150, 250), "liver": (-25, 230), "lung": (-1000, 1000)}  # HU
MSD_ALIASES = {"pz": "prostate peripheral zone", "tz": "prostate transition zone",
               "anterior": "anterior hippocampus", "posterior": "posterior hippocampus"}


def msd_target(label, task):
    """Label name from dataset.json -> (target name, target type)."""
    name = MSD_ALIASES.get(label.lower().strip(), label.lower().strip())
    if name in ("cancer", "tumor", "tumour"):
        name = f"{task.split('_', 1)[-1].lower()} tumor"  # the site is the task's name: Task03_Liver
    kind = "tumor" if re.search(r"tumo|cancer|carcinoma|edema|necro", name) else \
        "vessel" if "vessel" in name else "organ"
    return name, kind


def read_msd_task(root):
    """dataset.json -> (labels, modalities, [(image path, label path)]); './' stripped, '._' files skipped."""
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        raise SystemExit(f"prepare_data.py: error: {path} not found: --msd-root must be an MSD task folder")
    try:
        with open(path) as fh:
            meta = json.load(fh)
        entries = [(os.path.join(root, e["image"].replace("./", "", 1)),
                    os.path.join(root, e["label"].replace("./", "", 1))) for e in meta["training"]]
        labels, modalities = meta["labels"], meta["modality"]
        if not isinstance(labels, dict) or not isinstance(modalities, dict):
            raise TypeError("'labels' and 'modality' must be objects")
        [int(k) for k in list(labels) + list(modalities)]  # label values and channels are integers
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"prepare_data.py: error: {path}: not a valid MSD dataset.json "
                         f"({type(e).__name__}: {e})")
    return labels, modalities, [e for e in entries if not os.path.basename(e[0]).startswith("._")]


def msd_normalise(vol, modality, task):
    """CT: fixed HU window by site; MRI: 0.5-99.5 percentile of the non-zero voxels of the volume."""
    if modality.upper() == "CT":
        t = task.lower()
        site = "lung" if "lung" in t else "liver" if re.search(r"liver|hepatic", t) else "abdomen"
        lo, hi = CT_WINDOWS[site]
    else:
        nz = vol[vol != 0]
        lo, hi = np.percentile(nz, [0.5, 99.5]) if nz.size else (0.0, 1.0)
    return np.clip((vol - lo) / max(hi - lo, 1e-6), 0, 1)


def msd_cases(work, args):
    """All (slice, label) cases of one MSD volume; a 4-D volume gives one image per channel."""
    import nibabel as nib  # only MSD needs it
    _, root, image_path, label_path = work
    task = os.path.basename(os.path.normpath(root))
    labels, modalities, _ = read_msd_task(root)
    case_id = os.path.basename(image_path).split(".nii")[0]
    group = f"msd-{task}-{case_id}"
    missing = [p for p in (image_path, label_path) if not os.path.isfile(p)]
    if missing:
        yield {"id": group, "reasons": [f"missing_file: {missing[0]} (listed in {root}/dataset.json)"]}
        return
    arrays = []
    for path in (image_path, label_path):
        try:
            arrays.append(np.asanyarray(nib.load(path).dataobj).astype(np.float32))
        except Exception as e:  # truncated gzip, not a NIfTI, bad header, ...
            yield {"id": group, "reasons": [f"unreadable_volume: {path}: {type(e).__name__}: {e}"]}
            return
    vol, lab = arrays
    vol = vol[..., None] if vol.ndim == 3 else vol  # (X, Y, Z, C)
    problem = (f"bad_shape: {image_path} is {vol.ndim}-D, an MSD image is 3-D or 4-D" if vol.ndim != 4 else
               f"size_mismatch: image {image_path} is {vol.shape[:3]} but label {label_path} is {lab.shape}"
               if vol.shape[:3] != lab.shape else
               f"non_finite: {image_path} or its label holds NaN or infinite voxels"
               if not (np.isfinite(vol).all() and np.isfinite(lab).all()) else "")
    if problem:
        yield {"id": group, "reasons": [problem]}
        return
    lab = np.rint(lab).astype(np.int32)
    names = {int(k): msd_target(v, task) for k, v in labels.items() if int(k) != 0}
    channels = range(vol.shape[3]) if args.msd_channels == "all" else map(int, args.msd_channels.split(","))
    channels = [c for c in channels if c < vol.shape[3]]  # get_args checked the list; a volume may have fewer
    n_yielded = 0
    for c in channels:
        sequence = modalities.get(str(c), "MRI")
        norm = msd_normalise(vol[..., c], sequence, task)
        for z in range(0, lab.shape[2], args.msd_stride):
            # np.rot90: NIfTI stores (x, y); rows of a displayed image are y, anterior up
            image, lab_z = to_uint8(np.rot90(norm[:, :, z])), np.rot90(lab[:, :, z])
            for value, (target, ttype) in names.items():
                mask = lab_z == value
                if mask.sum() < 100:  # §A.1: keep slices with >= 100 target pixels
                    continue
                n_yielded += 1
                problem = target_problem(mask, f"label {label_path} slice {z} ({target})")
                if problem:  # e.g. a label that fills the whole slice
                    yield {"id": f"{group}-c{c}-z{z:03d}--{slug(target)}", "reasons": [problem]}
                    continue
                absent = [names[o] for o in names if o != value and not (lab_z == o).any()]
                yield {"image_key": f"{group}-c{c}-z{z:03d}", "group": group, "source": "msd", "subset": task,
                       "modality": "CT" if sequence.upper() == "CT" else "MRI", "target": target,
                       "target_type": ttype, "image": image, "mask": mask, "others": absent, "order": None,
                       "meta": {"volume": os.path.relpath(image_path, root), "slice": z, "channel": c,
                                "sequence": modalities.get(str(c), "")}}
    if not n_yielded:  # the volume must not vanish without a word
        yield {"id": group, "reasons": [f"no_target: {label_path} (label of {image_path}) has no slice (every "
                                        f"{args.msd_stride}th, channels {args.msd_channels}) with >= 100 pixels "
                                        f"of a label of {root}/dataset.json"]}


# ----------------------------------------------------------------------------- BiomedParse reader (§A.1)
def parse_bmp_name(stem, is_mask):
    """IMG_MODALITY_SITE[_TARGET] parsed from the right (the image id itself may contain '_')."""
    parts = stem.split("_")
    if len(parts) < (4 if is_mask else 3):
        return None
    target = parts.pop().replace("+", " ") if is_mask else None
    site, modality = parts.pop().replace("+", " "), parts.pop().replace("+", " ")
    return {"image_stem": "_".join(parts + [modality.replace(" ", "+"), site.replace(" ", "+")]),
            "modality": modality, "site": site, "target": target}


def bmp_group(image_id):
    """The patient/volume an image belongs to, so that its slices share one split. Rule: an image id of
    three or more '_'-parts whose last part is a number (<dataset>_<patient or volume>_<slice>, as in
    "amos_0042_117") is a slice: its group is the id without that number ("amos_0042"). Any other id
    ("ISIC_0000123", "img7") names a single image: its own group."""
    parts = image_id.split("_")
    return "_".join(parts[:-1]) if len(parts) >= 3 and parts[-1].isdigit() else image_id


def bmp_target_type(target):
    t = target.lower()
    for kind, pattern in [("tumor", r"tumo|cancer|carcinoma|glioma"), ("vessel", r"vessel|arter|vein|aorta"),
                          ("lesion", r"lesion|nodule|polyp|cyst|opacity|pneumo|covid|infection|edema"),
                          ("cell", r"cell|nucle|gland"), ("retina", r"optic|disc|cup|retin|fluid"),
                          ("tissue", r"tissue|fat|muscle")]:
        if re.search(pattern, t):
            return kind
    return "organ"


def bmp_name_problem(folder, name, is_mask):
    """Why a file in train/ or train_mask/ cannot be read as BiomedParse input, or ''."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"bad_name: {path} is not a file (images and masks lie directly in the split folder)"
    if not name.endswith(".png"):
        return f"bad_name: {path} is not a .png file"
    if not parse_bmp_name(name[:-4], is_mask):
        form = "IMG_MODALITY_SITE_TARGET.png" if is_mask else "IMG_MODALITY_SITE.png"
        return f"bad_name: {path} does not follow the convention {form}"
    return ""


def bmp_work(root):
    """One work item per image: (..., image path, [(mask path, target)]). A mask without an image, and a
    file whose name follows no convention (its item holds the reason instead of masks), become rejects;
    hidden files (.DS_Store, ._*) are skipped. A folder without train/ or test/ is the BiomedParse
    parent: read every subset."""
    if not os.path.isdir(root):
        raise SystemExit(f"prepare_data.py: error: --bmp-root {root} is not a folder")
    subset, work = os.path.basename(os.path.normpath(root)), []
    splits = [s for s in ("train", "test") if os.path.isdir(os.path.join(root, s))]
    for split in splits:
        img_dir, mask_dir = os.path.join(root, split), os.path.join(root, f"{split}_mask")
        masks, images = {}, set()  # image stem -> [(mask path, target)]; image stems
        for folder, is_mask in ((mask_dir, True), (img_dir, False)):
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if name.startswith("."):
                    continue
                problem = bmp_name_problem(folder, name, is_mask)
                if problem:
                    work.append(("bmp", root, subset, os.path.basename(folder), name,
                                 os.path.join(folder, name), problem))
                elif is_mask:
                    parsed = parse_bmp_name(name[:-4], True)
                    masks.setdefault(parsed["image_stem"], []).append((os.path.join(mask_dir, name),
                                                                      parsed["target"]))
                else:
                    images.add(name[:-4])
        for stem in sorted(images | set(masks)):
            image_path = os.path.join(img_dir, stem + ".png")
            work.append(("bmp", root, subset, split, stem, image_path, masks.get(stem, [])))
    if not splits:
        subsets = [os.path.join(root, d) for d in sorted(os.listdir(root))
                   if any(os.path.isdir(os.path.join(root, d, s)) for s in ("train", "test"))]
        if not subsets:
            raise SystemExit(f"prepare_data.py: error: --bmp-root {root} has no train/ or test/ folder "
                             "(nor subset folders with one)")
        work = [w for sub in subsets for w in bmp_work(sub)]
    return work


PNG_ERRORS = (OSError, ValueError, Image.DecompressionBombError)  # missing, truncated, not a PNG, huge


def bmp_cases(work, args):
    """The (image, target) cases of one BiomedParse image, or rejects that name the bad file."""
    _, root, subset, split, stem, image_path, masks = work
    key = f"bmp-{slug(subset)}-{split}-{slug(stem)}"
    if isinstance(masks, str):  # a file whose name follows no convention: bmp_work's reason
        yield {"id": f"{key}--bad-name", "reasons": [masks]}
        return
    if not masks:
        yield {"id": key, "reasons": [f"no_mask: {image_path} has no mask in {split}_mask/"]}
        return
    if not os.path.isfile(image_path):
        for p, target in masks:
            yield {"id": f"{key}--{slug(target)}", "reasons": [f"no_image: mask {p} has no image {image_path}"]}
        return
    try:
        image = read_png(image_path)
    except PNG_ERRORS as e:  # one reject per mask: each of them ends somewhere
        for p, target in masks:
            yield {"id": f"{key}--{slug(target)}", "reasons": [f"unreadable_image: {image_path} (image of mask "
                                                               f"{p}): {type(e).__name__}: {e}"]}
        return
    parsed, targets = parse_bmp_name(stem, False), {t for _, t in masks}
    absent = [(t, bmp_target_type(t)) for t in args.bmp_targets.get(subset, []) if t not in targets]
    for p, target in masks:
        try:
            mask = read_png(p, as_mask=True)
            problem = (f"size_mismatch: mask {p} is {mask.shape[1]}x{mask.shape[0]} but its image "
                       f"{image_path} is {image.shape[1]}x{image.shape[0]}" if mask.shape != image.shape[:2]
                       else target_problem(mask, f"mask {p} (of image {image_path})"))
        except PNG_ERRORS as e:
            problem = f"unreadable_mask: {p} (of image {image_path}): {type(e).__name__}: {e}"
        if problem:
            yield {"id": f"{key}--{slug(target)}", "reasons": [problem]}
            continue
        image_id = "_".join(stem.split("_")[:-2])  # the stem less its _MODALITY_SITE
        yield {"image_key": key, "group": f"bmp-{slug(subset)}-{slug(bmp_group(image_id))}",
               "folder_split": split, "source": "biomedparse", "subset": subset,
               "modality": parsed["modality"], "target": target, "target_type": bmp_target_type(target),
               "image": image, "mask": mask, "others": absent, "order": None,
               "meta": {"site": parsed["site"], "bmp_split": split, "file": os.path.relpath(p, root),
                        "image_file": os.path.relpath(image_path, root)}}


# ----------------------------------------------------------------------------- questions (§A.1, Table 4)
TEMPLATES = {
    "yesno": {"*": ["Is {art} {t} visible in this {mp}?", "Does this {mp} show {art} {t}?"]},
    # identify does not name the type: the pixels, not the wording, must tell which target it is
    "identify": {"*": ["What structure is shown in this {mp}?",
                       "Which structure can be identified in this {mp}?"]},
    "location_choice": {"*": ["Is the {t} in the left, right, or center of the image?",
                              "In this {mp}, is the {t} on the left, on the right, or in the center?"]},
    "location": {"*": ["Where is the {t} located in this {mp}?"],
                 "lesion": ["Where is the {t} found in this {mp}?"],
                 "vessel": ["Where does the {t} run in this {mp}?"]},
    "caption": {"*": ["Describe this {mp}."]},  # names no target: the pixels must tell shape and place
    "describe": {"*": ["Describe the appearance of the {t} in this {mp}."],
                 "lesion": ["Describe the {t} seen in this {mp}.",
                            "What does the {t} in this {mp} look like?"],
                 "vessel": ["Describe the appearance and course of the {t} in this {mp}."]},
    # the grading rule (RULE below) is stated in the question: the model is told how, it must see what
    "reasoning": {"*": ["Grade the {t} in this {mp} by the points rule: one point each for an irregular shape, "
                        "lying in the upper part, a large size and being darker than its surroundings. What is the "
                        "grade?"],
                  "lesion": ["Score the {t} in this {mp} with the points rule (one point each for an irregular "
                             "shape, lying in the upper part, a large size, and being darker than its surroundings). "
                             "Which grade is it?"]},
}

# The reasoning question applies a visible points rule in the spirit of the clinical ones (ABCD for
# dermoscopy, TI-RADS points for ultrasound): one point for each of four findings, the total decides the
# grade. No single finding answers it, and the answer leads with the grade, so the findings belong in the
# chain: one finding per step, the sum in the last. Position counts instead of the boundary (as the upper
# lobe does in the Brock lung-nodule score): no probe reads the boundary from the tiny backbone's image
# tokens (docs/tuning-log.md), so a rule counting it would cap every model near half right.
RULE = [("shape", "irregular"), ("v", "upper"), ("size", "large"), ("brightness", "darker")]
GRADES = ["low", "low", "intermediate", "high", "high"]  # by total points 0..4


def rule_points(f):
    """The points of each RULE finding (0 or 1) for one set of image-space facts."""
    return [int(f[key] == value) for key, value in RULE]


def points_text(n):
    return f"{n} point" if n == 1 else f"{n} points"



def samples_for(case, args):
    """The questions asked about one (image, target) case: --questions-per-image types, rotated so
    that consecutive phantoms cycle through all six; half of the yes/no questions are negatives."""
    key = f"{case['image_key']}--{slug(case['target'])}"
    r = case["order"] if case["order"] is not None else stable_hash(key)
    types = args.types or QUESTION_TYPES
    rotated = types[r % len(types):] + types[:r % len(types)]
    mp = "fundus photograph" if case["modality"] == "fundus" else f"{case['modality']} image"
    for qtype in ["caption"] if args.captions else rotated[:args.questions_per_image]:
        sid = f"{key}--{qtype}"
        rng = random.Random(stable_hash(sid))
        target, ttype, negative = case["target"], case["target_type"], False
        if qtype == "yesno" and (r // 6) % 2 == 1 and case["others"]:
            target, ttype = case["others"][stable_hash(sid) % len(case["others"])]
            negative = True  # ask about a target that is absent from this image
        # a tumor is asked about in the words of a lesion
        forms = TEMPLATES[qtype].get("lesion" if ttype == "tumor" else ttype, TEMPLATES[qtype]["*"])
        question = rng.choice(forms).format(t=target, art=article(target, ttype), mp=mp)
        yield {"id": sid, "target": target, "target_type": ttype, "negative": negative,
               "question": question, "question_type": qtype, "rng": rng}


# the answer of each type, filled in from the facts and their phrases(): the geometry teacher's answer
# and the closed-ended choices
ANSWERS = {
    "yesno": "Yes, {art} {t} is visible in this image.",
    "yesno_negative": "No, {art} {t} is not visible in this image.",
    "identify": "The structure shown is {art} {t}.",
    "location_choice": "The {t} is in the {side}.",
    "location": "The {t} is in the {where}.",
    # what a generic image caption says: no target name, no diagnosis
    "caption": "A {size}, {shape} structure {bright} lies in the {where}, with {margin}.",
    "describe": "The {t} is a {size}, {shape} structure in the {where}, {bright}, with {margin}.",
    "reasoning": "{grade} grade: {total} of 4 points.",
}


def canonical_answer(qtype, target, ttype, f, negative=False):
    """The answer sentence of ANSWERS for one target and one set of image-space facts."""
    form = ANSWERS["yesno_negative" if qtype == "yesno" and negative else qtype]
    return form.format(t=target, art=article(target, ttype), **f, **phrases(f))


def geometry_chain(sample, f, K):
    """K reasoning steps written from the facts only: nothing but what the raw pixels show."""
    t, qtype, w = sample["target"], sample["question_type"], phrases(f)
    art, where = article(t, sample["target_type"]), w["where"]
    look = f"{'an' if f['shape'][0] in 'aeiou' else 'a'} {f['shape']} structure {w['bright']}"
    if qtype == "caption":
        return [canonical_answer(qtype, t, sample["target_type"], f)]
    if qtype == "yesno" and sample["negative"]:
        return [f"The only distinct structure is {look} in the {where}, which does not have the "
                f"appearance of {art} {t}."]
    if qtype in ("yesno", "identify"):
        return [f"A {f['size']}, {f['shape']} structure {w['bright']} in the {where} has the appearance "
                f"of {art} {t}."]
    if qtype == "location_choice":
        return [f"The {t} appears as {look}, and its center lies in the {f['h']} third of the image."]
    if qtype == "location":
        return [f"{look.capitalize()} consistent with {art} {t} is seen.",
                f"Its center lies about {round(100 * f['cx'])}% across and {round(100 * f['cy'])}% down "
                f"the image, which is the {where}."]
    if qtype == "reasoning":  # one RULE finding per step; the last step adds up (K = 3 folds size and brightness)
        p = rule_points(f)
        last = f"{points_text(sum(p))} of 4 in total, so the grade is {GRADES[sum(p)]}."
        chain = [f"Its shape is {f['shape']}: {points_text(p[0])}.",
                 f"It lies in the {f['v']} part of the image: {points_text(p[1])}.",
                 f"It covers {share_words(f['area'])} of the image, so it is {f['size']}: "
                 f"{points_text(p[2])}.",
                 f"It is {w['bright']}: {points_text(p[3])}; {last}"]
        return chain if K == 4 else chain[:2] + [
            f"It is {f['size']} and {w['bright']}: {points_text(p[2] + p[3])}; {last}"]
    chain = [f"A structure {w['bright']} stands out in the {where}.",
             f"It covers {share_words(f['area'])} of the image, so it is {f['size']}.",
             f"Its shape is {f['shape']} and it has {w['margin']}."]
    # describe; K = 2 folds extent and form into one step
    return chain if K == 3 else [chain[0], f"It is {f['size']} and {f['shape']}, with {w['margin']}."]


def closed_form(sample, f, case, rng):
    """Choices (§B.4): the canonical answer and answers with one attribute changed; every split has them
    (training asks with options too, train.py --options-rate). Captions have none.
    choices[answer_index] is the canonical answer from the image-space facts (= `answer` with the
    geometry teacher; an LLM teacher's free-text answer may be worded differently)."""
    qtype, t, tt = sample["question_type"], sample["target"], sample["target_type"]
    sides, shapes = ("left", "central", "right"), ("round", "elongated", "irregular")
    true = canonical_answer(qtype, t, tt, f, sample["negative"])
    if qtype == "yesno":
        choices = [canonical_answer(qtype, t, tt, f), canonical_answer(qtype, t, tt, f, True)]
        return choices, choices.index(true)
    if qtype == "identify":  # other targets of this subset first, then common organs
        organs = ("liver", "kidney", "spleen", "lung", "heart", "pancreas")
        pool = case["others"] + [(x, "organ") for x in organs if x != t]
        wrong = list(dict.fromkeys(canonical_answer(qtype, x, y, f) for x, y in pool))
        wrong = [w for w in wrong if w != true][:3]
    elif qtype == "location_choice":
        wrong = [canonical_answer(qtype, t, tt, dict(f, h=h)) for h in sides if h != f["h"]]
    elif qtype == "reasoning":  # every total the rule can give
        wrong = [f"{GRADES[n].capitalize()} grade: {n} of 4 points." for n in range(5)]
    elif qtype == "location":
        regions = [(v, h) for v in ("upper", "middle", "lower") for h in sides if (v, h) != (f["v"], f["h"])]
        wrong = [canonical_answer(qtype, t, tt, dict(f, v=v, h=h)) for v, h in rng.sample(regions, 3)]
    else:
        flips = [dict(f, brightness="darker" if f["brightness"] == "brighter" else "brighter"),
                 dict(f, shape=rng.choice([s for s in shapes if s != f["shape"]])),
                 dict(f, boundary="blurred" if f["boundary"] == "sharp" else "sharp"),
                 dict(f, size="large" if f["size"] == "small" else "small"),
                 dict(f, h=rng.choice([h for h in sides if h != f["h"]]))]
        wrong = [canonical_answer(qtype, t, tt, g) for g in rng.sample(flips, 3)]
    choices = list(dict.fromkeys([true] + wrong))
    rng.shuffle(choices)
    return choices, choices.index(true)


def assign_split(group, args, folder=None):
    """Deterministic from the hash of the sample's group (a volume, a patient, an image), so related
    samples never straddle splits; the hash ignores subset and type, so every (subset, type) stratum gets
    the same expected fractions. A source's own split wins (folder: BiomedParse's test/ or train/): its
    test images are always "test", its train images are never (val with --val-frac, else train)."""
    u = stable_hash(f"split:{group}") / 16 ** 12
    if folder == "test":
        return "test"
    if folder == "train":
        return "val" if u < args.val_frac else "train"
    return "test" if u < args.test_frac else "val" if u < args.test_frac + args.val_frac else "train"


# ----------------------------------------------------------------------------- teachers (§A.2)
SYSTEM_PROMPT = """You are a teacher that writes supervision data for training a medical visual \
reasoning model. For each image and question you produce a concise final answer and a short \
step-by-step reasoning chain.
Teacher-only information: the image you see has the target drawn as a semi-transparent red layer with a \
yellow edge, and you are told the target's identity. Use both only to locate the target correctly. Write \
as if you were a student who sees only the original, unannotated image.
Never mention or imply hidden guidance, special markings, annotations, masks, overlays, colored layers, \
highlighted areas, segmentation maps, ROI, labels, ground truth, metadata or extra visual cues, and never \
suggest that the target identity was given to you.
Base every statement on visible evidence: location, shape, boundary, extent, density or signal \
intensity, texture and relations to nearby structures. You may name the given target, but do not add \
unsupported diagnoses, malignancy or benignity, severity, prognosis or treatment. For a normal organ do \
not describe lesions, masses, tumors or other pathology.
Spatial wording: image space only (left, right, center, upper and lower parts of the image). Never use \
patient-left, patient-right, anatomical left or anatomical right.
Output strict JSON with exactly two fields, "final_answer" (a string) and "reasoning_chain" (a list of \
strings, one per step). No markdown, no code fences, no other text."""

GUIDANCE = {
    "yesno": "Give direct visual evidence for the yes/no answer.",
    "identify": "Justify the identification from the visible appearance and context.",
    "location_choice": "Answer with a complete sentence naming the image region, not a bare word.",
    "location": "Step 1 finds the target; step 2 gives its image-space position relative to nearby anatomy.",
    "describe": "Cover appearance, shape, boundary, extent and other visible characteristics.",
    "reasoning": "Analyze location, morphology, visual contrast and relations to nearby structures.",
}
EXAMPLE = {"final_answer": "The liver is in the left part of the image.",
           "reasoning_chain": ["A large homogeneous soft-tissue structure fills the left part of the image.",
                               "Its smooth outline and size match the liver."]}


def user_prompt(case, sample, strict):
    qtype, (lo, hi) = sample["question_type"], STEP_RANGE[sample["question_type"]]
    example = dict(EXAMPLE, reasoning_chain=EXAMPLE["reasoning_chain"][:hi])
    lines = [f"Target (teacher-only): {sample['target']}", f"Target type: {sample['target_type']}",
             f"Modality: {case['modality']}", f"Question type: {qtype}",
             f"Student-visible question: {sample['question']}"]
    if qtype == "yesno":
        lines.append("Teacher-only fact: the correct answer is " +
                     ("No; the asked target is absent and the structure drawn in red is something else."
                      if sample["negative"] else "Yes."))
    steps = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
    lines += [f"Guidance for {qtype}: write {steps} reasoning step(s). {GUIDANCE[qtype]}",
              f"Example of the output style: {json.dumps(example)}"]
    if strict:  # §A.3 retry: name every violation and ask for a fresh answer
        lines += ["STRICT RULES: your previous answer was rejected because:", *(f"- {r}" for r in strict),
                  "Regenerate the answer from scratch, obey every rule above, and output only the "
                  "JSON object."]
    return "\n".join(lines)


class TeacherUnavailable(Exception):
    """The run cannot go on (the key is refused, the URL is wrong, the endpoint is down after the retries):
    not a decision about the sample, so the run stops and the rerun asks again."""


class RequestRefused(Exception):
    """The endpoint refused this one request (HTTP 400, 413, 422, ...): a reason to retry, then reject."""


def endpoint(args):
    return args.base_url.rstrip("/") + "/chat/completions"


def openai_teacher(case, sample, facts, strict, args):
    """One chat-completions call with the overlay as a base64 data URL; retries 429/5xx/network errors
    with exponential backoff, at most --http-retries times. 401/403/404 and an endpoint still down after
    the retries raise TeacherUnavailable; another 4xx raises RequestRefused."""
    buf = io.BytesIO()
    Image.fromarray(overlay_view(case["image"], case["mask"])).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = json.dumps({"model": args.teacher_model, "messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "text", "text": user_prompt(case, sample, strict)},
                                     {"type": "image_url", "image_url": {"url": url}}]}]}).encode()
    headers = {"Content-Type": "application/json",
               "Authorization": "Bearer " + os.environ.get(args.api_key_env, "")}  # never logged
    error = "no attempt"
    for attempt in range(args.http_retries + 1):
        if attempt:
            time.sleep(min(args.backoff_max, args.backoff_base * 2 ** (attempt - 1)))
        request = urllib.request.Request(endpoint(args), body, headers)
        try:
            with urllib.request.urlopen(request, timeout=args.timeout) as response:
                reply = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}"
            if e.code in (401, 403):  # asking again, or with the next sample, will not help
                raise TeacherUnavailable(f"the teacher at {endpoint(args)} refused the key in "
                                         f"${args.api_key_env} ({error}): check the key") from None
            if e.code == 404:
                raise TeacherUnavailable(f"the teacher at {endpoint(args)} answered {error}: check --base-url "
                                         f"and --teacher-model {args.teacher_model}") from None
            if e.code != 429 and e.code < 500:  # this request only (too large, refused content, ...)
                detail = " ".join(e.read(300).decode("utf-8", "replace").split())
                raise RequestRefused(f"http: the endpoint answered {error} ({detail})") from None
            continue
        except (urllib.error.URLError, OSError) as e:  # refused, reset, timeout, unknown host
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            continue
        try:
            return json.loads(reply)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return reply  # not chat-completions JSON: the gate rejects it as malformed
    raise TeacherUnavailable(f"the teacher at {endpoint(args)} is unreachable after {args.http_retries} "
                             f"retries (last: {error})")


def geometry_teacher(case, sample, facts, strict, args):
    """The offline teacher: answer and chain from the facts. K is drawn from the type's range with the
    sample's own RNG (one draw even for a fixed K: the closed-ended choices draw from it next)."""
    qtype, (lo, hi) = sample["question_type"], STEP_RANGE[sample["question_type"]]
    K = lo + sample["rng"].randint(0, 1) * (hi - lo)
    answer = canonical_answer(qtype, sample["target"], sample["target_type"], facts, sample["negative"])
    return json.dumps({"final_answer": answer, "reasoning_chain": geometry_chain(sample, facts, K)})


# ----------------------------------------------------------------------------- quality gate (§A.3)
# words that reveal the teacher saw an annotation (round 2); matched on word boundaries
LEAK_TERMS = ["mask", "masks", "masked", "overlay", "overlays", "overlaid", "highlight", "highlighted",
              "highlighting", "segmentation", "segmented", "roi", "region of interest", "label", "labels",
              "labeled", "labelled", "ground truth", "annotation", "annotations", "annotated", "contour",
              "outline in red", "outlined in red", "red outline", "red overlay", "red layer", "red-shaded",
              "yellow line", "yellow outline", "yellow border", "marked region", "marker", "bounding box",
              "hidden metadata", "teacher", "tinted"]
# pathology words that must not describe normal anatomy (round 3, organ targets only)
PATHOLOGY_TERMS = ["lesion", "lesions", "mass", "masses", "tumor", "tumors", "tumour", "tumours",
                   "calcification", "calcified", "inflammation", "inflamed", "nodule", "nodules", "cyst",
                   "cystic", "metastasis", "metastases", "malignant", "malignancy", "benign", "carcinoma",
                   "cancer", "necrosis", "necrotic", "abscess", "hemorrhage", "edema", "infarct", "polyp"]
LEAK_RE = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in LEAK_TERMS) + r")\b", re.I)
PATHOLOGY_RE = re.compile(r"\b(?:" + "|".join(PATHOLOGY_TERMS) + r")\b", re.I)
# patient-space wording mixed into image-space answers (round 4)
MIXED_RE = re.compile(r"patient'?s?[ -](?:left|right)|(?:anatomic(?:al)?|radiologic(?:al)?)[ -](?:left|right)"
                      r"|(?:left|right) of the patient|(?:left|right) side of the patient", re.I)
# a side word is a claim about position when it ends its phrase, or leads (via one more side word) to a
# place noun, "of the image" or a connective; "left kidney" (a name) and "left of the kidney" (a relation
# to a neighbour) are not claims
SIDE_CLAIM_RE = re.compile(
    r"\b(left|right|upper|lower|top|bottom)\b(?=(?:\s+(?:left|right|upper|lower|top|bottom|central|middle)\b)?"
    r"\s*(?:$|[,)]|(?:part|parts|side|half|third|portion|region|area|corner|quadrant|edge|border|aspect|field"
    r"|zone|and|or|but|near|next|beside|adjacent|close|above|below|with|while|where|which|in|on|at)\b"
    r"|of\s+(?:the\s+|this\s+)?(?:image|picture|frame|scan|slice|view)\b))", re.I)
# clauses: sentences, and parts joined by a conjunction that starts a new subject
CLAUSE_RE = re.compile(r"[.;:!?]|,?\s+(?:and|but|while|whereas)\s+(?=(?:the|a|an|it|its|this)\b)", re.I)


def side_claims(answer, chain, target):
    """The side words the gate judges: only what is said about the target. A clause counts when it is part
    of the final answer, names the target, has "it"/"its" as its subject, or speaks of an unnamed
    "structure" (how a step finds the target before naming it). Sentences about neighbouring structures
    ("the liver lies to the left of the kidney" for a spleen target) are not judged. In a judged clause
    the target's own name is removed first ('left atrium' is a name), then SIDE_CLAIM_RE keeps the claims."""
    about = re.compile(r"\b" + re.escape(target) + r"\b", re.I)
    claims = []
    for i, part in enumerate([answer] + chain):
        for clause in CLAUSE_RE.split(part):
            clause = clause.strip()
            if i == 0 or about.search(clause) or re.match(r"(?:it|its)\b", clause, re.I) or \
                    re.search(r"\bstructure\b", clause, re.I):
                claims += [m.lower() for m in SIDE_CLAIM_RE.findall(about.sub(" ", clause).strip())]
    return claims


def gate(raw, sample, facts):
    """The six rounds plus the spatial check (side_claims: only what is said about the target is judged).
    Returns (normalised output or None, list of violations)."""
    try:
        out = json.loads(raw)
    except (ValueError, TypeError):
        return None, ["json: output is not valid JSON"]
    if not isinstance(out, dict) or set(out) != {"final_answer", "reasoning_chain"}:
        return None, ["json: need exactly the fields final_answer and reasoning_chain"]
    answer, chain = out["final_answer"], out["reasoning_chain"]
    if not isinstance(answer, str) or not answer.strip() or not isinstance(chain, list) or \
            not chain or not all(isinstance(s, str) and s.strip() for s in chain):
        return None, ["json: final_answer must be a non-empty string, "
                      "reasoning_chain a list of non-empty strings"]
    answer, chain = answer.strip(), [s.strip() for s in chain]
    text = " ".join([answer] + chain)
    qtype, (lo, hi) = sample["question_type"], STEP_RANGE[sample["question_type"]]

    def hits(regex):
        return sorted({m.lower() for m in regex.findall(text)})
    reasons = [f"leak: forbidden term '{m}'" for m in hits(LEAK_RE)]
    if sample["target_type"] == "organ":
        reasons += [f"pathology: '{m}' used for a normal organ" for m in hits(PATHOLOGY_RE)]
    reasons += [f"mixed_space: '{m}' is patient-space wording" for m in hits(MIXED_RE)]
    if not lo <= len(chain) <= hi:
        reasons.append(f"steps: {len(chain)} reasoning steps, {qtype} needs {lo}-{hi}")
    # spatial consistency: a side said about the target must agree with its centroid (side_claims: the rule)
    claims = side_claims(answer, chain, sample["target"])
    wrong = {"left": facts["cx"] > 0.55, "right": facts["cx"] < 0.45, "upper": facts["cy"] > 0.55,
             "top": facts["cy"] > 0.55, "lower": facts["cy"] < 0.45, "bottom": facts["cy"] < 0.45}
    reasons += [f"spatial: says '{c}' but the target's center is at x={facts['cx']:.2f}, y={facts['cy']:.2f}"
                for c in sorted(set(claims)) if wrong[c]]
    if qtype == "yesno":
        said = answer.lower().split()[0].strip(",.!") if answer.split() else ""
        truth = "no" if sample["negative"] else "yes"
        if said not in ("yes", "no"):
            reasons.append("yesno: the answer must start with Yes or No")
        elif said != truth:
            reasons.append(f"yesno: answered '{said}' but the correct answer is {truth}")
    if reasons:
        return None, reasons
    return {"final_answer": normalise_answer(answer, sample), "reasoning_chain": chain}, []


def normalise_answer(answer, sample):
    """§A.3 round 6: short identify answers become sentences, location answers name the image, and
    every answer ends with a period."""
    core, qtype = answer.rstrip(" .!?"), sample["question_type"]
    t, art = sample["target"], article(sample["target"], sample["target_type"])
    if qtype == "identify" and len(core.split()) < 4:
        named = core.lower().startswith(("the ", "a ", "an "))
        core = f"The structure shown is {core if named else art + ' ' + core}"
    if qtype in ("location", "location_choice") and "image" not in core.lower():
        short = len(core.split()) < 4
        core = f"The {t} is in the {core.lower()} part of the image" if short else core + " in the image"
    return core + "."


# ----------------------------------------------------------------------------- one work item, end to end
STATE = {}  # per-process: the parsed arguments and the ids already decided (set by init_worker)


def init_worker(args, decided):
    STATE["args"], STATE["decided"], STATE["stop"] = args, decided, ""  # stop: why the teacher cannot go on


def process(work):
    """Read one work item (a phantom index, an MSD volume, a BiomedParse image), ask its questions,
    gate every answer. Returns ('sample'|'reject'|'stop', record) outcomes; bad input -> reject. Once the
    teacher stopped (STATE['stop']), items not yet started return nothing: they stay for the rerun."""
    args, decided = STATE["args"], STATE["decided"]
    outcomes = []
    if STATE["stop"]:
        return outcomes
    try:
        cases = [phantom_case(work[1], args.seed, args.image_size)] if work[0] == "phantom" else \
            msd_cases(work, args) if work[0] == "msd" else bmp_cases(work, args)
        for case in cases:
            if "reasons" in case:  # the input itself is bad: a reject with its reason
                if case["id"] not in decided:
                    outcomes.append(("reject", dict(case, source=work[0].replace("bmp", "biomedparse"))))
                continue
            todo = [s for s in samples_for(case, args) if s["id"] not in decided]
            if todo:
                outcomes += teach_case(case, todo, args)
            if STATE["stop"]:
                break
    except Exception as e:  # e.g. a corrupt volume: reject this item, keep what is done, continue
        wid = f"phantom-{work[1]}" if work[0] == "phantom" else slug(str(work[-2]))  # work[-2]: the image
        outcomes.append(("reject", {"id": f"{work[0]}-{wid}--error", "source": work[0],
                                    "reasons": [f"error: {work[-2]}: {type(e).__name__}: {e}"]}))
    return outcomes


def teach_case(case, todo, args):
    """Write the case's PNGs, then teacher + gate (with up to --max-retries retries) for each question."""
    facts = measure(case["image"], case["mask"])
    stem = f"{case['image_key']}--{slug(case['target'])}"
    paths = {"image": f"images/{case['image_key']}.png", "mask": f"masks/{stem}.png",
             "overlay": f"overlays/{stem}.png"}
    for kind, array in (("image", case["image"]), ("mask", case["mask"].astype(np.uint8) * 255),
                        ("overlay", overlay_view(case["image"], case["mask"]))):
        save_png(array, os.path.join(args.out, paths[kind]))
    teacher = openai_teacher if args.teacher == "openai" else geometry_teacher
    outcomes = []
    for sample in todo:
        if STATE.get("stop"):  # another thread's request stopped the run
            break
        history, strict, out = [], [], None
        try:
            for _attempt in range(1 + args.max_retries):  # a retry names the violations (§A.3)
                try:
                    raw = teacher(case, sample, facts, strict, args)
                except RequestRefused as e:  # not the answer's fault: the same prompt again
                    history.append(str(e))
                    continue
                out, strict = gate(raw, sample, facts)
                if out:
                    break
                history += strict
        except TeacherUnavailable as e:  # the whole run stops; this sample and the rest stay undecided
            STATE["stop"] = STATE["stop"] or str(e)
            outcomes.append(("stop", {"id": sample["id"], "reason": str(e)}))
            break
        head = {"id": sample["id"], "source": case["source"], "subset": case["subset"],
                "modality": case["modality"], "target": sample["target"],
                "target_type": sample["target_type"]}
        asked = {"question": sample["question"], "question_type": sample["question_type"]}
        if not out:
            outcomes.append(("reject", dict(head, **asked, reasons=history, attempts=1 + args.max_retries)))
            continue
        chain = out["reasoning_chain"]
        record = dict(head, **paths, **asked, answer=out["final_answer"], reasoning_chain=chain,
                      latent_steps=len(chain), split=assign_split(case["group"], args, case.get("folder_split")))
        if sample["question_type"] != "caption":  # every split (train.py --options-rate, evaluate.py); the
            # sample's own RNG, drawn last: test items keep the choices they had when only they got them
            record["choices"], record["answer_index"] = closed_form(sample, facts, case, sample["rng"])
        record["meta"] = dict(case["meta"], negative=sample["negative"], facts=facts, teacher=args.teacher,
                              gate_retries=history, present_target=case["target"])
        outcomes.append(("sample", record))
    return outcomes


# ----------------------------------------------------------------------------- resumable output files
def load_decided(path):
    """Records (and their ids) already in a JSONL file. A half-written last line (a killed run) is cut
    off; a broken line anywhere else is an error naming the file and line."""
    if not os.path.exists(path):
        return [], set()
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    records, good_bytes = [], 0
    for i, line in enumerate(lines):
        if line.strip():
            try:
                rec = strict_loads(line)
                if not isinstance(rec, dict) or "id" not in rec:
                    raise ValueError("not a JSON object with an 'id'")
                if i == len(lines) - 1:
                    raise ValueError("no final newline")  # the writer always ends a record with \n
            except ValueError as e:
                if i < len(lines) - 1:  # a complete line (it has its newline): not a killed write
                    raise SystemExit(f"prepare_data.py: error: {path} line {i + 1} is not valid strict JSON "
                                     f"({e}); fix or remove it")
                print(f"{path}: cutting a half-written last line ({len(line)} bytes) left by an "
                      "interrupted run")
                with open(path, "r+b") as fh:
                    fh.truncate(good_bytes)
                break
            records.append(rec)
        good_bytes += len(line) + 1
    return records, {r["id"] for r in records}


def compute_stats(out_dir):
    """Counts over everything in the output folder (all runs appended into it)."""
    samples, _ = load_decided(os.path.join(out_dir, "samples.jsonl"))
    rejects, _ = load_decided(os.path.join(out_dir, "rejects.jsonl"))

    def count(key):
        return dict(sorted(Counter(str(key(s)) for s in samples).items()))
    all_reasons = [x for r in rejects for x in r["reasons"]]
    retried = [x for s in samples for x in s.get("meta", {}).get("gate_retries", [])]
    # leakage hits: forbidden terms seen in any attempt, rejected or later fixed by a retry
    leaks = [x.split("'")[1] for x in all_reasons + retried if x.startswith("leak")]
    return {"samples": len(samples), "rejects": len(rejects), "by_source": count(lambda s: s["source"]),
            "by_subset": count(lambda s: s["subset"]), "by_modality": count(lambda s: s["modality"]),
            "by_question_type": count(lambda s: s["question_type"]),
            "by_K": count(lambda s: s["latent_steps"]), "by_split": count(lambda s: s["split"]),
            "split_by_subset_and_type": count(lambda s: f"{s['subset']}/{s['question_type']}/{s['split']}"),
            "yesno_negative": sum(s["question_type"] == "yesno" and s["meta"]["negative"] for s in samples),
            "rejects_by_reason": dict(Counter(x.split(":")[0] for x in all_reasons)),
            "leakage_hits": dict(Counter(leaks)),
            "samples_accepted_after_retry": sum(1 for s in samples if s.get("meta", {}).get("gate_retries"))}


# ----------------------------------------------------------------------------- command line
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- what to read and where to write
    p.add_argument("--source", choices=["phantom", "msd", "biomedparse"], default="phantom",
                   help="which source this run reads")
    p.add_argument("--out", required=True, help="output folder; runs with other sources append into it")
    p.add_argument("--msd-root", nargs="+", default=[], help="MSD task folders (each with dataset.json)")
    p.add_argument("--msd-stride", type=int, default=4,
                   help="keep every n-th axial slice (keeps the count reasonable)")
    p.add_argument("--msd-channels", default="all", help="4-D volumes: 'all' channels or a list like '0,2'")
    p.add_argument("--bmp-root", nargs="+", default=[],
                   help="BiomedParse subset folders (each with train/, train_mask/, ...)")
    # --- phantom generator
    p.add_argument("--n", type=int, default=2000, help="number of phantom images")
    p.add_argument("--seed", type=int, default=0,
                   help="phantom seed (part of the ids: other seeds append new samples)")
    p.add_argument("--image-size", type=int, default=128, help="phantom image side in pixels")
    # --- questions and splits
    p.add_argument("--questions-per-image", type=int, default=1, choices=range(1, 7),
                   help="question types per (image, target)")
    p.add_argument("--types", nargs="+", choices=QUESTION_TYPES, default=None,
                   help="ask only these question types (rotated like the six; default: all six)")
    p.add_argument("--captions", action="store_true",
                   help="instead of the six VITAL question types, one target-free caption per image: the "
                        "corpus on which train.py --pretrain teaches a random tiny backbone to see (use "
                        "another --seed and --out than the VITAL data)")
    p.add_argument("--val-frac", type=float, default=0.05, help="fraction of groups in the val split")
    p.add_argument("--test-frac", type=float, default=0.15, help="fraction of groups in the test split")
    # --- teacher and gate
    p.add_argument("--teacher", choices=["geometry", "openai"], default="geometry",
                   help="who writes answers and chains")
    p.add_argument("--max-retries", type=int, default=4,
                   help="gate retries before a sample is rejected (§A.3)")
    p.add_argument("--base-url", default="https://api.openai.com/v1", help="OpenAI-compatible endpoint")
    p.add_argument("--teacher-model", default="gpt-5.4", help="model name sent to the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable that holds the API key")
    p.add_argument("--timeout", type=float, default=120, help="seconds per HTTP request")
    p.add_argument("--http-retries", type=int, default=6, help="retries on 429/5xx/network errors")
    p.add_argument("--backoff-base", type=float, default=2.0,
                   help="first backoff delay in seconds (doubles each retry)")
    p.add_argument("--backoff-max", type=float, default=60.0, help="longest single backoff delay in seconds")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="processes (geometry) or concurrent requests (openai)")
    args = p.parse_args(argv)
    roots = {"msd": args.msd_root, "biomedparse": args.bmp_root}.get(args.source, [])
    if args.source != "phantom" and not roots:
        p.error(f"--source {args.source} needs --{'msd' if args.source == 'msd' else 'bmp'}-root")
    for r in roots:
        if not os.path.isdir(r):
            p.error(f"{r} is not a folder")
    check_numbers(p, args)
    return args


def check_numbers(p, args):
    """Out-of-range numbers and malformed values are one-line argparse errors, not a crash mid-run
    (comparisons with NaN are False, so NaN fails every check too)."""
    wants = [("--n", args.n >= 1, ">= 1"), ("--msd-stride", args.msd_stride >= 1, ">= 1"),
             ("--image-size", args.image_size >= 32, ">= 32"), ("--workers", args.workers >= 1, ">= 1"),
             ("--max-retries", args.max_retries >= 0, ">= 0"), ("--http-retries", args.http_retries >= 0, ">= 0"),
             ("--timeout", args.timeout > 0, "> 0"), ("--backoff-base", 0 <= args.backoff_base <= 3600, "0..3600"),
             ("--backoff-max", 0 <= args.backoff_max <= 3600, "0..3600"),
             ("--val-frac", 0 <= args.val_frac <= 1, "in [0, 1]"), ("--test-frac", 0 <= args.test_frac <= 1,
                                                                   "in [0, 1]"),
             ("--val-frac + --test-frac", args.val_frac + args.test_frac <= 1, "<= 1"),
             ("--msd-channels", re.fullmatch(r"all|\d+(,\d+)*", args.msd_channels), "'all' or a list like 0,2"),
             ("--base-url", re.match(r"https?://[^/\s]", args.base_url), "an http:// or https:// URL")]
    for flag, ok, need in wants:
        if not ok:
            p.error(f"{flag} must be {need}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a folder")


def make_work(args):
    """The list of work items: one per phantom index, MSD volume or BiomedParse image."""
    if args.source == "phantom":
        return [("phantom", i) for i in range(args.n)]
    if args.source == "msd":
        return [("msd", root, img, lab) for root in args.msd_root for img, lab in read_msd_task(root)[2]]
    work = [w for root in args.bmp_root for w in bmp_work(root)]
    targets = {}  # every target name of a subset: the pool for negative yes/no questions
    for w in work:
        targets.setdefault(w[2], set()).update(t for _, t in ([] if isinstance(w[6], str) else w[6]))
    args.bmp_targets = {k: sorted(v) for k, v in targets.items()}
    return work


def main(argv=None):
    args = get_args(argv)
    if args.teacher == "openai" and not os.environ.get(args.api_key_env, "").strip():
        raise SystemExit(f"prepare_data.py: error: --teacher openai reads its key from ${args.api_key_env}, "
                         "which is not set (a server without keys takes any value, e.g. EMPTY)")
    try:
        for sub in ("images", "masks", "overlays"):
            os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    except OSError as e:
        raise SystemExit(f"prepare_data.py: error: cannot write into --out {args.out} ({e})")
    sample_path, reject_path = (os.path.join(args.out, name) for name in ("samples.jsonl", "rejects.jsonl"))
    decided = load_decided(sample_path)[1] | load_decided(reject_path)[1]
    work = make_work(args)
    counts, stopped = {"sample": 0, "reject": 0}, ""
    init_worker(args, decided)
    # threads for network-bound teachers; processes for the CPU-bound geometry teacher (imap keeps order)
    pool = ThreadPool(args.workers) if args.teacher == "openai" else \
        Pool(args.workers, init_worker, (args, decided)) if args.workers > 1 else None
    results = pool.imap_unordered(process, work) if args.teacher == "openai" else \
        pool.imap(process, work, chunksize=16) if pool else map(process, work)
    with open(sample_path, "a") as fs, open(reject_path, "a") as fr:
        bar = tqdm(results, total=len(work), desc=f"{args.source}/{args.teacher}", unit="item")
        for outcomes in bar:  # after a stop the remaining items return nothing: the loop drains fast
            for kind, record in outcomes:
                if kind == "stop":
                    stopped = stopped or record["reason"]
                    continue
                counts[kind] += 1
                fh = fs if kind == "sample" else fr
                fh.write(strict_json(record) + "\n")
                fh.flush()  # a killed run keeps every line written so far
            bar.set_postfix(accepted=counts["sample"], rejected=counts["reject"], refresh=False)
    if pool:
        pool.close()
        pool.join()
    stats = compute_stats(args.out)
    stats["last_run"] = {"skipped_already_decided": len(decided), **counts, "stopped": stopped or None}
    write_strict_json(stats, os.path.join(args.out, "stats.json"))
    kept = f"{counts['sample']} accepted and {counts['reject']} rejected in this run are kept in {args.out}"
    if stopped:  # one line, non-zero exit; the rerun skips every decided id
        raise SystemExit(f"prepare_data.py: error: {stopped}; stopped: {kept}; rerun the same command to "
                         "continue")
    if counts["reject"] and not stats["samples"]:
        top = Counter(x for r in load_decided(reject_path)[0] for x in r["reasons"][:1]).most_common(1)[0][0]
        raise SystemExit(f"prepare_data.py: error: no sample accepted, {counts['reject']} rejected (first "
                         f"reason: {top}); every reason is in {reject_path}")
    print(f"this run: {counts['sample']} accepted, {counts['reject']} rejected, {len(decided)} already decided")
    for key in ("samples", "rejects", "by_source", "by_subset", "by_modality", "by_question_type", "by_K",
                "by_split", "yesno_negative", "rejects_by_reason", "leakage_hits"):
        print(f"  {key}: {stats[key]}")
    return stats


if __name__ == "__main__":
    main()
