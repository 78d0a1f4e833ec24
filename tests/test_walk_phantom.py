"""The walk, the phantom's question that needs several passes (prepare_data.py --walk-hops): nine lesions on a
3 x 3 grid, a stated start cell and rule; the image shows what the rule reads, the chain states one move per
step, and the answer is the cell the moves end in."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import prepare_data as P
from embedded.phantom import CELLS, cell_name, phantom_walk_case, walk
from pipeline.image_facts import measure


def test_walk_follows_the_lesion_it_stands_on_and_wraps():
    grid = [["darker", "darker", "brighter"],
            ["brighter", "darker", "darker"],
            ["darker", "brighter", "brighter"]]
    # upper left dark -> across; upper middle dark -> across; upper right bright -> down;
    # middle right dark -> across, wrapping to middle left; middle left bright -> down
    assert [cell_name(c) for c in walk(grid, (0, 0), 5)] == [
        "upper left", "upper middle", "upper right", "middle right", "middle left", "lower left"]
    assert walk(grid, (2, 2), 1) == [(2, 2), (0, 2)]  # bright at the bottom edge wraps to the top row


def test_the_pixels_show_every_lesion_as_drawn_and_the_mask_is_the_end():
    for index in range(20):
        case = phantom_walk_case(index, 7, 96, 4)
        drawn = case["meta"]["drawn"]
        assert 1 <= drawn["hops"] <= 4 and len(drawn["path"]) == drawn["hops"] + 1
        assert drawn["path"][0] == drawn["start"]
        facts = measure(case["image"], case["mask"])
        r, c = {cell_name(x): x for x in CELLS}[drawn["path"][-1]]
        assert facts["brightness"] == drawn["grid"][r][c]                 # what the last move's cell shows
        assert abs(facts["cx"] - (c + 0.5) / 3) < 0.06 and abs(facts["cy"] - (r + 0.5) / 3) < 0.06


def test_prepare_data_asks_the_walk_with_one_step_per_move(tmp_path):
    out = str(tmp_path / "walk")
    P.main(["--source", "phantom", "--out", out, "--n", "40", "--image-size", "96", "--walk-hops", "3",
            "--workers", "1"])
    with open(os.path.join(out, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 40 and {s["question_type"] for s in samples} == {"walk"}
    assert {s["latent_steps"] for s in samples} == {1, 2, 3}
    for s in samples:
        drawn = s["meta"]["drawn"]
        assert s["latent_steps"] == drawn["hops"] == len(s["reasoning_chain"])
        assert f"the {drawn['start']} cell" in s["question"] and f"After {drawn['hops']} moves" in s["question"]
        assert len(s["choices"]) == 9 and s["choices"][s["answer_index"]] == s["answer"]
        assert s["answer"] == f"The walk ends in the {drawn['path'][-1]} cell."
        for k, step in enumerate(s["reasoning_chain"]):  # step k reads the lesion of cell k, names cell k + 1
            assert step.startswith(f"The lesion in the {drawn['path'][k]} cell")
            assert step.endswith(f"to the {drawn['path'][k + 1]} cell.")
    mask = np.asarray(Image.open(os.path.join(out, samples[0]["mask"])))
    assert 100 < (mask > 0).sum() < 300  # one lesion, the one the walk ends on


def test_a_cell_question_asks_the_brightness_of_the_lesion_its_mask_holds(tmp_path):
    out = str(tmp_path / "cell")
    P.main(["--source", "phantom", "--out", out, "--n", "12", "--image-size", "96", "--walk-hops", "2",
            "--types", "cell", "--workers", "1"])
    with open(os.path.join(out, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 12 and {s["question_type"] for s in samples} == {"cell"}
    for s in samples:
        cell = s["meta"]["drawn"]["path"][-1]
        r, c = {cell_name(x): x for x in CELLS}[cell]
        truth = s["meta"]["drawn"]["grid"][r][c]
        assert f"the {cell} cell" in s["question"] and s["answer"].endswith(f"is {truth} than its surroundings.")
        assert s["latent_steps"] == 1 and len(s["choices"]) == 2 and s["choices"][s["answer_index"]] == s["answer"]
        assert s["meta"]["facts"]["brightness"] == truth  # measured from the mask's pixels: the asked lesion


def test_grid_questions_need_walk_grids(tmp_path, capsys):
    for argv in (["--types", "cell"], ["--walk-hops", "2", "--types", "yesno"]):
        with pytest.raises(SystemExit):
            P.get_args(["--source", "phantom", "--out", str(tmp_path / "x")] + argv)
        assert "asked of --walk-hops grids only" in capsys.readouterr().err


def test_sparse_grids_keep_every_cell_of_the_walk():
    for lesions in (1, 3, 9):
        for index in range(10):
            case = phantom_walk_case(index, 5, 96, 4, lesions)
            drawn = case["meta"]["drawn"]
            empty = set(drawn["empty"])
            assert not empty & set(drawn["path"])
            assert len(empty) == min(9 - lesions, 9 - len(set(drawn["path"])))
            img = case["image"].astype(float)
            lum = img.mean(axis=2) if img.ndim == 3 else img
            for name in empty:  # an empty cell's centre is background: close to its cell's median
                r, c = {cell_name(x): x for x in CELLS}[name]
                block = lum[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
                assert abs(float(block[12:20, 12:20].mean()) - float(np.median(block))) < 25


def test_coded_grids_size_lesions_by_row():
    areas = {}
    for index in range(30):
        case = phantom_walk_case(index, 9, 96, 3, coded=True)
        r, c = {cell_name(x): x for x in CELLS}[case["meta"]["drawn"]["path"][-1]]
        areas.setdefault(r, []).append(int(case["mask"].sum()))
    assert max(areas[0]) < min(areas[1]) and max(areas[1]) < min(areas[2])  # upper small ... lower large


def test_a_fixed_start_keeps_the_images_and_moves_the_walk(tmp_path):
    """--walk-start: the same grids (the RNG draws the random start all the same), every walk from that cell."""
    for index in range(10):
        free, fixed = phantom_walk_case(index, 3, 96, 4), phantom_walk_case(index, 3, 96, 4, fixed_start="upper left")
        assert free["meta"]["drawn"]["grid"] == fixed["meta"]["drawn"]["grid"]
        assert free["meta"]["drawn"]["hops"] == fixed["meta"]["drawn"]["hops"]
        assert np.array_equal(free["image"], fixed["image"])
        drawn = fixed["meta"]["drawn"]
        assert drawn["start"] == "upper left"
        assert drawn["path"] == [cell_name(c) for c in walk(drawn["grid"], (0, 0), drawn["hops"])]
    out = str(tmp_path / "fixed")
    P.main(["--source", "phantom", "--out", out, "--n", "12", "--image-size", "96", "--walk-hops", "2",
            "--walk-start", "upper left", "--workers", "1"])
    with open(os.path.join(out, "samples.jsonl")) as f:
        assert all("Start at the lesion in the upper left cell" in json.loads(line)["question"] for line in f)
    with pytest.raises(SystemExit):
        P.main(["--source", "phantom", "--out", out, "--n", "12", "--walk-start", "upper left"])
