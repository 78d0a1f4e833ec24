"""
The inputs of the training stage (train.py), read and checked: the five-tuples of samples.jsonl (written by
prepare_data.py), their L_vis targets in roi.safetensors (extract_roi.py), aligned with the records, and the
visual tokens of each record's image (its header only). Every problem is one `error` (the caller's own error
class) naming the file, line and field.
"""
import json
import os

import torch
from PIL import Image
from safetensors import safe_open

from pipeline.io import InputError, choices_problem

# the fields every record needs, and their types (prepare_data.py writes more)
REQUIRED = {"id": str, "image": str, "question": str, "answer": str, "reasoning_chain": list,
            "latent_steps": int, "split": str}


def read_samples(path, error=InputError):
    """All records of a samples.jsonl, validated; each gets `line` and an absolute `image_path`."""
    if not os.path.isfile(path):
        raise error(f"{path}: no such file (run prepare_data.py first)")
    records, seen = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(r, dict):
                raise error(f"{path} line {n}: expected a JSON object, got {type(r).__name__}")
            for field, typ in REQUIRED.items():
                if field not in r:
                    raise error(f"{path} line {n}: missing field '{field}'")
                if not isinstance(r[field], typ) or (typ is int and isinstance(r[field], bool)):
                    raise error(f"{path} line {n}: field '{field}' should be {typ.__name__}, "
                                f"got {type(r[field]).__name__}")
            problem = choices_problem(r)
            if problem:
                raise error(f"{path} line {n}: {problem}")
            if r["latent_steps"] != len(r["reasoning_chain"]):
                raise error(f"{path} line {n}: latent_steps = {r['latent_steps']} "
                            f"but reasoning_chain has {len(r['reasoning_chain'])} steps")
            if r["id"] in seen:
                raise error(f"{path} line {n}: id '{r['id']}' already used on line {seen[r['id']]}")
            seen[r["id"]] = n
            r["line"] = n
            r["image_path"] = os.path.join(os.path.dirname(os.path.abspath(path)), r["image"])
            records.append(r)
    return records


def read_roi(path, records, target="shared", error=InputError):
    """L_vis targets in the order of `records` -> (roi, glob, the file's metadata: which encoder made them,
    explain.py re-attaches it); lists ids without a feature. target (train.py --visual-target): shared -> roi
    (N, d_v), glob None; per_step -> glob (N, d_v) too; hop -> roi (N, S, d_v), step k's own target
    (extract_roi.py's roi_steps, from the walk's step_masks)."""
    need_global = target == "per_step"
    if not os.path.isfile(path):
        raise error(f"{path}: no such file (run extract_roi.py first, or train with --lambda-vis 0)")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if "ids" not in meta:
            raise error(f"{path}: metadata has no 'ids' list (row order of the features)")
        ids = json.loads(meta["ids"])
        names = set(f.keys())
        wanted = "roi_steps" if target == "hop" else "roi"
        for name in [wanted] + (["global"] if need_global else []):
            if name not in names:
                why = {"global": " (needed by --visual-target per_step)",
                       "roi_steps": " (needed by --visual-target hop: only samples with step_masks, the walk's, "
                                    "have a target per hop)"}.get(name, "")
                raise error(f"{path}: no tensor '{name}'{why}")
        roi = f.get_tensor(wanted).float()
        glob = f.get_tensor("global").float() if need_global else None
    if roi.ndim != (3 if target == "hop" else 2) or roi.shape[0] != len(ids):
        raise error(f"{path}: '{wanted}' has shape {tuple(roi.shape)} but metadata lists {len(ids)} ids")
    row = {i: n for n, i in enumerate(ids)}
    missing = [r["id"] for r in records if r["id"] not in row]
    if missing:
        raise error(f"{path}: {len(missing)} training samples have no ROI feature: {missing[:20]}"
                    + (" ..." if len(missing) > 20 else "")
                    + " (re-run extract_roi.py, or --lambda-vis 0)")
    rows = torch.tensor([row[r["id"]] for r in records])
    roi, glob = roi[rows], (glob[rows] if glob is not None else None)
    bad = [records[i]["id"] for i in range(len(records)) if not torch.isfinite(roi[i]).all()]
    if bad:
        raise error(f"{path}: non-finite ROI features for {bad[:20]}")
    return roi, glob, meta


def image_tokens(records, processor, error=InputError):
    """Visual tokens of each record's image after the processor's resize (pixel cap included): the part of
    the prefix length that varies from sample to sample (the question adds a few dozen tokens). Reads only
    the image headers."""
    ip = processor.image_processor
    out = []
    for r in records:
        try:
            with Image.open(r["image_path"]) as im:
                w, h = im.size
        except Exception as e:  # not an image, unknown format, decompression bomb
            raise error(f"samples.jsonl line {r.get('line')}: image '{r['image_path']}' cannot be read "
                        f"({type(e).__name__}: {e})") from None
        out.append(ip.get_number_of_image_patches(h, w, {}) // ip.merge_size ** 2)
    return out
