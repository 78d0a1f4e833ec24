"""
What every teacher's output must be before it becomes a stage-1 sample (prepare_data.py): the question types
of Table 4 with the number of reasoning steps K each allows, and the quality gate of §A.3. gate() checks the
format (strict JSON with exactly final_answer and reasoning_chain), words that reveal the annotation, pathology
words for a normal organ, patient-space wording, the number of steps, that a side said about the target agrees
with its centre, and the yes/no answer; it returns the normalised output, or the violations a retry names.
"""
import json
import re

# ----------------------------------------------------------------------------- question types and K (Table 4)
QUESTION_TYPES = ["yesno", "identify", "location_choice", "location", "describe", "reasoning"]
STEP_RANGE = {"yesno": (1, 1), "identify": (1, 1), "location_choice": (1, 1), "location": (2, 2),
              "describe": (2, 3), "reasoning": (3, 4),  # Table 4: the reasoning depth K of each type
              "caption": (1, 1),  # --captions only: stand-in pretraining of the tiny backbone, no VITAL type
              "walk": (1, 6), "cell": (1, 1),  # the phantom's walk grids (prepare_data.py --walk-hops)
              "order": (1, 9), "look": (1, 1)}  # and its order grids (--order-hops: a step per lesion read)


def article(target, target_type):
    if target_type in ("organ", "vessel", "retina", "tissue"):
        return "the"
    return "an" if target[0].lower() in "aeiou" else "a"


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
