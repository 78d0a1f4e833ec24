"""The command lines our users type, run exactly as typed from a clean folder:
    torchrun --nproc_per_node=6 train.py --phase 1      (then --phase 2; + --max-steps to keep CI short)
    python explain.py img.png "question"
with no --data: train.py makes the embedded default (embedded/default.py) and trains on it with 6 gloo
ranks; evaluate.py reads what it leaves; explain.py finds the newest checkpoint that has the scaffolds,
even when a newer K = 0 model sits beside it, and reads a 16-bit grey PNG and a JPEG of any size."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run"]  # the `torchrun` entry point, whatever PATH holds


def sh(cmd, cwd, env, check=True):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A clean folder, the embedded default in a fresh place, then the two training commands."""
    work = tmp_path_factory.mktemp("user")
    env = dict(os.environ, VITAL_DEMO_DIR=str(work / "demo"), OMP_NUM_THREADS="1")
    train = TORCHRUN + ["--nproc_per_node=6", f"{ROOT}/train.py"]
    p1 = sh(train + ["--phase", "1", "--max-steps", "2"], work, env)
    p2 = sh(train + ["--phase", "2", "--max-steps", "1"], work, env)
    return dict(work=work, env=env, out1=p1.stdout + p1.stderr, out2=p2.stdout + p2.stderr)


def test_torchrun_with_no_flags_trains_on_the_embedded_default(trained):
    work, demo = trained["work"], trained["work"] / "demo"
    assert "no --data: the embedded default" in trained["out1"]
    assert "making the embedded default" in trained["out1"]  # nothing was there: the demo's commands made it
    assert (demo / "models" / "backbone" / "config.json").is_file()
    assert (demo / "data" / "roi.safetensors").is_file()
    assert "x 6 ranks = 48" in trained["out1"]  # the global batch: 8 per device x 1 accum x 6 ranks
    cfg1 = json.load(open(work / "runs" / "vital" / "phase1" / "config.json"))
    assert cfg1["world_size"] == 6 and cfg1["step"] == 2 and cfg1["args"]["embedded"] is True
    assert cfg1["args"]["data"] == str(demo / "data")
    # the shipped pretrained stand-in (the fresh place had none yet); the embedded default then copies it next to
    # the data, with the pretrained encoder that made the ROI features, and the next command uses that copy
    shipped = os.path.join(ROOT, "embedded", "pretrained", "pretrain", "phase1", "backbone")
    assert cfg1["backbone_path"] == shipped
    assert (demo / "encoder_pretrained" / "pretrain.json").is_file()
    assert "making the embedded default" not in trained["out2"]  # made once, then reused
    assert "warm start from runs/vital/phase1" in trained["out2"]
    cfg2 = json.load(open(work / "runs" / "vital" / "phase2" / "config.json"))
    assert cfg2["init"] == "runs/vital/phase1" and cfg2["step"] == 1
    assert cfg2["backbone_path"] == str(demo / "pretrain" / "phase1" / "backbone")
    assert cfg2["arch"]["backbone"] == cfg1["arch"]["backbone"]  # the same weights: the warm start is allowed


def test_evaluate_reads_the_checkpoint(trained):
    work = trained["work"]
    sh([PY, f"{ROOT}/evaluate.py", "--ckpt", "runs/vital/phase2", "--data", str(work / "demo" / "data"),
        "--out", "eval", "--k", "4", "--limit", "6", "--max-new-tokens", "4"], work, trained["env"])
    preds = [json.loads(l) for l in open(work / "eval" / "predictions.jsonl")]
    assert len(preds) == 6 and all("correct" in r for r in preds)
    assert os.path.isfile(work / "eval" / "metrics.json")


def test_explain_as_typed_picks_the_checkpoint_with_scaffolds(trained):
    work, env = trained["work"], trained["env"]
    # a newer K = 0 model (no scaffolds) must not be picked
    sh([PY, f"{ROOT}/train.py", "--max-k", "0", "--out", "runs/k0", "--max-steps", "1"], work, env)
    grey16 = (np.random.default_rng(0).random((75, 131)) * 60000).astype(np.uint16)
    Image.fromarray(grey16).save(work / "img.png")
    rgb = (np.random.default_rng(1).random((50, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(work / "img.jpg")
    for img in ("img.png", "img.jpg"):
        p = sh([PY, f"{ROOT}/explain.py", img, "Where is the lesion?", "--max-new-tokens", "4",
                "--max-step-tokens", "4"], work, env)
        assert "using runs/vital/phase2: the newest checkpoint under 'runs/' with the scaffolds" in p.stdout
        assert "passed over newer ones without scaffolds: runs/k0/phase1" in p.stdout
        assert [l for l in p.stdout.splitlines() if l.startswith("step ")][:1], p.stdout
    # with only scaffold-less checkpoints, the error says which command makes one
    only_k0 = work / "k0only"
    os.makedirs(only_k0)
    os.rename(work / "runs" / "k0", only_k0 / "runs")
    p = sh([PY, f"{ROOT}/explain.py", str(work / "img.png"), "Where?"], only_k0, env, check=False)
    assert p.returncode != 0 and "keeps the scaffolds" in p.stderr and "bash demo.sh" in p.stderr
    assert "Traceback" not in p.stderr
