"""
What the raw pixels show about one target mask, for stage 1 (prepare_data.py): every word the geometry teacher
writes, and the quality gate's spatial check, come from measure() here.

  dilate, erode     binary morphology with a 3x3 square (numpy only: no scipy dependency)
  overlay_view      the teacher-only view of §A.2: the mask as a red layer, its boundary as a yellow contour
  target_problem    why a mask cannot be described (empty, too small, too large, no surroundings): a reject reason
  share_words       the target's share of the image in words that agree with the measured area
  measure           position, extent, shape, boundary and brightness of the target, as numbers and words
"""
import numpy as np


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


def overlay_view(image, mask):
    """Teacher-only view (§A.2): mask as red layer with alpha 0.4, boundary as a yellow contour."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    out = rgb.astype(np.float32)
    out[mask] = 0.6 * out[mask] + 0.4 * np.array([255, 0, 0], np.float32)
    out[mask & ~erode(mask)] = (255, 255, 0)
    return out.astype(np.uint8)


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
