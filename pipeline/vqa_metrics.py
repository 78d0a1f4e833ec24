"""
The scoring of a free-form answer (paper §B.4), the metrics per benchmark and the Table 1 rows they make;
evaluate.py scores with it and tools/convert_benchmarks.py normalises with it. Pure functions, tested on
hand-computed cases.

All on normalised text: lowercase, number words -> digits, punctuation -> space, articles (a, an, the)
dropped, whitespace collapsed.
  closed-ended accuracy   an item with `choices`: the prediction is mapped to ONE choice by, in order,
                          (1) a leading option letter ("B", "(b)", "B: ...") when choices exist,
                          (2) exact normalised match with a choice text,
                          (3) the choice with the highest token-F1, if that maximum is > 0 and unique;
                          otherwise it is unmatched and counts as a miss. Correct = mapped to answer_index.
                          Each prediction row records the rule as `matched_by` (letter|exact|f1|none); the
                          fallback share = % of the items with choices matched by f1 or none (per benchmark
                          in metrics.json with the counts per rule, and in table.md).
                          Closed items without choices: yes/no answers use choices ["yes", "no"] (same
                          rule); other answers need an exact normalised match.
  open-ended token-F1     bags of whitespace tokens of the normalised strings (harmonic mean of P, R).
  multiple-choice acc.    closed accuracy over the items that have choices (PMC-VQA, in-domain).
"""
import math
import re
from collections import Counter

# ----------------------------------------------------------------------------------------------------
# 1. Normalisation and token-F1.
# ----------------------------------------------------------------------------------------------------
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
ARTICLES = {"a", "an", "the"}


def normalize(text):
    """lowercase; punctuation -> space (a decimal point between digits is kept); drop articles;
    number words -> digits; single spaces. 'The TWO lesions.' -> '2 lesions'."""
    t = str(text).lower()
    t = re.sub(r"(?<=\d)\.(?=\d)", "<dot>", t)           # keep 2.5 as one token
    t = re.sub(r"[^\w\s<>]|_", " ", t).replace("<dot>", ".")
    words = [NUMBER_WORDS.get(w, w) for w in t.split() if w not in ARTICLES]
    return " ".join(words)


def token_f1(pred, gold):
    """Token-level F1 over bags of whitespace tokens of the normalised strings (§B.4)."""
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)  # both empty: perfect; one empty: nothing in common
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------
# 2. A prediction -> one choice, an item's score, the metrics per benchmark, a paired test between two runs.
# ----------------------------------------------------------------------------------------------------
LETTER = re.compile(r"^\s*(?:option|answer|choice)?\s*[:\s]*\(?([a-z])\)?\s*(?:[:.)\]]|$)", re.IGNORECASE)


MATCHED_BY = ("letter", "exact", "f1", "none")  # which rule mapped a prediction; f1 and none are the fallback


def match_rule(pred, choices):
    """Map a free-form prediction to one choice -> (index or None, the rule: one of MATCHED_BY)."""
    m = LETTER.match(pred)
    if m and ord(m.group(1).lower()) - ord("a") < len(choices):
        return ord(m.group(1).lower()) - ord("a"), "letter"
    p = normalize(pred)
    exact = [i for i, c in enumerate(choices) if normalize(c) == p]
    if len(exact) == 1:
        return exact[0], "exact"
    f1 = [token_f1(pred, c) for c in choices]
    best = max(f1)
    if best > 0 and f1.count(best) == 1:
        return f1.index(best), "f1"
    return None, "none"  # no overlap, or a tie between choices: unmatched


def score_item(item, pred):
    """-> dict with `matched`, `matched_by` + `correct` (closed) or `f1` (open). The single scoring rule of
    the evaluation (its predictions and its probes)."""
    if item["answer_type"] == "open":
        return dict(f1=token_f1(pred, item["answer"]))
    choices, gold = item.get("choices"), item.get("answer_index")
    if not choices and normalize(item["answer"]) in ("yes", "no"):
        choices, gold = ["yes", "no"], ["yes", "no"].index(normalize(item["answer"]))
    if not choices:
        same = normalize(pred) == normalize(item["answer"])
        return dict(matched=None, matched_by="exact" if same else "none", correct=same)
    idx, by = match_rule(pred, choices)
    return dict(matched=idx, matched_by=by, correct=idx is not None and idx == gold)


def aggregate(rows):
    """Predictions (with their scores) -> metrics per benchmark, in %."""
    out = {}
    for name in dict.fromkeys(r["benchmark"] for r in rows):
        rs = [r for r in rows if r["benchmark"] == name]
        closed = [r for r in rs if r["answer_type"] == "closed"]
        mc = [r for r in closed if r.get("choices")]
        opn = [r for r in rs if r["answer_type"] == "open"]
        m = dict(n=len(rs))
        if closed:
            m["closed_acc"] = 100 * sum(r["correct"] for r in closed) / len(closed)
            m["n_closed"] = len(closed)
            # misses by rule: no choice could be matched
            m["unmatched"] = sum(r.get("matched") is None and not r["correct"] for r in closed)
        if mc:
            m["mc_acc"], m["n_mc"] = 100 * sum(r["correct"] for r in mc) / len(mc), len(mc)
            # how each prediction was mapped to an option; the fallback: not the option's letter or its
            # exact text, so the token-F1 rule had to pick one (or none matched)
            m["matched_by"] = {by: sum(r["matched_by"] == by for r in mc) for by in MATCHED_BY}
            m["fallback_share"] = 100 * (m["matched_by"]["f1"] + m["matched_by"]["none"]) / len(mc)
        if opn:
            m["open_f1"], m["n_open"] = 100 * sum(r["f1"] for r in opn) / len(opn), len(opn)
        out[name] = m
    return out


def mcnemar_p(lost, gained):
    """Exact two-sided McNemar (sign) test on the items whose correctness changed; 1.0 if none did."""
    n = lost + gained
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2 ** n)


# ----------------------------------------------------------------------------------------------------
# 3. The Table 1 rows (evaluate.py's table.md).
# ----------------------------------------------------------------------------------------------------
GROUPS = {"vqa-rad": "Medical VQA", "pathvqa": "Medical VQA", "slake": "Medical VQA",
          "pmc-vqa": "Medical VQA", "gemex": "Visual Grounding QA"}
NAMES = {"in-domain/msd": "MSD", "in-domain/biomedparse": "BiomedParse", "in-domain/phantom": "Phantom",
         "vqa-rad": "VQA-RAD", "pathvqa": "PathVQA", "slake": "SLAKE", "pmc-vqa": "PMC-VQA",
         "gemex": "GEMeX-RMCoT"}


def table_md(metrics, label):
    """The Table 1 rows; `fallback`: the share of the items with choices whose prediction was neither an
    option's letter nor its exact text (mapped by token-F1, or matching none)."""
    lines = [f"| Group | Benchmark | Metric | {label} | n | fallback (F1 / none) |", "|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        group = "In-Domain Testsets" if name.startswith("in-domain/") else GROUPS.get(name, "External")
        shown = NAMES.get(name, name)
        if "closed_acc" in m:
            fb = (f"{m['fallback_share']:.1f}% ({m['matched_by']['f1']} / {m['matched_by']['none']} of "
                  f"{m['n_mc']})" if "fallback_share" in m else "")
            lines.append(f"| {group} | {shown} | Acc | {m['closed_acc']:.2f} | {m['n_closed']} | {fb} |")
        if "open_f1" in m:
            lines.append(f"| {group} | {shown} | Token-F1 | {m['open_f1']:.2f} | {m['n_open']} | |")
    return "\n".join(lines) + "\n"
