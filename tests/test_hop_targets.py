"""A visual target per hop (train.py --visual-target hop): a walk item names, for every chain step, the lesion
that move lands on (samples.jsonl step_masks, prepare_data.py); extract_roi.py pools each into roi_steps; L_vis
regresses step k to its own row; the pointing game scores step k against its own mask (tests/test_evaluate.py).
The shared target (the paper's default) is untouched."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import extract_roi as ER
import model as M
import prepare_data as P
import train
from embedded.phantom import CELLS, cell_name
from embedded.tiny import make_tiny
from pipeline.training_data import read_roi, read_samples

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """12 walks of 1-3 moves from the upper left cell, their ROI features from the tiny encoder."""
    base = tmp_path_factory.mktemp("hop")
    models, data = make_tiny(str(base / "models")), str(base / "data")
    P.main(["--source", "phantom", "--out", data, "--n", "12", "--image-size", "96", "--walk-hops", "3",
            "--walk-start", "upper left", "--workers", "1"])
    ER.main(["--samples", f"{data}/samples.jsonl", "--encoder", f"{models}/encoder",
             "--out", f"{data}/roi.safetensors", "--tau", "0", "--quiet"])
    with open(f"{data}/samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    return dict(models=models, data=data, samples=samples)


def centre(path):
    ys, xs = np.nonzero(np.asarray(Image.open(path)) > 0)
    return ys.mean() / 96, xs.mean() / 96


def test_every_step_names_the_lesion_its_move_lands_on(walk):
    for s in walk["samples"]:
        path = s["meta"]["drawn"]["path"]
        assert len(s["step_masks"]) == s["latent_steps"] == len(path) - 1 and s["step_masks"][-1] == s["mask"]
        for k, m in enumerate(s["step_masks"]):
            r, c = {cell_name(x): x for x in CELLS}[path[k + 1]]      # step k + 1 lands on path[k + 1]
            y, x = centre(os.path.join(walk["data"], m))
            assert abs(y - (r + 0.5) / 3) < 0.06 and abs(x - (c + 0.5) / 3) < 0.06
            assert s["reasoning_chain"][k].endswith(f"to the {path[k + 1]} cell.")


def test_roi_steps_hold_each_steps_own_feature_padded_with_the_mask(walk):
    with safe_open(f"{walk['data']}/roi.safetensors", "pt") as f:
        ids = json.loads(f.metadata()["ids"])
        roi, steps, n = f.get_tensor("roi"), f.get_tensor("roi_steps"), f.get_tensor("n_steps")
    by_id = {s["id"]: s for s in walk["samples"]}
    assert steps.shape == (len(ids), 3, roi.shape[1]) and n.tolist() == [by_id[i]["latent_steps"] for i in ids]
    assert torch.allclose(steps.norm(dim=-1), torch.ones(steps.shape[:2]), atol=1e-5)
    moved = 0
    for row, sid in enumerate(ids):
        k = int(n[row])
        assert torch.equal(steps[row, k - 1], roi[row])               # the last move lands on the mask's lesion
        assert all(torch.equal(steps[row, j], roi[row]) for j in range(k, 3))  # padded with it
        path = by_id[sid]["meta"]["drawn"]["path"]
        for j in range(k - 1):                                         # another cell: another feature
            if path[j + 1] != path[-1]:
                assert not torch.allclose(steps[row, j], roi[row], atol=1e-4)
                moved += 1
    assert moved > 0
    records = read_samples(f"{walk['data']}/samples.jsonl")
    hop, _, _ = read_roi(f"{walk['data']}/roi.safetensors", records, "hop")
    shared, _, _ = read_roi(f"{walk['data']}/roi.safetensors", records, "shared")
    assert hop.shape == (len(records), 3, roi.shape[1]) and shared.shape == (len(records), roi.shape[1])


def test_visual_targets_slice_and_pad_a_target_per_step():
    roi = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    assert torch.equal(M.visual_targets(roi, None, 2), roi[:, :2])
    five = M.visual_targets(roi, None, 5)
    assert five.shape == (2, 5, 2) and torch.equal(five[:, :3], roi) and torch.equal(five[:, 4], roi[:, 2])
    flat = roi[:, 0]
    assert torch.equal(M.visual_targets(flat, None, 3), flat[:, None].expand(-1, 3, -1))  # shared: unchanged


def test_training_regresses_step_k_to_its_own_target(walk, tmp_path, monkeypatch):
    seen, forward = [], M.VITAL.forward

    def spy(self, batch, K, per_step_target=False, vis_all_steps=False):
        seen.append((K, batch["roi"].clone()))
        return forward(self, batch, K, per_step_target, vis_all_steps)
    monkeypatch.setattr(M.VITAL, "forward", spy)
    models = walk["models"]
    argv = ["--data", walk["data"], "--backbone", f"{models}/backbone", "--decoder", f"{models}/decoder",
            "--lora-r", "4", "--lora-alpha", "8", "--batch-size", "4", "--epochs", "1", "--phase", "3",
            "--init", "none", "--depth", "own"]
    train.main(argv + ["--out", str(tmp_path / "hop"), "--visual-target", "hop"])
    with safe_open(f"{walk['data']}/roi.safetensors", "pt") as f:
        bank = f.get_tensor("roi_steps")
    rows = {tuple(r.flatten().tolist()) for r in bank}
    assert seen and all(roi.shape[1:] == bank.shape[1:] and tuple(roi[0].flatten().tolist()) in rows
                        for _, roi in seen)
    cfg = json.load(open(tmp_path / "hop" / "phase3" / "config.json"))
    assert cfg["args"]["visual_target"] == "hop" and cfg["lvis_baselines"]["mean"] < cfg["lvis_baselines"]["zero"]
    seen.clear()
    train.main(argv + ["--out", str(tmp_path / "shared")])  # the default: one target per item
    assert seen and all(roi.ndim == 2 for _, roi in seen)


def test_hop_targets_need_the_walks_step_masks(walk, tmp_path):
    from safetensors.torch import save_file
    with safe_open(f"{walk['data']}/roi.safetensors", "pt") as f:
        meta, roi = f.metadata(), f.get_tensor("roi")
    save_file({"roi": roi}, str(tmp_path / "roi.safetensors"), metadata=meta)  # a bank without roi_steps
    records = read_samples(f"{walk['data']}/samples.jsonl")
    with pytest.raises(Exception, match=r"roi.safetensors: no tensor 'roi_steps' \(needed by --visual-target hop"):
        read_roi(str(tmp_path / "roi.safetensors"), records, "hop")
    bad = tmp_path / "bad.jsonl"
    s = dict(walk["samples"][0], step_masks="masks/x.png")
    bad.write_text(json.dumps(s) + "\n")
    rows, _, failed = ER.read_units(str(bad))
    assert not rows and failed[0]["line"] == 1 and "'step_masks' must be a list of mask paths" in failed[0]["reason"]


def test_pointing_bound_plays_each_step_against_its_lesion(walk, tmp_path):
    """demo/pointing_bound.py: step k's lesion is keyed by the cell its mask lies in (the cell move k lands on) and
    that lesion's look; every test step is played once, per step and by how many lesions share the look."""
    from demo import pointing_bound as PB
    data = str(tmp_path / "data")  # the fixture's walks, half of them in the test split
    P.main(["--source", "phantom", "--out", data, "--n", "12", "--image-size", "96", "--walk-hops", "3",
            "--walk-start", "upper left", "--workers", "1", "--test-frac", "0.5", "--val-frac", "0"])
    ER.main(["--samples", f"{data}/samples.jsonl", "--encoder", f"{walk['models']}/encoder",
             "--out", f"{data}/roi.safetensors", "--tau", "0", "--quiet"])
    samples = [json.loads(line) for line in open(f"{data}/samples.jsonl")]
    names = {cell_name(x): x for x in CELLS}
    for s in samples:
        grid = s["meta"]["drawn"]["grid"]
        for k, m in enumerate(s["step_masks"]):
            r, c = names[s["meta"]["drawn"]["path"][k + 1]]
            assert PB.lesion_key(data, s, m) == (f"{r},{c}", grid[r][c])
    res = PB.main(["--data", data, "--out", str(tmp_path / "pb.json")])
    test = [s for s in samples if s["split"] == "test"]
    assert test and res["n_items"] == len(test) and res["n_steps"] == sum(s["latent_steps"] for s in test)
    assert sum(v["n"] for v in res["by_step"].values()) == sum(v["n"] for v in res["ceiling_by_same_look"].values()) \
        == res["n_steps"]
    assert 0 < res["chance"] < 100 and 0 <= res["oracle"] <= 100 and 0 <= res["ceiling"] <= 100
    assert json.load(open(tmp_path / "pb.json"))["ceiling"] == res["ceiling"]
