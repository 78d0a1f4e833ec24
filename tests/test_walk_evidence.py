"""demo/walk.py: accuracy by number of moves, the blind level and the issue's test (>= 15 points and > 2 pooled
std), checked against numbers worked out by hand."""
import json
import os
from types import SimpleNamespace

import pytest

from demo import walk as W


def test_by_moves_and_blind(tmp_path):
    samples = [dict(id=f"t{i}", split="test", latent_steps=m, answer=a)
               for i, (m, a) in enumerate([(1, "x"), (1, "x"), (1, "y"), (2, "y"), (2, "z")])]
    samples.append(dict(id="tr", split="train", latent_steps=2, answer="y"))   # not a test item: not blind
    pred = tmp_path / "predictions.jsonl"
    pred.write_text("".join(json.dumps(dict(id=f"t{i}", correct=c)) + "\n"
                            for i, c in enumerate([True, False, True, True, False])))
    acc = W.by_moves(str(pred), samples)
    assert acc == {1: 100 * 2 / 3, 2: 50.0, "multi": 50.0, "all": 60.0}
    # walks of 4 or more moves (the multi-hop questions) are pooled as 'deep': 3 of 4 right; of 2 or more
    # (what one pass cannot answer on the order question) as 'multi': the same four here
    deep = [dict(id=f"d{i}", split="test", latent_steps=m, answer="x") for i, m in enumerate([4, 4, 5, 6])]
    pred.write_text("".join(json.dumps(dict(id=f"d{i}", correct=c)) + "\n"
                            for i, c in enumerate([True, True, False, True])))
    assert W.by_moves(str(pred), deep) == {4: 100.0, 5: 0.0, 6: 100.0, "deep": 75.0, "multi": 75.0,
                                             "all": 75.0}
    # the text window: an item counts when every scored step of it states its move
    tw = tmp_path / "text_window.json"
    steps = [("t0", True), ("t1", False), ("t2", None), ("t3", True), ("t3", True), ("t4", True), ("t4", False),
             ("tr", True)]
    tw.write_text(json.dumps(dict(items=[dict(id=i, right=r) for i, r in steps])))
    # 1 move: t0 yes, t1 no, t2 nothing scored (no); 2 moves: t3 yes, t4 no; 'all' 2 of 5
    assert W.window_by_moves(str(tw), samples) == {"window 1": 100 / 3, "window 2": 50.0,
                                                  "window multi": 50.0, "window all": 40.0}
    assert W.blind(samples) == {1: 100 * 2 / 3, 2: 50.0}


def test_tables_by_hand():
    row = lambda a, b, c, d, e: dict(zip([1, 2, 3, 4, "all"], (a, b, c, d, e)))
    res = {"VITAL": {0: row(100, 100, 80, 70, 88), 1: row(100, 100, 76, 66, 86)},
           "K=0": {0: row(100, 90, 60, 40, 72), 1: row(100, 94, 60, 50, 76)},
           "pause": {0: row(100, 100, 76, 66, 86), 1: row(100, 100, 76, 66, 86)}}
    md = W.tables(res, {1: 50.0, 2: 47.0, 3: 38.0, 4: 38.0}, {1: 100.0, 2: 100.0, 3: 0.0, 4: 0.0, "all": 50.0},
                  SimpleNamespace(lr=1e-3, lr_k0=None, moves=4))
    assert "| VITAL | 100.0 ± 0.0 | 100.0 ± 0.0 | 78.0 ± 2.8 | 68.0 ± 2.8 | 87.0 ± 1.4 | 88.0 / 86.0 |" in md
    k0 = md.split("VITAL minus K=0")[1].split("VITAL minus pause")[0]
    # 4 moves: 68 - 45 = +23; pooled sqrt((2.83^2 + 7.07^2) / 2) = 5.4; 23 >= 15 and > 10.8: met
    assert "| 4 | +23.0 | 5.4 | yes | yes | +30.0 / +16.0 |" in k0
    # all: 87 - 74 = +13, pooled sqrt((1.41^2 + 2.83^2) / 2) = 2.2: 13 < 15, not met however small the spread
    assert "| all | +13.0 | 2.2 | yes | no | +16.0 / +10.0 |" in k0
    pause = md.split("VITAL minus pause")[1].split("Do VITAL's latents matter")[0]
    assert "| 3 | +2.0 | 2.0 | no | no | +4.0 / +0.0 |" in pause
    assert "latents matter" not in md                  # no probes in these runs: no probe table
    for s, (z, sh, p) in {0: (30.0, 80.0, 1e-4), 1: (40.0, 84.0, 0.03)}.items():
        res["VITAL"][s].update({"probe normal": res["VITAL"][s]["all"], "probe zero": z, "probe h0": 50.0,
                                "probe shuffled": sh, "p shuffled": p})
    probes = W.tables(res, {m: 0.0 for m in range(1, 5)}, None, SimpleNamespace(lr=1e-3, lr_k0=3e-4, moves=4))
    assert "lr 0.001, K = 0 arm 0.0003." in probes
    assert "| shuffled | 82.0 ± 2.8 | -5.0 | 80.0 / 84.0 |" in probes and "| zero | 35.0 ± 7.1 | -52.0 |" in probes
    assert "per seed: 0.0001 / 0.03." in probes
    assert "| blind (the most common end cell) | 50.0 | 47.0 | 38.0 | 38.0 | | |\n" in md
    assert "text window" not in probes
    for s, w in {0: (100, 100, 90, 70, 90), 1: (100, 100, 80, 60, 85)}.items():
        res["VITAL"][s].update({f"window {c}": v for c, v in zip([1, 2, 3, 4, "all"], w)})
    window = W.tables(res, {m: 0.0 for m in range(1, 5)}, None, SimpleNamespace(lr=1e-3, lr_k0=None, moves=4))
    assert "| 4 | 65.0 ± 7.1 | 70.0 / 60.0 |" in window.split("text window state each move")[1]
    assert "visual window point" not in window
    for s, hits in {0: (90.0, 80.0), 1: (70.0, 84.0)}.items():  # pointing.json as evaluate.py writes it
        res["VITAL"][s].update({f"pointing step {k}": v for k, v in enumerate(hits, 1)},
                               **{"pointing best": max(hits), "pointing chance": 10.0 + s, "pointing ceiling": 99.0})
    point = W.tables(res, {m: 0.0 for m in range(1, 5)}, None, SimpleNamespace(lr=1e-3, lr_k0=None, moves=4))
    point = point.split("visual window point at the lesion step k reads?")[1]
    assert "| hit rate (%) | 80.0 ± 14.1 | 82.0 ± 2.8 | 87.0 ± 4.2 | 10.5 | 99.0 ± 0.0 |" in point
    assert "Best step's hit rate per seed: 90.0 / 84.0." in point
    # 1-5 moves: a pooled '4-5' column, a '4-5' row of each difference and the blind row as wide as the table
    five = {a: {s: {**{k: x for k, x in r.items() if not str(k).startswith("window")}, 5: r[4] - 10,
                    "deep": r[4] - 5} for s, r in v.items()} for a, v in res.items()}
    md5 = W.tables(five, {m: 0.0 for m in range(1, 6)}, None, SimpleNamespace(lr=1e-3, lr_k0=None, moves=5))
    assert "| arm | 1 move | 2 moves | 3 moves | 4 moves | 5 moves | 4-5 moves | all | all, per seed |" in md5
    assert "| 4-5 | +23.0 | 5.4 | yes | yes | +30.0 / +16.0 |" in md5.split("VITAL minus K=0")[1]
    assert "| blind (the most common end cell) | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | | | |\n" in md5


def test_state_probe_tables(tmp_path):
    """diagnose.py --walk's JSON flattened (state_probes) and tabled by seed, worked out by hand."""
    def probes(seed, loop):
        end = {str(m): dict(h=[10.0 * m + seed] + [0.0] * loop, findings_linear=70.0, majority=40.0 + m, n_test=9)
               for m in range(1, 6)}
        after = {str(j): dict(h=[50.0 - j] + [60.0 + j + seed] * loop, findings_linear=66.0, majority=20.0)
                 for j in range(1, 6)}
        wp = dict(end=end, after_move=after, brightness=dict(h=[99.0 + seed] + [0.0] * loop, majority=50.0))
        path = tmp_path / f"{seed}_{loop}.json"
        path.write_text(json.dumps({"vital" if loop else "k0": wp}))
        return W.state_probes(str(path))
    k0 = probes(0, 0)
    assert k0["end h0 4"] == 40.0 and k0["end h0 deep"] == 45.0 and k0["end bits deep"] == 70.0
    assert k0["end majority deep"] == 44.5 and k0["brightness h0"] == 99.0 and "move 1 h1" not in k0
    vital = probes(1, 5)
    assert vital["move 3 h0"] == 47.0 and vital["move 3 h3"] == 64.0 and vital["move 3 majority"] == 20.0
    row = {m: 50.0 for m in [1, 2, 3, 4, 5, "deep", "all"]}
    res = {"VITAL": {s: {**row, **probes(s, 5)} for s in (0, 1)}, "K=0": {s: {**row, **probes(s, 0)} for s in (0, 1)}}
    md = W.tables(res, {m: 0.0 for m in range(1, 6)}, None, SimpleNamespace(lr=1e-3, lr_k0=None, moves=5))
    one = md.split("Does one pass hold the answer?")[1].split("Does latent step j")[0]
    assert "| 4 | 40.5 ± 0.7 | 70.0 | 44.0 |" in one and "| 4-5 | 45.5 ± 0.7 | 70.0 | 44.5 |" in one
    assert "mean of the nine cells): 99.5 ± 0.7%." in one
    assert "| 2 | 48.0 ± 0.0 | 62.5 ± 0.7 | 66.0 | 20.0 |" in md.split("Does latent step j hold move j?")[1]


def test_curriculum_phases():
    """The phases each run trains: 3-phase as the demo; stepwise adds one move per phase, skips the phases whose
    cap already admits every walk and warm-starts its last phase from the last one it ran; its files carry the name."""
    args = lambda *a: W.get_args(["--moves", *a])
    assert W.phases(args("4")) == [(1, 4, None), (2, 2, None), (3, 3, None)] and W.tag(args("4")) == ""
    assert W.phases(args("6", "--curriculum", "stepwise")) == [(1, 4, None), (2, 2, None), (3, 2, None),
                                                               (4, 2, None), (5, 2, None), (6, 3, None)]
    assert W.phases(args("4", "--curriculum", "stepwise")) == [(1, 4, None), (2, 2, None), (3, 2, None), (6, 3, 3)]
    assert W.tag(args("4", "--curriculum", "stepwise")) == "_stepwise"
    # the order question: a step per lesion read, so its phases are the walk's
    order = lambda *a: args(*a, "--task", "order", "--curriculum", "stepwise")
    assert W.phases(order("3")) == W.phases(args("3", "--curriculum", "stepwise")) == [(1, 4, None), (2, 2, None),
                                                                                      (6, 3, 2)]
    assert W.phases(args("4", "--task", "order")) == W.phases(args("4"))
    with pytest.raises(SystemExit):  # no phase to add a move to
        args("1", "--curriculum", "stepwise")


def test_pointing_json_flattened(tmp_path):
    path = tmp_path / "pointing.json"
    path.write_text(json.dumps(dict(steps=[dict(k=1, hit_rate=50.0, n=4), dict(k=2, hit_rate=75.0, n=2)],
                                    best_hit_rate=75.0, chance=12.5, ceiling=None)))
    assert W.pointing(str(path)) == {"pointing step 1": 50.0, "pointing step 2": 75.0, "pointing best": 75.0,
                                     "pointing chance": 12.5}


def test_lambda_sem_names_the_runs_it_changes():
    """--lambda-sem changes the arms with a decoder: their folders carry it, the K = 0 runs (no decoder) and the
    task-only arm (its own λ_sem 0) are shared with the paper's λ_sem."""
    a = W.get_args(["--task", "order", "--curriculum", "stepwise", "--lambda-sem", "10"])
    assert {arm: W.tag(a, arm) for arm in W.ARMS} == {"VITAL": "_stepwise_sem10", "K=0": "_stepwise",
                                                      "pause": "_stepwise_sem10", "task-only": "_stepwise"}
    assert W.tag(a) == "_stepwise_sem10"  # the results file and demo/*.md
    assert {W.tag(W.get_args([]), arm) for arm in W.ARMS} == {""}


def test_lambda_sem_reaches_train_py_of_the_decoder_arms_only(tmp_path, monkeypatch):
    """The commands one_run would run (recorded, not run): every train.py call of VITAL and pause gets
    --lambda-sem 10, the K = 0 and task-only arms keep theirs; VITAL alone gets the pointing game at its own K."""
    cmds = []
    monkeypatch.setattr(W, "sh", lambda cmd, env, log: cmds.append(cmd))
    a = W.get_args(["--task", "order", "--curriculum", "stepwise", "--lambda-sem", "10", "--out", str(tmp_path)])
    for arm in W.ARMS:
        cmds.clear()
        W.train_run(a, arm, 0, {})
        W.evaluate_run(a, arm, 0, {})
        trains = [c for c in cmds if c[1] == "train.py"]
        assert len(trains) == len(W.phases(a))
        sems = {tuple(c[i + 1] for i, x in enumerate(c) if x == "--lambda-sem") for c in trains}
        assert sems == {("10",) if arm in ("VITAL", "pause") else ("0",) if arm == "task-only" else ()}
        folder = os.path.join(str(tmp_path), f"{arm.replace('=', '')}_lr0.001{W.tag(a, arm)}", "s0")
        assert {c[c.index("--out") + 1] for c in trains} == {folder}
        pointing = [c for c in cmds if c[1] == "evaluate.py" and "--pointing" in c]
        assert len(pointing) == (arm == "VITAL")
        assert all(c[c.index("--k") + 1] == "sample" for c in pointing)


def test_readout_reaches_train_py_of_the_arms_that_loop(tmp_path, monkeypatch):
    """--readout cache: VITAL, pause and task-only train with it and their folders carry _readcache; the K = 0 runs
    (nothing to read out) are shared with the paper's read-out and get no flag."""
    a = W.get_args(["--task", "order", "--curriculum", "stepwise", "--lambda-sem", "10", "--readout", "cache",
                    "--out", str(tmp_path)])
    assert {arm: W.tag(a, arm) for arm in W.ARMS} == {
        "VITAL": "_stepwise_sem10_readcache", "K=0": "_stepwise", "pause": "_stepwise_sem10_readcache",
        "task-only": "_stepwise_readcache"}
    assert train_flags(monkeypatch, a, "--readout") == {arm: {() if arm == "K=0" else ("cache",)} for arm in W.ARMS}


def train_flags(monkeypatch, a, flag):
    """{arm: the values `flag` takes in each train.py call one_run would make (recorded, not run)}."""
    cmds, out = [], {}
    monkeypatch.setattr(W, "sh", lambda cmd, env, log: cmds.append(cmd))
    for arm in W.ARMS:
        cmds.clear()
        W.train_run(a, arm, 0, {})
        W.evaluate_run(a, arm, 0, {})
        out[arm] = {tuple(c[i + 1] for i, x in enumerate(c) if x == flag) for c in cmds if c[1] == "train.py"}
    return out


def test_lambda_vis_reaches_train_py_of_the_arms_with_a_visual_projector(tmp_path, monkeypatch):
    """--lambda-vis 5: VITAL and pause train with it and their folders carry _vis5; the K = 0 arm (no projector) gets
    no flag and task-only keeps its own 0, both sharing their runs; without the flag VITAL and pause train at 1."""
    for argv, want in (([], "1"), (["--lambda-vis", "5"], "5")):
        a = W.get_args(["--task", "order", "--curriculum", "stepwise", "--lambda-sem", "10", "--out", str(tmp_path)]
                       + argv)
        vis = "_vis5" if argv else ""
        assert {arm: W.tag(a, arm) for arm in W.ARMS} == {
            "VITAL": f"_stepwise_sem10{vis}", "K=0": "_stepwise", "pause": f"_stepwise_sem10{vis}",
            "task-only": "_stepwise"}
        assert train_flags(monkeypatch, a, "--lambda-vis") == {
            "VITAL": {(want,)}, "pause": {(want,)}, "K=0": {()}, "task-only": {("0",)}}


def test_walked_or_recalled(tmp_path):
    """memory_groups / by_memory / the table: which 4+ move test items a train item shares the nine findings and
    moves with, a lookup table's accuracy on each group, and each arm's, worked out by hand."""
    dark, light = [["darker"] * 3] * 3, [["brighter"] * 3] * 3
    item = lambda i, split, grid, m, a: dict(id=i, split=split, latent_steps=m, answer=a,
                                              meta=dict(drawn=dict(grid=grid, hops=m)))
    samples = [item("tr1", "train", dark, 4, "A"), item("tr2", "train", dark, 4, "A"),
               item("tr3", "train", light, 4, "B"), item("tr4", "train", light, 5, "C"), item("va", "val", dark, 5, "Z"),     # val: not recalled
               item("t1", "test", dark, 4, "A"),     # seen, the lookup recalls A: right
               item("t2", "test", light, 4, "A"),    # seen (light, 4 -> B): wrong
               item("t3", "test", dark, 5, "C"),     # unseen (only val has dark, 5): 5 moves' commonest C: right
               item("t4", "test", light, 3, "B")]    # 3 moves: not a multi-hop item
    group, lookup = W.memory_groups(samples)
    assert group == {"t1": "seen", "t2": "seen", "t3": "unseen"} and lookup == {"seen": (1, 2), "unseen": (1, 1)}
    pred = tmp_path / "predictions.jsonl"
    pred.write_text("".join(json.dumps(dict(id=i, correct=c)) + "\n"
                            for i, c in [("t1", True), ("t2", True), ("t3", False), ("t4", True)]))
    assert W.by_memory(str(pred), samples, group) == {"memory seen": 100.0, "memory unseen": 0.0}
    res = {"VITAL": {0: {"memory seen": 100.0, "memory unseen": 0.0}, 1: {"memory seen": 50.0, "memory unseen": 100.0}}}
    md = "\n".join(W.memory_table(res, lambda a, c: [res[a][s][c] for s in sorted(res[a])], lookup,
                                  SimpleNamespace(moves=6)))
    assert "| pattern seen in train (2 items) | unseen (1 items) |" in md
    assert "| VITAL | 75.0 ± 35.4 | 50.0 ± 70.7 | +25.0 |" in md
    assert "| lookup table (the train items' end, else their most common end) | 50.0 | 100.0 | -50.0 |" in md
    assert W.memory_table({"VITAL": {0: {}}}, None, lookup, SimpleNamespace(moves=6)) == []  # runs without it


def test_the_pointing_bound_sentence(tmp_path):
    """walk.py quotes demo/pointing_bound.py's oracle and per-step ceilings under the pointing table, step by step."""
    os.makedirs(tmp_path / "data")
    (tmp_path / "data" / "pointing_bound.json").write_text(json.dumps(dict(n_steps=7, by_step={
        "1": dict(ceiling=80.0, oracle=40.0, n=4), "2": dict(ceiling=60.0, oracle=20.5, n=3)})))
    line = W.pointing_bound(W.get_args(["--out", str(tmp_path)]))
    assert "scores 40.0 / 20.5% at steps 1-2" in line and "themselves 80.0 / 60.0%" in line and "7 test steps" in line
    assert W.pointing_bound(W.get_args(["--out", str(tmp_path / "none")])) == ""


def test_the_positional_encoder_reaches_the_arms_with_a_visual_projector(tmp_path, monkeypatch):
    """--encoder positional: a stage makes the encoder (embedded/tiny.py --position-scale 3) and the data folder holds
    its ROI features (OUT/data_positional, the only one made); every arm trains and evaluates on it, VITAL and pause
    carry _positional, K = 0 and task-only (no L_vis: they read no ROI feature) share their runs with the shipped
    encoder's; the pointing bound is read from it."""
    a = W.get_args(["--task", "order", "--curriculum", "stepwise", "--encoder", "positional", "--out", str(tmp_path)])
    cmds = [c for c, _ in W.stages(a)]
    enc = os.path.join(str(tmp_path), "positional_encoder")
    assert [W.PY, "embedded/tiny.py", enc, "--position-scale", "3"] in cmds
    prep = [c for c in cmds if c[1] == "prepare_data.py" and "--order-hops" in c and "4" in c]
    assert [c[c.index("--out") + 1] for c in prep] == [str(tmp_path / "data_positional")]
    rois = {c[c.index("--out") + 1]: c[c.index("--encoder") + 1] for c in cmds if c[1] == "extract_roi.py"}
    assert rois == {str(tmp_path / "data_positional" / "roi.safetensors"): os.path.join(enc, "encoder")}
    assert [W.PY, "demo/pointing_bound.py", "--data", str(tmp_path / "data_positional")] in cmds
    assert {arm: W.tag(a, arm) for arm in W.ARMS} == {
        "VITAL": "_stepwise_positional", "K=0": "_stepwise", "pause": "_stepwise_positional", "task-only": "_stepwise"}
    ran = []
    monkeypatch.setattr(W, "sh", lambda cmd, env, log: ran.append(cmd))
    for arm in W.ARMS:
        ran.clear()
        W.train_run(a, arm, 0, {})
        W.evaluate_run(a, arm, 0, {})
        datas = {c[c.index("--data") + 1] for c in ran if "--data" in c}
        assert datas == {str(tmp_path / "data_positional")}, arm
    default = W.get_args(["--task", "order", "--out", str(tmp_path)])
    assert not any("--position-scale" in c for c, _ in W.stages(default))
    assert W.data_dir(default) == str(tmp_path / "data") and W.tag(default) == ""
    rois = {c[c.index("--out") + 1]: c[c.index("--encoder") + 1] for c, _ in W.stages(default)
            if c[1] == "extract_roi.py"}
    assert rois == {str(tmp_path / "data" / "roi.safetensors"): "embedded/pretrained/encoder_pretrained"}


def test_n_sets_the_items_of_both_data_folders_and_a_folder_of_another_n_is_refused(tmp_path):
    """--n reaches prepare_data.py of OUT/data and of the positional folder (the same items in both); a data folder
    already made with another --n is named in the error instead of being reused."""
    a = W.get_args(["--task", "order", "--n", "3000", "--encoder", "positional", "--out", str(tmp_path)])
    prep = [c for c, _ in W.stages(a) if c[1] == "prepare_data.py" and "--order-hops" in c and "4" in c]
    assert [c[c.index("--n") + 1] for c in prep] == ["3000"]
    assert W.check_data_size(a) is None  # nothing made yet
    (tmp_path / "data_positional").mkdir()
    stats = dict(samples=6000, by_question_type={"order": 6000}, by_K={str(k): 1500 for k in range(1, 5)})
    (tmp_path / "data_positional" / "stats.json").write_text(json.dumps(stats))
    why = W.check_data_size(a)
    assert str(tmp_path / "data_positional" / "stats.json") in why and "6000" in why and "--n 3000" in why
    assert W.check_data_size(W.get_args(["--task", "order", "--encoder", "positional", "--out", str(tmp_path)])) is None
    # the walk's folder, or one of fewer moves, is not reused for the order question either
    for other in (dict(stats, by_question_type={"walk": 6000}), dict(stats, by_K={"1": 3000, "2": 3000})):
        (tmp_path / "data_positional" / "stats.json").write_text(json.dumps(other))
        assert "pass another --out" in W.check_data_size(
            W.get_args(["--task", "order", "--encoder", "positional", "--out", str(tmp_path)]))


def test_the_order_question_is_read_against_its_record():
    """--demo: the one seed of the order question, figure by figure, against the record's seeds: mean ± std, range,
    and whether it falls inside; the margin is VITAL minus the K = 0 model seed by seed."""
    record = {"machine": "m", "runs": {
        "VITAL": {"1": {"multi": 70.0, "window multi": 100.0, "pointing step 1": 90.0},
                  "0": {"multi": 40.0, "window multi": 50.0, "pointing step 1": 80.0}},
        "K=0": {"0": {"multi": 20.0}, "1": {"multi": 18.0}}}}
    mine = {"VITAL": {"multi": 75.0, "window multi": 100.0, "pointing step 1": 85.0}, "K=0": {"multi": 19.0}}
    rows = {r.split(" | ")[0][2:]: r.split(" | ")[1:] for r in W.against_record(mine, record, 3) if r.startswith("| ")}
    assert rows["VITAL, accuracy on 2-4 lesions"] == ["75.0", "55.0 ± 21.2", "40.0 - 70.0", "no |"]
    assert rows["K = 0 model, accuracy on 2-4 lesions"] == ["19.0", "19.0 ± 1.4", "18.0 - 20.0", "yes |"]
    # the record's margins are 40 - 20 = 20 (seed 0) and 70 - 18 = 52 (seed 1): seeds are paired, not sorted
    assert rows["VITAL minus the K = 0 model, 2-4 lesions"] == ["56.0", "36.0 ± 22.6", "20.0 - 52.0", "no |"]
    assert rows["VITAL's pointing game, step 1"][-1] == "yes |"
    assert "VITAL's pointing game, step 2" not in rows  # a figure the record lacks is left out, not invented
    assert "2 seeds of the record" in " ".join(W.against_record(mine, record, 3))


def test_demo_is_the_records_command_for_one_seed(tmp_path):
    """--demo runs the order record's command (the stated question, the positional encoder, λ_sem 10, λ_vis 5,
    stepwise) for VITAL and K = 0 (the record may hold more arms) and one seed, without rewriting the record; flags
    after it override; its tiny models go under --out."""
    a = W.get_args(["--demo", "--out", str(tmp_path)])
    record = json.load(open(W.DEMO_RECORD))
    for key in ("task", "moves", "curriculum", "lr_k0", "lambda_sem", "lambda_vis", "question", "encoder", "words"):
        assert getattr(a, key) == record_args(record)[key], key
    assert a.arms == ["VITAL", "K=0"] and set(a.arms) <= set(record_args(record)["arms"])  # the record may hold more
    assert a.seeds == [0] and a.no_record and a.models == str(tmp_path / "models_words")
    assert W.get_args(["--demo", "--seeds", "3"]).seeds == [3]
    assert W.cell_of(0, 0) == "upper left" and W.cell_of(1, 1) == "center" and W.cell_of(2.9, 1) == "middle right"


def record_args(record):
    """The settings in the record's command line."""
    return vars(W.get_args(record["command"].split()[2:]))


def test_the_demo_graph_starts_vital_before_what_only_the_k0_model_and_the_tables_read(tmp_path):
    """--demo's stages and runs as run_graph nodes: the runs wait only for the models, the stand-in, the data's ROI
    features and the perception check, VITAL's before the K = 0 model's; the stand-in's own answers and the pointing
    bound (the tables read them) come last; each stage of stages() is a node once; the evaluation, the state probes
    and the explanation wait for the training only."""
    a = W.get_args(["--demo", "--out", str(tmp_path)])
    nodes = W.graph(a, {}, explain=lambda: None)
    names, deps = [n for n, _, _ in nodes], {n: d for n, _, d in nodes}
    pos = str(tmp_path / "data_positional")
    assert set(deps["train VITAL s0"]) == set(deps["train K=0 s0"]) == {"models", "stand-in", f"roi {pos}",
                                                                        "perception check"}
    assert deps["perception check"] == ["perception"] and deps[f"roi {pos}"] == [f"data {pos}", "encoder"]
    assert (names.index(f"roi {pos}") < names.index("perception check") < names.index("train VITAL s0")
            < names.index("train K=0 s0") < names.index("alone"))
    assert not any(n.startswith("data ") and n != f"data {pos}" for n in names)  # one data folder
    assert names.index("train K=0 s0") < names.index("pointing bound")
    assert all(deps[f"{what} VITAL s0"] == ["train VITAL s0"] for what in ("evaluate", "state probes"))
    assert deps["explain"] == ["train VITAL s0"]
    stage_names = [n for n, *_ in W.named_stages(a)]
    assert len(stage_names) == len(set(stage_names)) and sorted(set(names) & set(stage_names)) == sorted(stage_names)
    assert [(c, d) for _, c, d, _ in W.named_stages(a)] == W.stages(a)


def test_epochs_sets_each_phase_and_names_every_arms_runs(tmp_path, monkeypatch):
    """--epochs 2 2 1 2: the four phases of stepwise to 4 moves train 2, 2, 1 and 2 epochs in every arm, whose
    folders carry _ep2-2-1-2; a count that is not one per phase is refused with the count it needs."""
    args = ["--task", "order", "--curriculum", "stepwise", "--out", str(tmp_path)]
    a = W.get_args(args + ["--epochs", "2", "2", "1", "2"])
    assert [(p, e) for p, e, _ in W.phases(a)] == [(1, 2), (2, 2), (3, 1), (6, 2)]
    assert [e for _, e, _ in W.phases(W.get_args(args))] == [4, 2, 2, 3]  # the curriculum's own
    assert train_flags(monkeypatch, a, "--epochs") == {arm: {("2",), ("1",)} for arm in W.ARMS}
    assert {W.tag(a, arm) for arm in ("K=0", "task-only")} == {"_stepwise_ep2-2-1-2"}
    with pytest.raises(SystemExit):
        W.get_args(args + ["--epochs", "2", "2"])


def test_every_stage_and_run_gets_one_thread_whatever_the_machine(tmp_path, monkeypatch):
    """The records were trained on one thread per run, and two threads train other weights: on a 16-core machine
    too, the graph's stages and runs get OMP_NUM_THREADS=1."""
    seen = []

    class Stop(Exception):
        pass

    def fake_graph(args, env, explain=None):
        seen.append(env["OMP_NUM_THREADS"])
        raise Stop
    monkeypatch.setattr(W.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(W, "copy_stand_in", lambda args: False)
    monkeypatch.setattr(W, "graph", fake_graph)
    with pytest.raises(Stop):
        W.main(["--task", "order", "--out", str(tmp_path)])
    assert seen == ["1"]


def test_words_gives_the_models_the_stand_in_and_every_run_their_own_folders(tmp_path, monkeypatch):
    """--words order: the models stage passes it to embedded/tiny.py, the models, the stand-in and its answers get
    folders of their own (another tokenizer's weights), every arm's runs carry _words and train from that stand-in;
    the data folders are shared (prepare_data.py reads no tokenizer); models of the other words are refused by name."""
    a = W.get_args(["--task", "order", "--words", "order", "--out", str(tmp_path)])
    cmds = {n: c for n, c, _, _ in W.named_stages(a)}
    assert cmds["models"][-2:] == ["--words", "order"] and a.models == "runs/walk/models_words"
    assert cmds["stand-in"][cmds["stand-in"].index("--out") + 1] == str(tmp_path / "pretrain_words")
    assert W.stand_in_alone(a) == str(tmp_path / "stand_in_alone_words")
    assert W.perception_dir(a) == str(tmp_path / "stand_in_perception_words")
    assert W.data_dir(a) == str(tmp_path / "data")
    assert {W.tag(a, arm) for arm in W.ARMS} == {"_words"}
    ran = []
    monkeypatch.setattr(W, "sh", lambda cmd, env, log: ran.append(cmd))
    W.train_run(a, "VITAL", 0, {})
    assert {c[c.index("--backbone") + 1] for c in ran} == {str(tmp_path / "pretrain_words" / "phase1" / "backbone")}
    assert "_words" in ran[0][ran[0].index("--out") + 1]
    default = W.get_args(["--task", "order", "--out", str(tmp_path)])
    assert "--words" not in {n: c for n, c, _, _ in W.named_stages(default)}["models"]
    assert W.stand_in_dir(default) == str(tmp_path / "pretrain") and W.tag(default) == ""
    # models made with the other tokenizer: refused, naming the folder and its words
    mine = W.get_args(["--task", "order", "--words", "order", "--models", str(tmp_path / "m"), "--out", str(tmp_path)])
    assert W.check_models(mine) == ""  # not made yet
    (tmp_path / "m" / "backbone").mkdir(parents=True)
    (tmp_path / "m" / "backbone" / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 911}}))
    why = W.check_models(mine)
    assert str(tmp_path / "m" / "backbone" / "config.json") in why and "--words tiny" in why and "1072" in why
