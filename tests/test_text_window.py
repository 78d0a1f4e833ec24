"""The text window, measured (pipeline/text_window.py, evaluate.py --text-window): the template and the score
worked out by hand, and the evaluate.py path on a tiny checkpoint with the decoder's output planted."""
import itertools
import json
import os

import pytest

import evaluate as E
import model as M
from pipeline import text_window as TW
from tests.test_evaluate import tiny  # noqa: F401  (the module fixture: a tiny checkpoint and its data)

pytestmark = pytest.mark.usefixtures("one_thread")


_ids = itertools.count()


def step(ref, decoded, k=1, qtype="walk", item=None):
    return dict(id=next(_ids) if item is None else item, question_type=qtype, k=k, ref=ref, decoded=decoded)


def test_template_and_score_by_hand():
    refs = ["The lesion in the upper left cell is darker, so move across.",
            "The lesion in the center cell is brighter, so move down.",
            "The lesion in the center cell is darker, so move across.",
            "The lesion in the lower right cell is brighter, so move down."]
    # in >= 90% of them (normalised as the VQA metrics do: articles dropped)
    assert TW.template(refs) == {"lesion", "in", "cell", "is", "so", "move"}
    res = TW.score([step(refs[0], refs[0]),                                             # right
                    step(refs[1], refs[2]),                                             # another item's finding
                    step(refs[2], "The lesion in the center cell is darker so move across"),  # right, unpunctuated
                    step(refs[3], "lesion in lower right cell is brighter so move down, move down"),  # a repeat
                    step(refs[3], "The lesion in the upper right cell is brighter, so move down.")])
    (row,) = res["rows"]
    assert row["n"] == 5 and row["right"] == 60.0 and row["prior"] == 40.0
    assert row["distinct_decoded"] == 5 and row["distinct_refs"] == 4
    assert [i["right"] for i in res["items"]] == [True, False, True, True, False]
    # the content words count in their order: the same words in another order state another finding
    a, b, c = ("The lesion in the lower left cell is darker, so 2 first and 1 last.",
               "The lesion in the upper right cell is brighter, so 3 first and 2 last.",
               "The lesion in the upper left cell is darker, so 3 first and 1 last.")
    swapped = TW.score([step(a, "The lesion in the lower left cell is darker, so 1 first and 2 last."),
                        step(b, "The lesion in the right upper cell is brighter, so 3 first and 2 last."),
                        step(c, c)])
    assert [i["right"] for i in swapped["items"]] == [False, False, True]
    assert [i["right"] for i in TW.score([step("a b", "x"), step("a b", "y")])["items"]] == [None, None]
    # numbers are findings, never template, and count at every appearance: every sentence that states an order
    # holds 1, 2 and 3 (and a count), so only where they stand tells one order from another
    close = [f"So after 3 lesions the numbers stand in the order {o}." for o in ("2, 1, 3", "3, 1, 2", "1, 2, 3")]
    assert not TW.template(close) & {"1", "2", "3"}
    assert [i["right"] for i in TW.score([step(close[0], close[0]), step(close[1], close[0]),
                                          step(close[2], close[2].replace("3 lesions", "2 lesions"))])["items"]] \
        == [True, False, False]
    # a window that says the same thing for every item scores the prior, with one distinct sentence
    same = TW.score([step(r, refs[0]) for r in refs])
    assert same["rows"][0]["right"] == 25.0 == same["rows"][0]["prior"] and same["rows"][0]["distinct_decoded"] == 1
    common = TW.score([step(r, refs[0]) for r in refs[:1] * 3 + refs[3:]])  # when one finding is common
    assert common["rows"][0]["right"] == 75.0 == common["rows"][0]["prior"]
    # a step whose references are all alike states nothing beyond the template: not scored
    assert TW.score([step("a b", "x"), step("a b", "y")])["rows"] == []
    # per-step totals weight the question types by their items
    two = TW.score([step("a b x", "a b x", qtype="t1"), step("a b y", "a b z", qtype="t1"),
                    step("c d u", "c d u", qtype="t2"), step("c d v", "c d u", qtype="t2"),
                    step("c d w", "c d w", qtype="t2")])
    assert two["steps"][0]["n"] == 5 and two["steps"][0]["right"] == pytest.approx(100 * 3 / 5)
    assert "| step 1 | all | 5 | 60.0 |" in TW.table(two)


def test_an_item_is_right_when_every_step_is():
    """per_type: the share of items whose every scored step states its finding (the walk: every move)."""
    a, b, c = "move across to the centre", "move down to the centre", "move across to the right"
    res = TW.score([step(a, a, 1, item="i"), step(b, b, 2, item="i"),     # both moves right
                    step(b, b, 1, item="j"), step(c, a, 2, item="j"),     # the second move wrong
                    step(c, c, 1, item="k"),                              # a one-move walk, right
                    step(a, a, 1, qtype="other", item="i"), step(c, a, 1, qtype="other", item="j")])  # own row
    assert res["per_type"] == [dict(question_type="other", K=None, n_items=2, all_steps_right=50.0),
                               dict(question_type="walk", K=None, n_items=3, all_steps_right=100 * 2 / 3)]
    assert "| walk | None | 3 | 66.7 |" in TW.table(res)
    by_k = TW.score([dict(s, K=len(s["id"])) for s in [step(a, a, 1, item="i"), step(b, b, 2, item="i"),
                                                         step(b, b, 1, item="jj"), step(c, a, 2, item="jj")]])
    assert [(r["K"], r["all_steps_right"]) for r in by_k["per_type"]] == [(1, 100.0), (2, 0.0)]


def test_evaluate_text_window_decodes_every_step(tiny, monkeypatch):  # noqa: F811
    """Each item's chain made its own (the item's number in every step): a decoder planted to say item i's
    step k scores 100% only if evaluate.py pairs latent (b, k) with item b's step k."""
    import shutil
    data = os.path.join(tiny["root"], "data_tw")
    shutil.copytree(tiny["data"], data)
    rows = [json.loads(l) for l in open(os.path.join(data, "samples.jsonl"))]
    for n, r in enumerate(rows):
        r["reasoning_chain"] = [f"Step {k} finds the mark {n}{k}." for k in range(len(r["reasoning_chain"]))]
    with open(os.path.join(data, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    items, K = E.read_test_split(data), 3
    said = [it["reasoning_chain"][k] if k < len(it["reasoning_chain"]) else "nothing" for it in items
            for k in range(K)]  # in the order (item, step) of the loop's latents
    real, caps = M.decode_latent, []

    def planted(decoder, pj_in, tok, h, max_new_tokens=40):  # the real decoder runs; its text is replaced
        caps.append((max_new_tokens, max(len(tok(s, add_special_tokens=False)["input_ids"])
                                         for it in items for s in it["reasoning_chain"])))
        n = len(real(decoder, pj_in, tok, h, max_new_tokens=2))
        out = said[:n]
        del said[:n]
        return out
    monkeypatch.setattr(M, "decode_latent", planted)
    out = os.path.join(tiny["root"], "ev_tw")
    E.main(["--ckpt", tiny["ckpt"], "--data", data, "--out", out, "--max-new-tokens", "2", "--k", str(K),
            "--batch-size", "3", "--text-window"])
    res = json.load(open(os.path.join(out, "text_window.json")))
    assert said == []  # every latent of every item decoded
    assert caps and all(cap == longest + 1 for cap, longest in caps)  # room for the longest step and its end
    assert len(res["items"]) == sum(min(K, len(it["reasoning_chain"])) for it in items)
    # every scored step right (step 3 has one item: all template, not scored)
    assert all(s["right"] in (True, None) for s in res["items"]) and all(r["right"] == 100.0 for r in res["rows"])
    assert sum(s["right"] is True for s in res["items"]) == sum(r["n"] for r in res["rows"]) >= len(items)
    assert res["steps"][0]["n"] == len(items) and res["steps"][0]["prior"] < 100
    assert "items" not in json.load(open(os.path.join(out, "metrics.json")))["text_window"]
    # --k sample: each item at its own K, decoded group by group (evaluate.k_groups), paired all the same
    groups = E.k_groups(items, "sample")
    assert len(groups) > 1
    said[:] = [items[i]["reasoning_chain"][k] if k < len(items[i]["reasoning_chain"]) else "nothing"
               for Kg, idx in groups for i in idx for k in range(Kg)]
    E.main(["--ckpt", tiny["ckpt"], "--data", data, "--out", out, "--max-new-tokens", "2", "--k", "sample",
            "--batch-size", "3", "--text-window"])
    res = json.load(open(os.path.join(out, "text_window.json")))
    assert said == [] and res["K"] == "sample"
    assert len(res["items"]) == sum(min(it["latent_steps"], len(it["reasoning_chain"])) for it in items)
    assert all(s["right"] in (True, None) for s in res["items"])
    assert all(r["all_steps_right"] == 100.0 for r in res["per_type"]) and res["per_type"]
    with pytest.raises(SystemExit):
        E.get_args(["--ckpt", tiny["ckpt"], "--data", data, "--out", out, "--k", "0", "--text-window"])
