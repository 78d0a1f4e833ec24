"""The order question (prepare_data.py --order-hops): three numbers reordered by each lesion read row by row, a
state machine that does not commute. The image shows each lesion's size and brightness, the chain states one
lesion and the order it leaves per step, and the answer is the order after the last lesion read."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import prepare_data as P
from demo import walk as W
from embedded.phantom import CELLS, LOOKS, cell_name, phantom_order_case, reorder
from pipeline.image_facts import measure


def test_each_look_moves_the_numbers_and_the_moves_do_not_commute():
    assert [reorder("123", look) for look in LOOKS] == ["231", "213", "132", "321"]
    # small darker (first to the end) then small brighter (swap the last two), and the other way round
    assert reorder(reorder("123", LOOKS[0]), LOOKS[2]) == "213"
    assert reorder(reorder("123", LOOKS[2]), LOOKS[0]) == "321"


def test_the_pixels_show_every_lesion_read_and_the_steps_hold_them():
    for index in range(12):
        case = phantom_order_case(index, 3, 96, 6)
        d = case["meta"]["drawn"]
        assert d["read"] == [cell_name(c) for c in CELLS[:d["hops"]]] and len(d["path"]) == d["hops"] + 1
        order = "123"
        for (r, c), m, after in zip(CELLS, case["step_masks"], d["path"][1:]):
            order = reorder(order, (d["sizes"][r][c], d["grid"][r][c]))
            assert after == order
            facts = measure(case["image"], m)
            assert facts["brightness"] == d["grid"][r][c]
            assert abs(facts["cx"] - (c + 0.5) / 3) < 0.06 and abs(facts["cy"] - (r + 0.5) / 3) < 0.06
            assert (m.sum() > 200) == (d["sizes"][r][c] == "large")  # large discs 260-300 px, small 35-50
        assert (case["mask"] == case["step_masks"][-1]).all()


def test_prepare_data_asks_the_order_with_one_step_per_lesion(tmp_path):
    out = str(tmp_path / "order")
    P.main(["--source", "phantom", "--out", out, "--n", "30", "--image-size", "96", "--order-hops", "4",
            "--types", "order", "look", "--workers", "1"])
    with open(os.path.join(out, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    order = [s for s in samples if s["question_type"] == "order"]
    look = [s for s in samples if s["question_type"] == "look"]
    assert len(order) == len(look) == 30 and {s["latent_steps"] for s in order} == {1, 2, 3, 4}
    for s in order:
        d = s["meta"]["drawn"]  # a step per lesion read, the last one the lesion the answer's order comes from
        assert s["latent_steps"] == d["hops"] == len(s["reasoning_chain"]) == len(s["step_masks"])
        assert s["step_masks"][-1] == s["mask"]
        assert f"After {d['hops']} lesions" in s["question"] and "stand in the order 1, 2, 3" in s["question"]
        assert len(s["choices"]) == 6 and s["choices"][s["answer_index"]] == s["answer"]
        # the answer leads with the decision: its first token is the first number (lm_head(h_K), eq. 2)
        assert s["answer"] == f"{', '.join(d['path'][-1])}." and s["answer"][0] == d["path"][-1][0]
        for k, step in enumerate(s["reasoning_chain"]):  # step k: lesion k's cell and look, the order left
            r, c = CELLS[k]
            assert step.startswith(f"The lesion in the {cell_name(CELLS[k])} cell is {d['sizes'][r][c]} and "
                                   f"{d['grid'][r][c]} than its surroundings, so ")
            assert step.endswith(f"which leaves {d['path'][k + 1][0]} first and {d['path'][k + 1][-1]} last.")
        masks = [np.asarray(Image.open(os.path.join(out, p))) > 0 for p in s["step_masks"]]
        assert all(abs(measure(np.zeros((96, 96), np.uint8), m)["cx"] - (CELLS[k][1] + 0.5) / 3) < 0.06
                   for k, m in enumerate(masks))
    for s in look:  # any of the nine cells, its size and brightness; four choices
        r, c = {cell_name(x): x for x in CELLS}[s["meta"]["drawn"]["look_cell"]]
        d = s["meta"]["drawn"]
        assert s["answer"] == (f"The lesion in the {cell_name((r, c))} cell is {d['sizes'][r][c]} and "
                               f"{d['grid'][r][c]} than its surroundings.")
        assert s["latent_steps"] == 1 and len(s["choices"]) == 4 and s["choices"][s["answer_index"]] == s["answer"]
        m = np.asarray(Image.open(os.path.join(out, s["mask"]))) > 0  # the mask is the lesion asked about
        assert abs(measure(np.zeros((96, 96), np.uint8), m)["cx"] - (c + 0.5) / 3) < 0.06
        assert abs(measure(np.zeros((96, 96), np.uint8), m)["cy"] - (r + 0.5) / 3) < 0.06
    assert len({s["meta"]["drawn"]["look_cell"] for s in look}) >= 6


def test_the_bare_order_question_changes_the_wording_only(tmp_path):
    """--order-question bare: the same items, images, masks, chains, answers and choices; the question without the
    rule (what a training step of the order runs spends most of its time on)."""
    base = ["--source", "phantom", "--n", "12", "--image-size", "96", "--order-hops", "4", "--workers", "1"]
    for name, extra in (("stated", []), ("bare", ["--order-question", "bare"])):
        P.main(base + ["--out", str(tmp_path / name)] + extra)
    read = lambda name: [json.loads(l) for l in open(tmp_path / name / "samples.jsonl")]
    stated, bare = read("stated"), read("bare")
    assert len(stated) == len(bare) == 12
    for s, b in zip(stated, bare):
        assert b["question"] == f"After {b['meta']['drawn']['hops']} lesions, in what order do the numbers stand?"
        assert s["question"].endswith(b["question"]) and len(s["question"]) > 5 * len(b["question"])
        assert {k: v for k, v in s.items() if k != "question"} == {k: v for k, v in b.items() if k != "question"}
    for img in sorted(os.listdir(tmp_path / "stated" / "images")):
        assert (tmp_path / "stated" / "images" / img).read_bytes() == (tmp_path / "bare" / "images" / img).read_bytes()
    with pytest.raises(SystemExit):
        P.get_args(["--source", "phantom", "--out", str(tmp_path / "x"), "--order-question", "bare"])


def test_look_cells_all_asks_every_cell_of_every_image(tmp_path):
    """--look-cells all: nine look questions per image, one per cell, each with its own id, answer and mask."""
    out = str(tmp_path / "all")
    P.main(["--source", "phantom", "--out", out, "--n", "3", "--image-size", "96", "--order-hops", "1",
            "--types", "order", "look", "--look-cells", "all", "--workers", "1"])
    with open(os.path.join(out, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    look = [s for s in samples if s["question_type"] == "look"]
    assert len(samples) == 3 + 27 and len(look) == 27 and len({s["id"] for s in samples}) == 30
    for key in {s["id"].split("--")[0] for s in look}:
        assert sorted(s["meta"]["cell"] for s in look if s["id"].startswith(key + "--")) == \
            sorted(cell_name(c) for c in CELLS)
    for s in look:
        r, c = {cell_name(x): x for x in CELLS}[s["meta"]["cell"]]
        d = s["meta"]["drawn"]
        assert f"in the {s['meta']['cell']} cell" in s["question"]
        assert s["answer"] == (f"The lesion in the {s['meta']['cell']} cell is {d['sizes'][r][c]} and "
                               f"{d['grid'][r][c]} than its surroundings.")
        m = np.asarray(Image.open(os.path.join(out, s["mask"]))) > 0
        f = measure(np.zeros((96, 96), np.uint8), m)
        assert abs(f["cx"] - (c + 0.5) / 3) < 0.06 and abs(f["cy"] - (r + 0.5) / 3) < 0.06
        assert (m.sum() > 200) == (d["sizes"][r][c] == "large")


def test_order_questions_need_order_grids(tmp_path, capsys):
    for argv, says in ((["--types", "look"], "--order-hops grids only"),
                       (["--order-hops", "2", "--types", "walk"], "--walk-hops grids only"),
                       (["--order-hops", "2", "--walk-hops", "2"], "two kinds of grid")):
        with pytest.raises(SystemExit):
            P.get_args(["--source", "phantom", "--out", str(tmp_path / "x")] + argv)
        assert says in capsys.readouterr().err


def test_walk_py_runs_the_order_task():
    """demo/walk.py --task order: the order data, a stand-in of one lesion plus every lesion's look (nine looks
    per image, lr 1e-3; the walk's stand-in keeps its 3e-3), and the pattern a lookup table would recall (the
    looks of the lesions read)."""
    args = W.get_args(["--task", "order", "--curriculum", "stepwise", "--moves", "6", "--out", "o"])
    cmds = [c for c, _ in W.stages(args)]
    assert cmds[1][cmds[1].index("--order-hops") + 1] == "6" and "--walk-hops" not in cmds[1]
    assert cmds[3][cmds[3].index("--order-hops") + 1] == "1"
    assert cmds[3][-5:] == ["--types", "order", "look", "--look-cells", "all"]
    assert cmds[4][cmds[4].index("--lr") + 1] == "1e-3"
    walk = [c for c, _ in W.stages(W.get_args(["--out", "w"]))]
    assert walk[4][walk[4].index("--lr") + 1] == "3e-3" and "--look-cells" not in walk[3]
    s = dict(meta=dict(drawn=dict(hops=2, sizes=[["small", "large", "small"]] * 3,
                                  grid=[["darker", "brighter", "darker"]] * 3)))
    assert W.pattern(s) == ("smalldarker", "largebrighter")


def test_walk_py_reports_the_stand_ins_perception(tmp_path):
    """--task order checks perception first: the stand-in alone on unseen images, one lesion's look and the first
    lesion's order (perception_stages), worked out by hand; the walk has no such line."""
    args = W.get_args(["--task", "order", "--curriculum", "stepwise", "--out", str(tmp_path)])
    assert [c[c.index("--out") + 1] for c, _ in W.stages(args)[-2:]] == [
        str(tmp_path / "perception_data"), str(tmp_path / "stand_in_perception")]
    (tmp_path / "perception_data").mkdir()
    (tmp_path / "stand_in_perception").mkdir()
    rows = [("l1", "look", True, "upper left"), ("l2", "look", False, "center"), ("l3", "look", True, "center"),
            ("l4", "look", False, "center"), ("l5", "look", False, "center"),
            ("o1", "order", True, None), ("o2", "order", True, None)]
    (tmp_path / "perception_data" / "samples.jsonl").write_text("".join(
        json.dumps(dict(id=i, question_type=t, meta=dict(drawn=dict(look_cell=cell)))) + "\n" for i, t, _, cell in rows))
    (tmp_path / "stand_in_perception" / "predictions.jsonl").write_text(
        "".join(json.dumps(dict(id=i, correct=c, answer_type="closed")) + "\n" for i, _, c, _ in rows))
    line = W.perception(args)
    # pooled, 2 of 5 looks; cell by cell the worst cell shows: the centre 1 of 4
    assert "at 40.0% (center cell 25.0%, upper left 100.0%) and answers the order after the first lesion at 100.0%" in line
    assert "By cell: center 25, upper left 100." in line
    # the runs wait for perception: the centre's 25% stops them, naming the cell; --min-perception 0 lets them go
    assert "center cell at 25.0%" in W.check_perception(args) and "upper left" not in W.check_perception(args)
    assert W.check_perception(W.get_args(["--task", "order", "--curriculum", "stepwise", "--out", str(tmp_path), "--min-perception", "0"])) is None
    assert W.check_perception(W.get_args(["--task", "order", "--curriculum", "stepwise", "--out", str(tmp_path), "--min-perception", "20"])) is None
    assert W.perception(W.get_args(["--out", str(tmp_path)])) == ""


def test_walk_py_counts_an_order_items_lesions():
    assert W.moves(dict(latent_steps=3, question_type="order")) == 3
    assert W.moves(dict(latent_steps=3, question_type="walk")) == W.moves(dict(latent_steps=3)) == 3


def test_the_order_words_are_whole_tokens_and_the_tiny_tokenizer_is_unchanged():
    """embedded/tiny.py --words order: every word of the order question, its chains and options is one token (the
    stated question 84 tokens, against 185 from the tiny tokenizer that cuts 'numbers' into six pieces); the default
    tokenizer keeps its 911 entries, so the tiny models and every record made with them stay as they were."""
    from embedded.grid_questions import order_chain
    from embedded.tiny import ORDER_WORDS, TINY_CORPUS, WORDS, make_tokenizer
    tiny, order = make_tokenizer(), make_tokenizer(*WORDS["order"])
    assert len(tiny) == 911 and len(order) == 1072
    for w in [w for w in TINY_CORPUS + ORDER_WORDS if "-" not in w]:  # the pre-tokenizer splits 'x-ray' at '-'
        assert len(order(" " + w, add_special_tokens=False).input_ids) == 1, w
    q = P.TEMPLATES["order"]["*"][0].format(mp="fundus photograph", hops=4)
    assert (len(tiny(q).input_ids), len(order(q).input_ids)) == (185, 84)
    case = phantom_order_case(0, 0, 96, 4)
    step = order_chain(case["meta"]["drawn"])[0]
    assert len(order(step).input_ids) < 0.6 * len(tiny(step).input_ids)
    assert order.decode(order(step).input_ids) == step  # byte-level: nothing lost
