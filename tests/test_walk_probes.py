"""demo/diagnose.py --walk: ridge probes of the end cell, each move's cell and the lesions' brightness from a
model's states, checked on planted states (a state that holds a label reads it; one that holds noise reads
near the majority rate)."""
import pytest
import torch

from demo import diagnose as D
from embedded.phantom import CELLS, cell_name


def walks(n, seed=0):
    """n fixed-start walks of 1-6 moves under the rule: darker -> one cell right, brighter -> one down."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        grid = [["darker" if torch.rand(1, generator=g).item() < 0.5 else "brighter" for _ in range(3)]
                for _ in range(3)]
        hops, (r, c) = 1 + i % 6, (0, 0)
        path = [cell_name((r, c))]
        for _ in range(hops):
            r, c = (r, (c + 1) % 3) if grid[r][c] == "darker" else ((r + 1) % 3, c)
            path.append(cell_name((r, c)))
        rows.append(dict(split="test" if i % 5 == 0 else "train", meta=dict(drawn=dict(grid=grid, hops=hops, path=path))))
    return rows


def onehot_cell(name):
    return torch.nn.functional.one_hot(torch.tensor([cell_name(c) for c in CELLS].index(name)), 9).float()


def test_planted_states_read_and_noise_does_not():
    rows = walks(1800)
    g = torch.Generator().manual_seed(1)
    noise = lambda: 0.1 * torch.randn(len(rows), 32, generator=g)
    # h_0 holds the nine lesions' brightness and the cell after move 1 (what one pass reads), no more;
    # h_1 holds the end cell
    bright = torch.tensor([[float(x == "darker") for row in r["meta"]["drawn"]["grid"] for x in row] for r in rows])
    move1 = torch.stack([onehot_cell(r["meta"]["drawn"]["path"][1]) for r in rows])
    end = torch.stack([onehot_cell(r["meta"]["drawn"]["path"][-1]) for r in rows])
    h0 = noise() + torch.cat([bright, move1, torch.zeros(len(rows), 14)], 1)
    h1 = noise() + torch.cat([end, torch.zeros(len(rows), 23)], 1)
    wp = D.walk_probes(torch.stack([h0, h1], 1), rows)
    assert sorted(wp["end"]) == [1, 2, 3, 4, 5, 6] and sorted(wp["after_move"]) == [1, 2, 3, 4, 5, 6]
    assert wp["brightness"]["h"][0] > 95 and wp["brightness"]["h"][1] < 70     # noise: near the 50% majority
    assert abs(wp["brightness"]["majority"] - 50) < 10
    assert wp["after_move"][1]["h"][0] > 95 and wp["after_move"][1]["findings_linear"] > 95  # one move: linear
    assert wp["after_move"][3]["findings_linear"] < 90
    for m, v in wp["end"].items():
        assert v["h"][1] > 95                            # h_1 holds the end of every walk
        assert v["n_test"] == 60
        # h_0 holds the bits linearly, so it reads the end as well as the bits themselves do (within noise)
        assert abs(v["h"][0] - v["findings_linear"]) < 15, (m, v)
        if m >= 3:  # past two moves the end is not a linear function of the bits
            assert v["findings_linear"] < 90, (m, v)
    assert wp["end"][1]["h"][0] > 95                     # one move: the end is move 1's cell, which h_0 holds
    # a state of noise reads the end near its majority rate
    wp = D.walk_probes(noise()[:, None], rows)
    for v in wp["end"].values():
        assert v["h"][0] < v["majority"] + 20, v


def test_diagnose_walk_probes_a_checkpoints_own_states(tmp_path):
    """diagnose.py --walk end to end on tiny models: the K = 0 checkpoint is probed at h_0 only, a checkpoint
    with a loop at h_0..h_K (K = the longest walk); every move count with train and test items gets a row."""
    import json

    import prepare_data as P
    import train
    from embedded.tiny import make_tiny
    models, data = make_tiny(str(tmp_path / "models")), str(tmp_path / "data")
    P.main(["--source", "phantom", "--out", data, "--n", "40", "--image-size", "96", "--walk-hops", "2",
            "--walk-start", "upper left", "--workers", "1", "--test-frac", "0.3", "--val-frac", "0"])
    argv = ["--data", data, "--backbone", f"{models}/backbone", "--decoder", f"{models}/decoder", "--lora-r", "4",
            "--lora-alpha", "8", "--batch-size", "8", "--epochs", "1", "--phase", "3", "--init", "none",
            "--lambda-vis", "0"]
    train.main(argv + ["--out", str(tmp_path / "k0"), "--max-k", "0"])
    train.main(argv + ["--out", str(tmp_path / "vital"), "--depth", "own"])
    out = tmp_path / "probes.json"
    D.main(["--walk", "--data", data, "--k0", str(tmp_path / "k0" / "phase3"), "--ckpt",
            str(tmp_path / "vital" / "phase3"), "--out", str(out)])
    res = json.loads(out.read_text())
    assert len(res["k0"]["brightness"]["h"]) == 1 and len(res["vital"]["brightness"]["h"]) == 3
    assert sorted(res["k0"]["end"]) == ["1", "2"] and sorted(res["vital"]["after_move"]) == ["1", "2"]
    assert all(len(v["h"]) == 3 for v in res["vital"]["end"].values())
    (tmp_path / "six").mkdir()
    (tmp_path / "six" / "samples.jsonl").write_text(json.dumps(dict(question_type="shape")) + "\n")
    with pytest.raises(SystemExit, match="six/samples.jsonl has no walk items"):
        D.main(["--walk", "--data", str(tmp_path / "six"), "--k0", "x"])
