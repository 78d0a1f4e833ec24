"""
The text window, measured (evaluate.py --text-window; issue 25): does the sentence decoded from latent step k
state that step's finding, and do different items get different sentences?

A reasoning step is a template plus the finding ("The lesion in the <upper left> cell is <darker> than its
surroundings, so move one cell <across> to the <upper middle> cell."). The template of step k of a question type
is every word that at least 90% of that step's reference sentences share (a finding that nearly every item
shares tells nothing about the item); the rest of a sentence is its content (words as the VQA metrics normalise
them: lower case, no punctuation or articles, numbers as digits; a number is never template). A decoded step is
RIGHT when its content words are the reference's in the same order (each word counted at its first appearance, a
number at every one: a repeated phrase is no error, but "upper left ... lower right" is not "lower left ... upper
right", nor "after 3 lesions ... the order 2, 1, 3" the same with "3, 1, 2").
Beside it:
  prior     what a decoder that ignores the item scores: the share of items whose reference content is the most
            common one at that step (a window that always says the same thing scores about this);
  distinct  how many different sentences the window produced at that step, against the references' count.
Steps whose reference has no content word (all template) state no finding and are not scored.
Per question type and K (the item's latent steps), an ITEM is right when every scored step of its chain is (the
walk: every move read right).
"""
from collections import Counter, defaultdict

from pipeline.vqa_metrics import normalize


def words(sentence):
    return normalize(sentence).split()


def template(refs, share=0.9):
    """Words present in at least `share` of `refs` (each sentence counts a word once); never a number: every
    order of 1, 2 and 3 holds all three, and where they stand is the finding."""
    counts = Counter(w for r in refs for w in set(words(r)))
    return {w for w, c in counts.items() if c >= share * len(refs) and not w.isdigit()}


def content(text, tpl):
    """The words of `text` outside the template, in order: a word at its first appearance, a number at every one
    ("after 3 lesions ... the order 2, 1, 3" ends with 3)."""
    seen, out = set(), []
    for w in words(text):
        if w not in tpl and (w.isdigit() or w not in seen):
            out.append(w)
            seen.add(w)
    return tuple(out)


def score(steps):
    """steps: dicts with id, question_type, k (1-based), ref (the reference sentence), decoded, and K (the item's
    latent steps; optional). -> the
    text_window object: one row per (question type, step) and per step over all types, with n, right, prior
    (%), distinct decoded and distinct reference sentences; per_type: per question type and K, the share of items with
    every scored step right; items: every step with right True/False (None: not scored)."""
    groups = defaultdict(list)
    for s in steps:
        groups[(s["question_type"], s["k"])].append(s)
    rows, per_item = [], []
    for (qtype, k), group in sorted(groups.items()):
        tpl = template([s["ref"] for s in group])
        judged = [(s, content(s["ref"], tpl), content(s["decoded"], tpl)) for s in group]  # each sentence once
        per_item += [dict(s, right=dec == ref if ref else None) for s, ref, dec in judged]
        scored = [s for s, ref, _ in judged if ref]
        if not scored:
            continue
        refs = Counter(ref for _, ref, _ in judged if ref)
        right = [dec == ref for _, ref, dec in judged if ref]
        rows.append(dict(question_type=qtype, k=k, n=len(scored), right=100 * sum(right) / len(scored),
                         prior=100 * refs.most_common(1)[0][1] / len(scored),
                         distinct_decoded=len({s["decoded"] for s in scored}),
                         distinct_refs=len({s["ref"] for s in scored}), template=sorted(tpl)))
    overall = []
    for k in sorted({r["k"] for r in rows}):
        at = [r for r in rows if r["k"] == k]
        n = sum(r["n"] for r in at)
        overall.append(dict(k=k, n=n, right=sum(r["right"] * r["n"] for r in at) / n,
                            prior=sum(r["prior"] * r["n"] for r in at) / n,
                            distinct_decoded=sum(r["distinct_decoded"] for r in at),
                            distinct_refs=sum(r["distinct_refs"] for r in at)))
    chains = defaultdict(list)  # (question type, the item's K, item) -> its scored steps' right/wrong
    for s in per_item:
        if s["right"] is not None:
            chains[(s["question_type"], s.get("K"), s["id"])].append(s["right"])
    per_type = [dict(question_type=t, K=K, n_items=len(v), all_steps_right=100 * sum(v) / len(v))
                for t, K in sorted({c[:2] for c in chains}, key=str)
                for v in [[all(r) for c, r in chains.items() if c[:2] == (t, K)]]]
    return dict(rows=rows, steps=overall, per_type=per_type, items=per_item)


def table(res):
    lines = ["| text window | question type | n | states the step's finding (%) | prior (%) | distinct sentences "
             "(decoded / references) |", "|---|---|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| step {r['k']} | {r['question_type']} | {r['n']} | {r['right']:.1f} | {r['prior']:.1f} | "
                     f"{r['distinct_decoded']} / {r['distinct_refs']} |")
    for r in res["steps"]:
        lines.append(f"| step {r['k']} | all | {r['n']} | {r['right']:.1f} | {r['prior']:.1f} | "
                     f"{r['distinct_decoded']} / {r['distinct_refs']} |")
    lines += ["", "| question type | K | items | every step states its finding (%) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['question_type']} | {r['K']} | {r['n_items']} | {r['all_steps_right']:.1f} |"
              for r in res["per_type"]]
    return "\n".join(lines) + "\n"
