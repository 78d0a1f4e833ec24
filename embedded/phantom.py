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


# ----------------------------------------------------------------------------------------------------
# The walk: a question that needs several passes. Nine lesions sit on a 3 x 3 grid (one per merged visual
# token of a 96-px image), each darker or brighter than its surroundings. The question states a start cell
# and a rule: a darker lesion sends you one cell to the right, a brighter one one cell down, wrapping round
# at the edges. Each move reads the lesion it stands on, so move k depends on where moves 1..k-1 led: a
# pointer chase of `hops` data-dependent steps, which a 2-layer LLM cannot unroll in one pass.
# ----------------------------------------------------------------------------------------------------
ROWS, COLS = ("upper", "middle", "lower"), ("left", "middle", "right")
CELLS = [(r, c) for r in range(3) for c in range(3)]


def cell_name(cell):
    """(row, column) -> 'upper left', 'middle right', ..., 'center'."""
    r, c = cell
    return "center" if cell == (1, 1) else f"{ROWS[r]} {COLS[c]}"


def walk(grid, start, hops):
    """The cells visited from `start` over `hops` moves: [start, cell after move 1, ...]. grid[r][c] is
    'darker' or 'brighter'."""
    path = [start]
    for _ in range(hops):
        r, c = path[-1]
        path.append((r, (c + 1) % 3) if grid[r][c] == "darker" else ((r + 1) % 3, c))
    return path


def coded_lesion(r, c, cx, cy, xx, yy):
    """A lesion whose look names its cell: the row sets its size (upper small, middle medium, lower large), the
    column its shape (left round, middle elongated across, right lobulated)."""
    rad = (0.05, 0.07, 0.09)[r]
    u, w = xx - cx, yy - cy
    if c == 0:
        return u ** 2 + w ** 2 <= rad ** 2
    if c == 1:
        return (u / (1.5 * rad)) ** 2 + (w / (0.55 * rad)) ** 2 <= 1
    return np.hypot(u, w) <= rad * (1 + 0.35 * np.cos(4 * np.arctan2(w, u)))


def draw_lesions(img, rng, xx, yy, grid, radius, empty=(), shape=None):
    """Nine round lesions, one well inside each cell of the 3 x 3 grid (one merged visual token sees one lesion),
    each 0.3 darker or brighter (grid[r][c]) than the mean of what it covers; radius(r, c) -> the range its radius
    is drawn from. A cell in `empty` is drawn (the RNG moves on) but left out; shape(r, c, cx, cy, xx, yy), when
    given, replaces the disc. -> (image, {cell: mask})."""
    masks = {}
    for r, c in CELLS:
        cx, cy = (c + 0.5 + rng.uniform(-0.06, 0.06)) / 3, (r + 0.5 + rng.uniform(-0.06, 0.06)) / 3
        m = (xx - cx) ** 2 + (yy - cy) ** 2 <= rng.uniform(*radius(r, c)) ** 2
        m = shape(r, c, cx, cy, xx, yy) if shape else m
        if (r, c) in empty:
            continue
        value = np.clip(img[m].mean(axis=0) + (0.3 if grid[r][c] == "brighter" else -0.3), 0.02, 0.98)
        img = np.where(m[..., None] if img.ndim == 3 else m, value, img)
        masks[(r, c)] = m
    return img, masks


def finish(img, modality, rng, size):
    """The speckle of an ultrasound and every image's pixel noise, drawn after the lesions."""
    if modality == "ultrasound":
        img = img * (1 + 0.15 * gaussian_blur(rng.normal(0, 1, (size, size)), 0.7))
    return img + rng.normal(0, 0.015, img.shape)


def phantom_walk_case(index, seed, size, max_hops, lesions=9, coded=False, fixed_start=None):
    """One walk image: nine round lesions on a 3 x 3 grid, each drawn darker or brighter at random, a start
    cell and a number of moves (1..max_hops) drawn from the same seeded RNG; the case's mask is the lesion
    the walk ends on (the answer), the visited cells are in meta and step_masks holds the lesion each move
    lands on (move k -> step k's own visual target; the last is the case's mask). lesions < 9 leaves cells
    empty (never one the walk visits): fewer distractors, for a curriculum of the cell question. fixed_start (a cell name): every
    walk starts there (the first move then reads a fixed cell; the images are those of a random start)."""
    rng = np.random.default_rng([seed, index, 1])  # a stream of its own: not phantom_case's
    modality = sorted(PHANTOM_TARGETS)[rng.integers(len(PHANTOM_TARGETS))]
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    img = phantom_background(modality, rng, xx, yy)
    grid = [["brighter" if b else "darker" for b in row] for row in rng.random((3, 3)) < 0.5]
    start, hops = CELLS[rng.integers(len(CELLS))], int(rng.integers(1, max_hops + 1))
    start = start if fixed_start is None else next(c for c in CELLS if cell_name(c) == fixed_start)
    path = walk(grid, start, hops)
    others = [cell for cell in CELLS if cell not in path]
    empty = set(map(tuple, np.random.default_rng([seed, index, 2]).permutation(others)[:max(0, 9 - lesions)]))
    img, masks = draw_lesions(img, rng, xx, yy, grid, lambda r, c: (0.075, 0.09), empty,
                              coded_lesion if coded else None)
    img = finish(img, modality, rng, size)
    key = f"phantom-walk-s{seed}-{index:06d}"
    drawn = {"grid": grid, "start": cell_name(start), "hops": hops, "path": [cell_name(p) for p in path],
             "empty": sorted(cell_name(e) for e in empty)}
    return {"image_key": key, "group": key, "source": "phantom", "subset": f"phantom-walk-{slug(modality)}",
            "modality": modality, "target": "lesion", "target_type": "lesion", "image": to_uint8(img),
            "mask": masks[path[-1]], "step_masks": [masks[p] for p in path[1:]], "others": [], "order": index,
            "meta": {"drawn": drawn}}


# ----------------------------------------------------------------------------------------------------
# The order question: a state machine that does not commute (issue 25). Three numbers stand in the order 1, 2,
# 3; the nine lesions are read row by row from the upper left cell, and each changes the order by its look: a
# small darker lesion sends the first number to the end, a large darker one swaps the first two, a small
# brighter one the last two, a large brighter one the first and the last. The answer is the order after the
# first `hops` lesions. Every step reads a fixed cell, but what it does depends on the order the steps before it
# left, and the four moves generate all six orders (S3): no sum, count or pairwise product of the findings
# gives the answer past a few lesions (demo/task_leaks.py --task s3).
# ----------------------------------------------------------------------------------------------------
LOOKS = [("small", "darker"), ("large", "darker"), ("small", "brighter"), ("large", "brighter")]
S3_MOVES = [(1, 2, 0), (1, 0, 2), (0, 2, 1), (2, 1, 0)]  # by look: new order = old order at these places
S3_SAYS = ["the first number goes to the end", "the first two numbers swap", "the last two numbers swap",
           "the first and last numbers swap"]


def reorder(order, look):
    """order: '123'-like string; look: one of LOOKS -> the order after that lesion is read."""
    return "".join(order[i] for i in S3_MOVES[LOOKS.index(look)])


def phantom_order_case(index, seed, size, max_hops):
    """One order image: nine lesions on a 3 x 3 grid, each small or large and darker or brighter at random, and a
    number of lesions to read (1..max_hops), from a seeded RNG. The case's mask is the last lesion read;
    step_masks holds lesion k for step k, cell_masks every lesion by cell name. meta.drawn: grid (brightness),
    sizes, hops, path (the order before and after each lesion read: path[0] = '123'), read (the cells read) and
    look_cell (the cell the one-lesion 'look' question asks about, any of the nine)."""
    rng = np.random.default_rng([seed, index, 3])  # a stream of its own: not the walk's
    modality = sorted(PHANTOM_TARGETS)[rng.integers(len(PHANTOM_TARGETS))]
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    img = phantom_background(modality, rng, xx, yy)
    grid = [["brighter" if b else "darker" for b in row] for row in rng.random((3, 3)) < 0.5]
    sizes = [["large" if b else "small" for b in row] for row in rng.random((3, 3)) < 0.5]
    hops, look_cell = int(rng.integers(1, max_hops + 1)), CELLS[rng.integers(len(CELLS))]
    # sizes far apart (radius 3.4-3.8 px against 9.1-9.6 px at 96 px): with 4.3-5.3 against 8.6-9.6 px the stand-in
    # learnt brightness and never size (docs/tuning-log.md)
    img, masks = draw_lesions(img, rng, xx, yy, grid,
                              lambda r, c: (0.095, 0.1) if sizes[r][c] == "large" else (0.035, 0.04))
    img = finish(img, modality, rng, size)
    read, path = CELLS[:hops], ["123"]
    for r, c in read:
        path.append(reorder(path[-1], (sizes[r][c], grid[r][c])))
    key = f"phantom-order-s{seed}-{index:06d}"
    drawn = {"grid": grid, "sizes": sizes, "hops": hops, "path": path, "read": [cell_name(c) for c in read],
             "look_cell": cell_name(look_cell)}
    return {"image_key": key, "group": key, "source": "phantom", "subset": f"phantom-order-{slug(modality)}",
            "modality": modality, "target": "lesion", "target_type": "lesion", "image": to_uint8(img),
            "mask": masks[read[-1]], "step_masks": [masks[c] for c in read], "others": [], "order": index,
            "cell_masks": {cell_name(c): m for c, m in masks.items()}, "meta": {"drawn": drawn}}
