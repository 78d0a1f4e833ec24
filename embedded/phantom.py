"""
Phantom images for stage 1 (prepare_data.py --source phantom): the embedded default data set, a fixture
like embedded/tiny.py, not part of the method.

Procedural images of five modalities (CT, X-ray, dermoscopy, fundus, ultrasound), each with one target
and its exact mask; every attribute (modality, target, position, size, shape, boundary, brightness) is
drawn from an RNG seeded by (seed, index), so a case is the same in every process and every run. It needs
no download and stands in for the segmentation sources of the paper's §A.1 (MSD, BiomedParse), which
prepare_data.py reads with --source msd / biomedparse (pipeline/segmentation_sources.py). A case is the same dict
those readers make (image_key, group, source, subset, modality, target, target_type, image, mask, others, order,
meta).
"""
import numpy as np
from PIL import Image

from pipeline.io import slug, to_uint8


def gaussian_blur(a, sigma):
    """Separable Gaussian blur of a 2-D float array (numpy only, like image_facts.dilate)."""
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(a, r, mode="edge")
    rows = sum(w * p[i:i + a.shape[0], :] for i, w in enumerate(k))  # (H, W+2r)
    return sum(w * rows[:, i:i + a.shape[1]] for i, w in enumerate(k))  # (H, W)


# each phantom modality has up to three targets that differ in shape, so the pixels tell them apart;
# location, size, boundary and brightness vary freely and are what describe/reasoning ask about
PHANTOM_TARGETS = {
    "CT": [("kidney", "organ", "round"), ("hepatic vessel", "vessel", "elongated"),
           ("liver tumor", "tumor", "irregular")],
    "X-ray": [("heart", "organ", "round"), ("pulmonary vessel", "vessel", "elongated"),
              ("lung opacity", "lesion", "irregular")],
    "dermoscopy": [("nevus", "lesion", "round"), ("melanoma", "tumor", "irregular")],
    "fundus": [("optic disc", "retina", "round"), ("retinal vessel", "vessel", "elongated"),
               ("exudate", "lesion", "irregular")],
    "ultrasound": [("cyst", "lesion", "round"), ("blood vessel", "vessel", "elongated"),
                   ("breast tumor", "tumor", "irregular")],
}


def phantom_background(modality, rng, xx, yy):
    """A modality 'look' in [0,1], kept within 0.3..0.7 so a target can be clearly brighter or darker."""
    S = xx.shape[0]
    # slow tissue variation: 6x6 random values smoothly upsampled (much cheaper than a wide blur)
    smooth = np.asarray(Image.fromarray(rng.normal(0, 1, (6, 6)).astype(np.float32), "F")
                        .resize((S, S), Image.BICUBIC), dtype=np.float64) * 0.5
    if modality == "CT":  # body ellipse of soft tissue on a darker surround
        body = ((xx - 0.5) / 0.47) ** 2 + ((yy - 0.5) / 0.42) ** 2 < 1
        return 0.33 + 0.17 * gaussian_blur(body.astype(float), 1.5) + 0.02 * smooth
    if modality == "X-ray":  # bright mediastinum in the middle, faint horizontal rib bands
        return 0.4 + 0.15 * np.exp(-((xx - 0.5) / 0.12) ** 2) + 0.04 * np.sin(yy * 40 + rng.uniform(0, 6))
    if modality == "ultrasound":  # echo texture fading with depth, speckle added after the target
        return 0.58 - 0.18 * yy + 0.03 * smooth
    tint = np.array([0.72, 0.5, 0.42]) if modality == "dermoscopy" else np.array([0.78, 0.38, 0.18])
    shade = 1 + 0.05 * smooth
    if modality == "fundus":  # the round retina with darker periphery
        shade = shade - 0.35 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.5)
    return tint * shade[..., None]


def phantom_shape(shape, large, cx, cy, rng, xx, yy):
    """Exact binary mask of one target; shrunk until it fits inside the image (a cut shape would
    no longer be the shape we claim)."""
    if shape == "round":
        r, q = (rng.uniform(0.13, 0.16) if large else rng.uniform(0.055, 0.07)), rng.uniform(1.0, 1.3)
        a, b = r * np.sqrt(q), r / np.sqrt(q)
    elif shape == "elongated":
        a = rng.uniform(0.22, 0.26) if large else rng.uniform(0.12, 0.14)
        b = a / (rng.uniform(3.0, 3.6) if large else rng.uniform(3.5, 4.5))
    else:  # irregular: lobulated outline r(phi) = R (1 + A cos(k phi) + ...)
        R, k, A = (rng.uniform(0.13, 0.15) if large else rng.uniform(0.065, 0.08)), rng.integers(3, 6), 0.4
        wobble = rng.uniform(0, 6)
    for attempt in range(40):  # a new angle each time, and 2% smaller, until it fits
        scale, angle = 0.98 ** attempt, rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / scale
        w = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / scale
        if shape == "irregular":
            phi = np.arctan2(w, u)
            m = np.hypot(u, w) <= R * (1 + A * np.cos(k * phi) + 0.15 * np.cos((k + 2) * phi + wobble))
        else:
            m = (u / a) ** 2 + (w / b) ** 2 <= 1
        if not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()):
            break
    return m


def phantom_case(index, seed, size):
    """One phantom image with one target whose every attribute is drawn from a seeded RNG."""
    rng = np.random.default_rng([seed, index])
    modality = sorted(PHANTOM_TARGETS)[rng.integers(len(PHANTOM_TARGETS))]
    target, target_type, shape = PHANTOM_TARGETS[modality][rng.integers(len(PHANTOM_TARGETS[modality]))]
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    bg = phantom_background(modality, rng, xx, yy)
    cx, cy = (rng.choice([0.2, 0.5, 0.8]) + rng.uniform(-0.03, 0.03) for _ in range(2))
    large, sharp, brighter = rng.random(3) < 0.5
    mask = phantom_shape(shape, large, cx, cy, rng, xx, yy)
    r_px = np.sqrt(mask.sum() / np.pi)  # a blurred edge spreads over about a third of the radius
    alpha = mask.astype(float) if sharp else gaussian_blur(mask.astype(float), max(2.0, 0.35 * r_px))
    local = bg[mask].mean(axis=0)  # the target is 0.3 brighter or darker than what it sits on
    value = np.clip(local + (0.3 if brighter else -0.3), 0.02, 0.98)
    a = alpha if bg.ndim == 2 else alpha[..., None]
    img = bg * (1 - a) + value * a
    if modality == "ultrasound":  # multiplicative speckle over tissue and target alike
        img = img * (1 + 0.15 * gaussian_blur(rng.normal(0, 1, (size, size)), 0.7))
    img = img + rng.normal(0, 0.015, img.shape)
    others = [(t, tt) for t, tt, _ in PHANTOM_TARGETS[modality] if t != target]
    key = f"phantom-s{seed}-{index:06d}"
    drawn = {"center": [round(float(cx), 3), round(float(cy), 3)], "shape": shape,
             "size": "large" if large else "small", "boundary": "sharp" if sharp else "blurred",
             "brightness": "brighter" if brighter else "darker"}
    return {"image_key": key, "group": key, "source": "phantom", "subset": f"phantom-{slug(modality)}",
            "modality": modality, "target": target, "target_type": target_type, "image": to_uint8(img),
            "mask": mask, "others": others, "order": index, "meta": {"drawn": drawn}}
