"""explain.py on a tiny checkpoint: K sentences and a panel of the right size; a planted visual projector whose
heatmap must peak on one chosen patch (and whose bank neighbour is that patch's feature); the error cases."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import explain as X
import model as M
from pipeline.io import load_image
from pipeline.roi_encoder import SiglipPatches, patch_features
from test_evaluate import make_ckpt, write_image

K = 3
FAST = ["--max-new-tokens", "4", "--max-step-tokens", "6"]  # untrained models never stop early


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ex"))
    ckpt, data, models = make_ckpt(root)
    return dict(root=root, ckpt=ckpt, data=data, models=models, image=os.path.join(data, "images", "1.png"))


def run(args, capsys):
    res = X.main(args)
    return res, capsys.readouterr().out


def test_prints_k_sentences_and_writes_panel(tiny, tmp_path, capsys):
    out = str(tmp_path / "case")
    res, printed = run([tiny["image"], "Where is the lesion?", "--ckpt", tiny["ckpt"], "--k", str(K), "--out", out,
                        "--tile", "96", *FAST], capsys)
    steps = [l for l in printed.splitlines() if l.startswith("step ")]
    assert [l.split(":")[0] for l in steps] == [f"step {k}" for k in range(1, K + 1)]
    assert all(line.isprintable() for line in printed.splitlines())  # no control bytes reach the terminal
    assert printed.splitlines()[2].startswith("A: ")
    saved = json.load(open(out + ".json"))
    assert len(saved["steps"]) == K and all(isinstance(s["sentence"], str) for s in saved["steps"])
    assert all(np.array(s["heatmap"]).shape == (8, 8) for s in saved["steps"])  # tiny encoder: 8 x 8 grid
    assert saved["answer"] == res["answer"]
    panel = Image.open(out + ".png").convert("RGB")
    assert panel.size == X.panel_size(K, 96, False) == tuple(saved["panel_size"])
    a = np.asarray(panel).astype(int)
    for slot in range(K + 1):  # the image and K heatmaps: every tile slot holds a picture, not background
        x0 = X.MARGIN + slot * (96 + X.MARGIN)
        tile = a[X.HEADER:X.HEADER + 96, x0:x0 + 96]
        assert tile.std() > 5 and (tile != 255).any(axis=-1).mean() > 0.9, slot
    assert (a[X.HEADER:X.HEADER + 96, -X.MARGIN + 2:] == 255).all()  # nothing after the last tile


def test_newest_checkpoint_is_found_with_no_argument(tiny, tmp_path, capsys, monkeypatch):
    shutil.copytree(os.path.join(tiny["root"], "runs"), tmp_path / "runs")
    old = tmp_path / "runs" / "older" / "phase1"
    shutil.copytree(tmp_path / "runs" / "tiny" / "phase1", old)
    os.utime(old / "config.json", (1, 1))  # the copy is older: it must not be chosen
    monkeypatch.chdir(tmp_path)
    res, printed = run([tiny["image"], "Is the liver visible?"], capsys)
    ckpt = tmp_path / "runs" / "tiny" / "phase1"
    assert res["ckpt"] == str(ckpt) and res["K"] == 4
    # without --out the panel and the JSON go next to the checkpoint, not into the current folder
    assert os.path.isfile(ckpt / "explain" / "1.png") and os.path.isfile(ckpt / "explain" / "1.json")
    assert sorted(os.listdir(tmp_path)) == ["runs"]
    assert len([l for l in printed.splitlines() if l.startswith("step ")]) == 4


def test_planted_heatmap_peaks_on_the_planted_patch(tiny, tmp_path, capsys):
    """VP's output LayerNorm with gain 0 and bias f_p outputs f_p for every h: VP(h_k) = the feature of patch
    p = (row 4, col 6) of this 96x64 image, so every step's heatmap must peak there; and a ROI bank that
    holds f_p must return it first with cosine 1."""
    root = str(tmp_path)
    shutil.copytree(os.path.join(tiny["root"], "models"), os.path.join(root, "models"))
    img_path = write_image(os.path.join(root, "planted.png"), 96, 64, seed=3)
    enc = SiglipPatches(os.path.join(root, "models", "encoder"))
    f, box, s = patch_features(enc, load_image(img_path))
    assert box == (0, 16, 96, 80) and s == 96  # 96x64 centred on a 96x96 square
    p = 4 * 8 + 6

    def plant(vital):
        with torch.no_grad():
            vital.vp.ln_out.weight.zero_()
            vital.vp.ln_out.bias.copy_(f[p])

    ckpt, data, _ = make_ckpt(root, plant=plant)
    bank = os.path.join(root, "bank.safetensors")
    other = F.normalize(torch.randn(3, f.shape[1]), dim=-1)
    save_file(dict(roi=torch.stack([other[0], F.normalize(f[p], dim=0), other[1], other[2]]).contiguous(),
                   box=torch.tensor([[0, 0, 32, 32], [72, 32, 84, 44], [0, 0, 64, 48], [8, 8, 40, 40]])),
              bank, metadata=dict(ids=json.dumps(["r0", "r-planted", "r2", "r3"]),
                                  samples=os.path.join(data, "samples.jsonl")))
    out = os.path.join(root, "out", "planted")
    res, _ = run([img_path, "Where is it?", "--ckpt", ckpt, "--k", str(K), "--out", out, "--tile", "96",
                  "--bank", bank, "--bank-top", "2", *FAST], capsys)
    for st in res["steps"]:
        assert (st["peak"]["row"], st["peak"]["col"]) == (4, 6)
        assert st["peak"]["cos"] == pytest.approx(1.0, abs=1e-5)
        # patch (4, 6) spans x 72..84 and square y 48..60 = image y 32..44: its centre is (78, 38)
        assert (st["peak"]["x"], st["peak"]["y"]) == pytest.approx((78.0, 38.0))
        assert [n["id"] for n in st["nearest_rois"]][0] == "r-planted"
        assert st["nearest_rois"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert st["nearest_rois"][1]["score"] < 0.99
    panel = np.asarray(Image.open(out + ".png").convert("RGB")).astype(int)
    assert panel.shape[:2][::-1] == X.panel_size(K, 96, True)
    # In the panel, the peak of step 1 (square coords (78, 54) scaled to the 96-px tile) is drawn hot (red).
    x0 = X.MARGIN + (96 + X.MARGIN)
    r, g, b = panel[X.HEADER + 54, x0 + 78]
    assert r > b + 60, (r, g, b)


def test_printable_strips_control_characters():
    assert X.printable("a\x00b\x1b[31mc\td\ne\u200b\x7f") == "ab[31mc d e"
    assert X.printable("Läsion 50% ✓") == "Läsion 50% ✓"


def test_control_characters_never_reach_stdout(tiny, tmp_path, capsys, monkeypatch):
    """An untrained decoder's step sentence with control bytes: stdout gets printable text, the JSON the raw
    string (escaped, strict)."""
    raw = "looks \x1b[2J at\x00 the\nlesion\x07"
    monkeypatch.setattr(M, "decode_latent", lambda dec, pj, tok, h, n: [raw] * h.shape[0])
    out = str(tmp_path / "ctl")
    _, printed = run([tiny["image"], "Where\x08 is it?", "--ckpt", tiny["ckpt"], "--k", "2", "--out", out,
                      "--tile", "64", *FAST], capsys)
    assert all(line.isprintable() for line in printed.splitlines())
    assert "step 1: looks [2J at the lesion" in printed
    saved = json.loads(open(out + ".json").read(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert saved["steps"][0]["sentence"] == raw


def test_errors_are_clear(tiny, tmp_path, capsys):
    q = "Where?"
    with pytest.raises(X.ExplainError, match="no such file"):
        X.main([str(tmp_path / "missing.png"), q, "--ckpt", tiny["ckpt"]])
    (tmp_path / "notimage.png").write_text("this is not a PNG")
    with pytest.raises(X.ExplainError, match="cannot be read as an image"):
        X.main([str(tmp_path / "notimage.png"), q, "--ckpt", tiny["ckpt"]])
    (tmp_path / "runs").mkdir()
    with pytest.raises(X.ExplainError, match="no checkpoint found.*train.py"):
        X.main([tiny["image"], q, "--runs", str(tmp_path / "runs")])
    bare = tmp_path / "bare"
    shutil.copytree(tiny["ckpt"], bare)
    os.remove(bare / "scaffold.safetensors")
    with pytest.raises(X.ExplainError, match="no scaffold.safetensors"):
        X.main([tiny["image"], q, "--ckpt", str(bare)])
    with pytest.raises(X.ExplainError, match="encoder folder .*nowhere.* does not exist"):
        X.main([tiny["image"], q, "--ckpt", tiny["ckpt"], "--encoder", str(tmp_path / "nowhere"),
                "--out", str(tmp_path / "o")])
    with pytest.raises(X.ExplainError, match="encoder folder .*backbone.*'qwen3_vl' model"):
        X.main([tiny["image"], q, "--ckpt", tiny["ckpt"], "--encoder", os.path.join(tiny["models"], "backbone"),
                "--out", str(tmp_path / "o"), *FAST])
    with pytest.raises(X.ExplainError, match="no checkpoint at"):
        X.main([tiny["image"], q, "--ckpt", str(tmp_path / "no-such-ckpt")])
    with pytest.raises(SystemExit):  # argparse: one usage line and one error line
        X.main([tiny["image"], "  ", "--ckpt", tiny["ckpt"]])
    assert "the question is empty" in capsys.readouterr().err
