"""demo/walk.py: accuracy by number of moves, the blind level and the issue's test (>= 15 points and > 2 pooled
std), checked against numbers worked out by hand."""
import json
from types import SimpleNamespace

from demo import walk as W


def test_by_moves_and_blind(tmp_path):
    samples = [dict(id=f"t{i}", split="test", latent_steps=m, answer=a)
               for i, (m, a) in enumerate([(1, "x"), (1, "x"), (1, "y"), (2, "y"), (2, "z")])]
    samples.append(dict(id="tr", split="train", latent_steps=2, answer="y"))   # not a test item: not blind
    pred = tmp_path / "predictions.jsonl"
    pred.write_text("".join(json.dumps(dict(id=f"t{i}", correct=c)) + "\n"
                            for i, c in enumerate([True, False, True, True, False])))
    acc = W.by_moves(str(pred), samples)
    assert acc == {1: 100 * 2 / 3, 2: 50.0, "all": 60.0}
    assert W.blind(samples) == {1: 100 * 2 / 3, 2: 50.0}


def test_tables_by_hand():
    row = lambda a, b, c, d, e: dict(zip(W.MOVES + ["all"], (a, b, c, d, e)))
    res = {"VITAL": {0: row(100, 100, 80, 70, 88), 1: row(100, 100, 76, 66, 86)},
           "K=0": {0: row(100, 90, 60, 40, 72), 1: row(100, 94, 60, 50, 76)},
           "pause": {0: row(100, 100, 76, 66, 86), 1: row(100, 100, 76, 66, 86)}}
    md = W.tables(res, {1: 50.0, 2: 47.0, 3: 38.0, 4: 38.0}, {1: 100.0, 2: 100.0, 3: 0.0, 4: 0.0, "all": 50.0},
                  SimpleNamespace(lr=1e-3, lr_k0=None))
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
    probes = W.tables(res, {m: 0.0 for m in W.MOVES}, None, SimpleNamespace(lr=1e-3, lr_k0=3e-4))
    assert "lr 0.001, K = 0 arm 0.0003." in probes
    assert "| shuffled | 82.0 ± 2.8 | -5.0 | 80.0 / 84.0 |" in probes and "| zero | 35.0 ± 7.1 | -52.0 |" in probes
    assert "per seed: 0.0001 / 0.03." in probes
    assert "| blind (the most common end cell) | 50.0 | 47.0 | 38.0 | 38.0 |" in md
