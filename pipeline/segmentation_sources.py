"""
The two segmentation sources of §A.1 that stage 1 (prepare_data.py) reads besides the phantom: Medical
Segmentation Decathlon task folders (dataset.json + NIfTI volumes) and BiomedParse folders (train/,
train_mask/, test/, test_mask/ with *.png). Each reader turns one work item into cases, the dicts that
embedded/phantom.py's phantom_case makes too (image_key, group, source, subset, modality, target, target_type,
image, mask, others, order, meta), or into rejects ({"id", "reasons"}) that name the bad file and say what is
wrong. A source that cannot be read at all stops the run with one "prepare_data.py: error:" line.

  read_msd_task, msd_cases    MSD: the task's dataset.json; the slices of one volume with >= 100 target pixels
  bmp_work, bmp_cases         BiomedParse: one work item per image file; the (image, mask) cases of one image
"""
import json
import os
import re

import numpy as np
from PIL import Image

from pipeline.image_facts import target_problem
from pipeline.io import slug, to_uint8

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
