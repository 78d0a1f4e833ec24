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
location|describe|reasoning; caption with --captions; walk|cell and order|look on the phantom's grids),
`answer`, `reasoning_chain` (the K step sentences), `latent_steps` (= K), `split` (train|val|test), the
closed-ended form `choices` + `answer_index` (§B.4; every item but captions, in every split), and `meta`
(everything else: the measured facts, negative, gate retries, where the image came from). A walk or order item
also has `step_masks`: one mask path per chain step, the lesion that move lands on or that step reads (step k's
own L_vis target with train.py --visual-target hop; the last is `mask`). An order chain has one step per lesion
read, and its answer leads with the order's first number (embedded/grid_questions.order_answer says why).

Teachers: `geometry` (default) writes chains from the mask and the pixels (offline, leak-free by
construction); `openai` asks any OpenAI-compatible chat-completions endpoint with the prompt of §A.2.
Every sample goes through the same quality gate whatever the teacher. Every decided sample is appended
and flushed as soon as it is done, so a killed run loses only the samples in flight (for MSD: the volume
in flight); rerunning the same command skips decided ids.

The file reads top to bottom as the flow: the sources give (image, target mask) cases (the phantom:
embedded/phantom.py; MSD, BiomedParse: pipeline/segmentation_sources.py), pipeline/image_facts.py's measure
turns a mask into facts, the questions are asked here, a teacher answers (the geometry teacher here, the
OpenAI-compatible one in pipeline/llm_teacher.py), pipeline/quality_gate.py checks every answer (and holds
Table 4's question types and K), and the records are written here.

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
  python prepare_data.py --source phantom --out data/walk --n 3000 --image-size 96 --walk-hops 4  # the walk:
      # nine lesions on a 3 x 3 grid, 1..4 moves (one step each); add --types cell for "is the lesion in the
      # <cell> cell darker or brighter?" (one hop's perception) or --types walk cell for both; --walk-start
      # 'upper left' starts every walk there (the variant whose hops the tiny backbone reads: tuning log)
  python prepare_data.py --source phantom --out data/order --n 6000 --image-size 96 --order-hops 6  # the order:
      # three numbers, reordered by each of the first 1..6 lesions read row by row (its size and brightness say
      # how); --types look asks one lesion's size and brightness (--look-cells all: each of the nine), --types
      # order look both; --order-question bare asks it without stating the rule
  python prepare_data.py --source msd --msd-root /data/Task03_Liver /data/Task06_Lung --out data/vital
  python prepare_data.py --source biomedparse --bmp-root /data/BiomedParse/ISIC --out data/vital
  python prepare_data.py --source biomedparse --bmp-root /data/BiomedParse --out data/vital  # all subsets
  OPENAI_API_KEY=... python prepare_data.py --source phantom --out data/p --n 50 --teacher openai \
      --base-url https://api.openai.com/v1 --teacher-model gpt-5.4 --workers 8
"""
import argparse
import hashlib
import json
import os
import random
import re
from collections import Counter
from multiprocessing import Pool
from multiprocessing.pool import ThreadPool

import numpy as np
from PIL import Image
from tqdm import tqdm

# the sources: the phantom (and its walk grids), then MSD and BiomedParse (§A.1)
from embedded import grid_questions as G
from embedded.phantom import CELLS, cell_name, phantom_case, phantom_order_case, phantom_walk_case
from pipeline.image_facts import measure, overlay_view, share_words  # what the pixels show about a target
from pipeline.io import slug, strict_json, strict_loads, write_strict_json
from pipeline.llm_teacher import RequestRefused, TeacherUnavailable, openai_teacher  # §A.2
from pipeline.quality_gate import QUESTION_TYPES, STEP_RANGE, article, gate  # Table 4 and the gate (§A.3)
from pipeline.segmentation_sources import bmp_cases, bmp_work, msd_cases, read_msd_task

# ----------------------------------------------------------------------------- questions (§A.1, Table 4)
GRID_TYPES = ["walk", "cell"]  # the questions of a walk grid (--walk-hops): the walk, one cell's brightness
ORDER_TYPES = ["order", "look"]  # of an order grid (--order-hops): the order, one cell's size and brightness


def stable_hash(text):
    """A hash that is the same in every process and every run (Python's hash() is salted)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


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
    # the walk (embedded/phantom.py, --walk-hops): the rule is stated, the moves must be followed in the image
    "walk": {"*": ["Start at the lesion in the {start} cell of this {mp}. A darker lesion sends you one cell to "
                   "the right, a brighter one one cell down, wrapping round at the edges. After {hops} moves, "
                   "which cell are you in?"]},
    "cell": {"*": ["Is the lesion in the {cell} cell of this {mp} darker or brighter than its surroundings?"]},
    # the order (embedded/phantom.py, --order-hops): a stated state machine over the lesions in reading order
    "order": {"*": ["Three numbers stand in the order 1, 2, 3. Read the lesions of this {mp} row by row, from the "
                    "upper left cell. A small darker lesion sends the first number to the end, a large darker one "
                    "swaps the first two numbers, a small brighter one swaps the last two, and a large brighter one "
                    "swaps the first and the last. After {hops} lesions, in what order do the numbers stand?"]},
    # --order-question bare: the rule left for the data to teach (270 of the stated form's 293 prompt tokens are
    # the rule, the same for every item: the bare form halves a training step of the demo's order runs)
    "order_bare": {"*": ["After {hops} lesions, in what order do the numbers stand?"]},
    "look": {"*": ["Is the lesion in the {cell} cell of this {mp} small or large, and darker or brighter than its "
                   "surroundings?"]},
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
    drawn = case["meta"].get("drawn", {})  # a phantom's drawn attributes (the walk's grid, start and hops)
    kind = ["order"] if "sizes" in drawn else ["walk"]  # an order grid, else a walk grid: asked these only
    grid_types = [t for t in args.types or kind if t in GRID_TYPES + ORDER_TYPES]
    asked = ["caption"] if args.captions else grid_types if "grid" in drawn else rotated[:args.questions_per_image]
    cells = [cell_name(c) for c in CELLS] if args.look_cells == "all" else [None]
    for qtype, each in [(t, c) for t in asked for c in (cells if t == "look" else [None])]:
        sid = f"{key}--{qtype}" + (f"-{slug(each)}" if each else "")  # --look-cells all: one look per cell
        rng = random.Random(stable_hash(sid))
        target, ttype, negative = case["target"], case["target_type"], False
        if qtype == "yesno" and (r // 6) % 2 == 1 and case["others"]:
            target, ttype = case["others"][stable_hash(sid) % len(case["others"])]
            negative = True  # ask about a target that is absent from this image
        # a tumor is asked about in the words of a lesion
        wording = "order_bare" if qtype == "order" and args.order_question == "bare" else qtype
        forms = TEMPLATES[wording].get("lesion" if ttype == "tumor" else ttype, TEMPLATES[wording]["*"])
        cell = each or drawn.get("look_cell") or drawn.get("path", [None])[-1]  # a "cell" question: the case's mask
        question = rng.choice(forms).format(t=target, art=article(target, ttype), mp=mp, cell=cell, **drawn)
        yield {"id": sid, "target": target, "target_type": ttype, "negative": negative,
               "question": question, "question_type": qtype, "rng": rng, "cell": cell}


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
    if qtype in G.TYPES:  # a phantom grid's questions: embedded/grid_questions.py
        return G.choices(qtype, case["meta"]["drawn"], sample["cell"], rng)
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
# the offline teacher (the OpenAI-compatible one is in pipeline/llm_teacher.py); teach_case gates the output of either
def geometry_teacher(case, sample, facts, strict, args):
    """The offline teacher: answer and chain from the facts. K is drawn from the type's range with the
    sample's own RNG (one draw even for a fixed K: the closed-ended choices draw from it next)."""
    qtype, (lo, hi) = sample["question_type"], STEP_RANGE[sample["question_type"]]
    K = lo + sample["rng"].randint(0, 1) * (hi - lo)
    if qtype in G.TYPES:  # a phantom grid's questions: embedded/grid_questions.py
        answer, chain = G.teach(qtype, case["meta"]["drawn"], sample["cell"])
        return json.dumps({"final_answer": answer, "reasoning_chain": chain})
    answer = canonical_answer(qtype, sample["target"], sample["target_type"], facts, sample["negative"])
    return json.dumps({"final_answer": answer, "reasoning_chain": geometry_chain(sample, facts, K)})


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
        cases = [phantom_walk_case(work[1], args.seed, args.image_size, args.walk_hops, args.grid_lesions,
                                   args.grid_coded, args.walk_start)
                 if args.walk_hops else
                 phantom_order_case(work[1], args.seed, args.image_size, args.order_hops) if args.order_hops else
                 phantom_case(work[1], args.seed, args.image_size)] if work[0] == "phantom" else \
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
    moves = case.get("step_masks", [])  # a walk: the lesion each move lands on; the last is the case's mask
    step_paths = [f"masks/{stem}--move{k}.png" for k in range(1, len(moves))] + [paths["mask"]] * bool(moves)
    for path, m in zip(step_paths[:-1], moves):
        save_png(m.astype(np.uint8) * 255, os.path.join(args.out, path))
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
        own = {}  # a look question's mask is the lesion it asks about (the case's is the last one read)
        if sample["question_type"] == "look" and sample["cell"] in case.get("cell_masks", {}):
            own["mask"] = f"masks/{stem}--{slug(sample['cell'])}.png"
            save_png(case["cell_masks"][sample["cell"]].astype(np.uint8) * 255, os.path.join(args.out, own["mask"]))
        record = dict(head, **dict(paths, **own), **asked, answer=out["final_answer"], reasoning_chain=chain,
                      latent_steps=len(chain), split=assign_split(case["group"], args, case.get("folder_split")))
        if sample["question_type"] in ("walk", "order"):  # the lesion step k reads: its own visual target
            record["step_masks"] = step_paths
        if sample["question_type"] != "caption":  # every split (train.py --options-rate, evaluate.py); the
            # sample's own RNG, drawn last: test items keep the choices they had when only they got them
            record["choices"], record["answer_index"] = closed_form(sample, facts, case, sample["rng"])
        record["meta"] = dict(case["meta"], negative=sample["negative"], facts=facts, teacher=args.teacher,
                              gate_retries=history, present_target=case["target"],
                              **({"cell": sample["cell"]} if sample["question_type"] in ("look", "cell") else {}))
        outcomes.append(("sample", record))
    return outcomes


# ----------------------------------------------------------------------------- resumable output files
def save_png(array, path):
    """Write atomically: a killed run never leaves a half-written PNG under the final name."""
    tmp = path + ".tmp.png"
    Image.fromarray(array).save(tmp, compress_level=1)  # fast zlib level: noisy images barely shrink more
    os.replace(tmp, path)


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
    p.add_argument("--walk-hops", type=int, default=0, choices=range(0, 7),
                   help="N > 0: every phantom is a 3 x 3 grid of lesions asked the walk question (1..N moves, "
                        "one reasoning step each; embedded/phantom.py); 0: the six question types")
    p.add_argument("--order-hops", type=int, default=0, choices=range(0, 10),
                   help="N > 0: every phantom is a 3 x 3 grid of lesions asked the order question (the first 1..N "
                        "lesions read, one reasoning step each; embedded/phantom.py); --types look asks one "
                        "lesion's size and brightness instead (or --types order look, both)")
    p.add_argument("--order-question", choices=["stated", "bare"], default="stated",
                   help="the order question's wording: stated (the rule in every question) or bare (\"After N "
                        "lesions, in what order do the numbers stand?\": the rule is taught by the data; the same "
                        "items, images, chains and answers)")
    p.add_argument("--look-cells", choices=["one", "all"], default="one",
                   help="--types look on an order grid: ask about one cell drawn per image (default), or about "
                        "all nine (nine questions per image: a stand-in that must find every named cell)")
    p.add_argument("--grid-lesions", type=int, default=9, choices=range(1, 10),
                   help="lesions on a walk grid (< 9: cells off the walk stay empty, a curriculum for --types cell)")
    p.add_argument("--walk-start", choices=[cell_name(c) for c in CELLS], metavar="CELL",
                   help="every walk starts in this cell, e.g. 'upper left' (default: a random one per image); "
                        "the first move then reads a fixed cell and each later one picks among the few cells "
                        "the walk can have reached")
    p.add_argument("--grid-coded", action="store_true",
                   help="a walk grid's lesion shows its cell: size by row, shape by column (embedded/phantom.py)")
    # --- questions and splits
    p.add_argument("--questions-per-image", type=int, default=1, choices=range(1, 7),
                   help="question types per (image, target)")
    p.add_argument("--types", nargs="+", choices=QUESTION_TYPES + GRID_TYPES + ORDER_TYPES, default=None,
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
    if args.walk_start and not args.walk_hops:
        p.error("--walk-start needs --walk-hops N (it is where every walk begins)")
    if args.order_question != "stated" and not args.order_hops:
        p.error("--order-question words the order question: it needs --order-hops N")
    if args.walk_hops and args.order_hops:
        p.error("--walk-hops and --order-hops make two kinds of grid: give one per run (another --out or --seed)")
    for flag, hops, types in (("--walk-hops", args.walk_hops, GRID_TYPES), ("--order-hops", args.order_hops,
                                                                          ORDER_TYPES)):
        if args.types and bool(hops) != bool(set(args.types) & set(types)):
            p.error(f"--types {' '.join(types)} are asked of {flag} grids only, and such a grid only them: give "
                    f"them together with {flag} N (and the six types without it)")


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
